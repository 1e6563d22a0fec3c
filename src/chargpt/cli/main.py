"""The `chargpt` command: train, sample, eval, compare, plot, prepare. A thin shell over the
package's functions; user mistakes print one line, not a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import sys
from collections.abc import Iterator

import torch

from chargpt.cli.export_commands import cmd_export, onnxruntime_run, onnxruntime_sampler
from chargpt.cli.parser import build_parser
from chargpt.cli.shell import cmd_prepare, run_command
from chargpt.config import (
    MAX_SEED,
    ModelConfig,
    SampleConfig,
    ServeConfig,
    TrainConfig,
    from_dict,
)
from chargpt.config.budget import describe_recipe
from chargpt.config.presets import build_configs, resolve_preset
from chargpt.config.sources import given_fields, load_toml
from chargpt.data.dataset import load_corpus
from chargpt.errors import ChargptError
from chargpt.eval import compare
from chargpt.eval.counts import count_references
from chargpt.eval.evaluate import evaluate_run
from chargpt.generation.generate import TextPiece, encode_prompt, resolve_seed, stream
from chargpt.generation.precision import cpu_bf16_speedup, resolve_device
from chargpt.model.quantize import quantized
from chargpt.runs.directory import check_new_run_dir, load_run, read_run_config, removed_if_failed
from chargpt.training.distributed import backend
from chargpt.training.finetune import finetune_run
from chargpt.training.resume import resume_run
from chargpt.training.trainer import Trainer
from chargpt.viz.plot import plot_run


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
    """Why `--dtype auto` chose what it did on a CPU: the start-up matmul timing."""
    if trainer.cfg.dtype != "auto" or trainer.device.type != "cpu":
        return ""
    return f" (a bf16 matmul measured {cpu_bf16_speedup():.2g}x fp32's speed here)"


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        return args.prompt
    try:
        return args.prompt_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ChargptError(f"prompt file {str(args.prompt_file)!r} does not exist") from None
    except UnicodeDecodeError:
        raise ChargptError(f"prompt file {str(args.prompt_file)!r} is not UTF-8 text") from None


def cmd_sample(args: argparse.Namespace) -> int:
    config = from_dict(SampleConfig, given_fields(args, SampleConfig))
    config.validate()
    prompt = read_prompt(args)
    if args.backend == "onnxruntime":
        tokenizer, sampler = onnxruntime_sampler(args, config)
    else:
        run = load_run(args.run, resolve_device(args.device))
        model, tokenizer = quantized(run.model, config.quantize), run.tokenizer

        def sampler(prompt: str, config: SampleConfig) -> Iterator[TextPiece]:
            return stream(model, tokenizer, prompt, config)

    shown = tokenizer.decode(encode_prompt(tokenizer, prompt, config.on_unknown))
    if config.seed == -1:  # say which seed was drawn, so that a good sample can be had again
        config = dataclasses.replace(config, seed=resolve_seed(config.seed))
        print(f"seed {config.seed} (pass --seed {config.seed} to repeat)", file=sys.stderr)
    if config.num_samples == 1:  # one sample: print each character as soon as it exists
        print(shown, end="", flush=True)
        for piece in sampler(prompt, config):
            print(piece.text, end="", flush=True)
        print()
        return 0
    texts = [""] * config.num_samples
    for piece in sampler(prompt, config):
        texts[piece.sample] += piece.text
    print(("\n" + "-" * 40 + "\n").join(shown + text for text in texts))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    device = torch.device("cpu") if args.backend == "onnxruntime" else resolve_device(args.device)
    run = load_run(args.run, device)
    if args.backend == "onnxruntime":
        run = onnxruntime_run(args, run)
    else:
        run = dataclasses.replace(run, model=quantized(run.model, args.quantize))
    data = args.data or run.meta.get("data") or "shakespeare"
    on_unknown = run.train_config.on_unknown  # a run fine-tuned with skip drops the same
    dataset, _, _ = load_corpus(data, args.encoding_errors, run.tokenizer, on_unknown)
    result = evaluate_run(
        run, dataset, device, args.batch_size, args.eval_iters, args.stride, args.max_chars
    )
    full = result.full_val
    if args.json:
        # headline figures from the deterministic full pass; details of both methods beside them
        headline = {"val_loss": full.nats, "bits_per_char": full.bits_per_char}
        print(json.dumps({"data": str(data), **headline, **result.to_dict()}))
    else:
        print(f"{data}\n{result.summary()}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    if args.sample_length < 0:
        raise ChargptError(f"--sample-length must not be negative, got {args.sample_length}")
    if not 0 <= args.sample_seed <= MAX_SEED:
        raise ChargptError(f"--sample-seed must be in 0..{MAX_SEED}, got {args.sample_seed}")
    flags = given_fields(args, ModelConfig, TrainConfig)
    device = resolve_device(flags.pop("device", "auto"))
    if "model" in flags:
        raise ChargptError("compare trains both models: drop --model")
    if args.runs:
        if flags or args.config:
            raise ChargptError("--runs compares finished runs: drop the training options")
        runs = compare.label_runs(args.runs)
        data = args.data or read_run_config(args.runs[0]).get("data") or "shakespeare"
    else:
        if args.budget_iters is not None:
            flags["max_iters"] = args.budget_iters
        if args.budget_seconds is not None:
            if not args.budget_seconds > 0:
                raise ChargptError(f"--budget-seconds must be positive, got {args.budget_seconds}")
            flags["max_time"] = f"{args.budget_seconds}s"
        if not args.bigram_learning_rate > 0:
            raise ChargptError(
                f"--bigram-learning-rate must be positive, got {args.bigram_learning_rate}"
            )
        file_options = load_toml(args.config) if args.config else {}
        flags["device"] = str(device)
        has_gpu = torch.cuda.is_available()
        model_config, train_config = build_configs(args.preset, has_gpu, file_options, flags)
        data = args.data or "shakespeare"
    dataset, tokenizer, _ = load_corpus(data, args.encoding_errors)
    tokenizer.encode(args.prompt)  # an unusable prompt fails before training
    compare.check_new_comparison_dir(args.out, () if args.runs else compare.MODELS)
    if not args.runs:
        runs = compare.train_both(
            dataset,
            tokenizer,
            str(data),
            model_config,
            train_config,
            args.out,
            args.bigram_learning_rate,
        )
    results = [
        compare.assess_run(
            label,
            run,
            dataset,
            tokenizer,
            device,
            args.prompt,
            args.sample_length,
            args.sample_seed,
            args.stride,
        )
        for label, run in runs.items()
    ]
    command = "chargpt " + shlex.join(sys.argv[1:])
    references = count_references(dataset, tokenizer.vocab_size)
    report = compare.write_report(
        args.out, results, references, str(data), args.prompt, args.sample_seed, command
    )
    print(f"wrote {report} and {args.out / compare.CURVES}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    print(f"wrote {plot_run(args.run, args.out)}")
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from chargpt.generation.inspection import inspect_text
    from chargpt.viz.attention_plot import plot_attention

    if not args.out.parent.is_dir():
        raise ChargptError(
            f"--out {args.out}: the directory {args.out.parent} does not exist: create it first"
        )
    run = load_run(args.run, resolve_device(args.device))
    seen = inspect_text(run.model, run.tokenizer, args.text, on_unknown=args.on_unknown)
    print(f"wrote {plot_attention(seen, args.out, args.layer, args.head)}")
    return 0


# what the `serve` extra installs (pydantic and starlette come with FastAPI)
SERVE_MODULES = {"fastapi", "starlette", "pydantic", "uvicorn", "prometheus_client"}


def cmd_serve(args: argparse.Namespace) -> int:
    values = given_fields(args, ServeConfig)
    values.setdefault("api_key", os.environ.get("CHARGPT_API_KEY", ""))
    settings = from_dict(ServeConfig, values)
    settings.validate()
    try:
        from chargpt.serve.server import serve
    except ImportError as err:
        if (err.name or "").split(".")[0] not in SERVE_MODULES:
            raise
        raise ChargptError(
            f"serving needs the serve extra ({err.name} is missing): pip install 'chargpt[serve]'"
        ) from None
    return serve(args.run, settings)


COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "compare": cmd_compare,
    "plot": cmd_plot,
    "prepare": cmd_prepare,
    "attention": cmd_attention,
    "serve": cmd_serve,
    "export": cmd_export,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(args, COMMANDS[args.command])
    except (MemoryError, RuntimeError) as err:
        if not out_of_memory(err):
            raise
        print(
            f"chargpt {args.command}: error: out of memory: choose smaller sizes "
            "(--batch-size, --num-samples, --block-size, --n-embd)",
            file=sys.stderr,
        )
        return 2


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` says that memory ran out: Python's, the GPU's, or PyTorch's CPU allocator
    (a RuntimeError of its own)."""
    if isinstance(err, MemoryError | torch.OutOfMemoryError):
        return True
    return "can't allocate memory" in str(err)
