"""`chargpt train`: a new run, a resumed one (`--resume`) or a fine-tuned one (`--init-from`),
between the lines that describe it and the one that sums it up."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys

import torch

from chargpt.config import ModelConfig, TrainConfig
from chargpt.config.budget import describe_recipe
from chargpt.config.presets import build_configs, resolve_preset
from chargpt.config.sources import given_fields, load_toml
from chargpt.data.dataset import load_corpus
from chargpt.errors import ChargptError
from chargpt.model.precision import describe_probe, resolve_device
from chargpt.runs.directory import check_new_run_dir, removed_if_failed
from chargpt.training.distributed import backend
from chargpt.training.finetune import finetune_run
from chargpt.training.precision import TrainingPrecision
from chargpt.training.resume import resume_run
from chargpt.training.trainer import Trainer


def cmd_train(args: argparse.Namespace) -> int:
    changes = {**(load_toml(args.config) if args.config else {})}
    changes.update(given_fields(args, ModelConfig, TrainConfig))
    if args.resume is not None:
        if args.preset is not None:
            raise ChargptError("--preset cannot be used with --resume: a resumed run keeps its own")
        trainer = resume_run(args.resume, args.data, args.encoding_errors, **changes)
        if trainer.world.is_main:
            print(f"resuming {args.resume} at step {trainer.step}", file=sys.stderr)
        return train_and_report(trainer)
    preset = args.preset or "auto"
    data = args.data or "shakespeare"
    if changes.get("init_from"):
        with removed_if_failed(args.out):
            trainer = finetune_run(
                changes.pop("init_from"), data, args.out, args.encoding_errors, preset, **changes
            )
            return train_and_report(trainer)
    model_config, train_config = build_configs(preset, torch.cuda.is_available(), changes)
    device = resolve_device(train_config.device)
    dataset, tokenizer, digest = load_corpus(data, args.encoding_errors)
    dataset.check_block_size(model_config.block_size)
    with removed_if_failed(args.out):
        check_new_run_dir(args.out, model_config, tokenizer.vocab_size)  # before joining others
        trainer = Trainer(
            model_config, train_config, dataset, tokenizer, args.out, data, data_sha256=digest
        )
        name = resolve_preset(preset, device.type == "cuda")
        return train_and_report(
            trainer, describe_recipe(name, model_config, train_config, set(changes))
        )


def train_and_report(trainer: Trainer, recipe: str = "") -> int:
    """Run the trainer between the lines that describe the run (and its `recipe`) and one that
    sums it up (under torchrun, the main process alone prints)."""
    run_dir, dataset = trainer.out_dir, trainer.dataset

    def report(message: str) -> None:
        if trainer.world.is_main:
            print(message, file=sys.stderr)

    processes = (
        f", {trainer.world.size} processes ({backend()})" if trainer.world.distributed else ""
    )
    if trainer.cfg.init_from and not trainer.step:
        report(f"fine-tuning {trainer.cfg.init_from} (the weights `chargpt sample` loads)")
    report(
        f"training {trainer.model_config.model} ({trainer.model.num_parameters():,} parameters) "
        f"on {trainer.data_name}: {len(dataset.train):,} train / {len(dataset.val):,} val "
        f"characters, vocabulary {trainer.tokenizer.vocab_size}, device {trainer.device}, "
        f"{str(trainer.dtype).removeprefix('torch.')}{measured_dtype(trainer)}{processes}"
    )
    if recipe:
        report(recipe)
    if trainer.compile_seconds:
        report(
            f"torch.compile: {trainer.compile_seconds:.1f} s to compile, counted as training time"
        )
    try:
        result = trainer.run()
    finally:
        trainer.close()
    if result.stopped_by is not None:
        report(
            f"{signal.Signals(result.stopped_by).name}: stopped at step {result.steps} and saved; "
            f"continue with: chargpt train --resume {shlex.quote(str(run_dir))}"
        )
        return 128 + result.stopped_by
    report(
        f"best val loss {result.best_val_loss:.4f} at step {result.best_step} "
        f"({result.elapsed:.0f}s of training, {result.tokens_per_second:,.0f} tokens/s); "
        f"saved to {run_dir}\nnext: chargpt sample --run {shlex.quote(str(run_dir))}"
    )
    return 0


def measured_dtype(trainer: Trainer) -> str:
    """Why `--dtype auto` chose what it did: the start-up matmul timing; or that a resumed run
    keeps the dtypes it started with where this machine would choose others."""
    measured = describe_probe(trainer.device) if trainer.cfg.dtype == "auto" else ""
    if not measured:
        return ""
    if trainer.precision != TrainingPrecision.measured("auto", trainer.device):
        return f" (the run's own, although {measured}: resume with --dtype auto to choose again)"
    return f" ({measured})"
