"""Resuming a stopped run: what `chargpt train --resume RUN` does, for Python users too.

trainer = resume_run("runs/shakespeare", max_iters=2400)
trainer.run()
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from chargpt.config import ModelConfig, TrainConfig, from_dict, parse_duration
from chargpt.config.presets import split_overrides
from chargpt.data.dataset import load_corpus
from chargpt.errors import ChargptError
from chargpt.model.precision import resolve_device
from chargpt.runs.directory import LAST, read_run_config, run_configs
from chargpt.training.precision import TrainingPrecision
from chargpt.training.state import load_trainer_state
from chargpt.training.trainer import Trainer

# What a resumed run may change: how long and how often, and where it runs. Everything else
# (model shape, data, optimiser, schedule, seed) is the run's identity and stays as saved.
RESUMABLE_OPTIONS = (
    "max_iters",
    "eval_interval",
    "eval_iters",
    "log_interval",
    "sample_chars",
    "device",
    "dtype",
    "compile",
)


def resume_configs(
    model_config: ModelConfig, train_config: TrainConfig, changes: dict[str, Any]
) -> tuple[ModelConfig, TrainConfig]:
    """The saved configs with the options a resumed run may change (RESUMABLE_OPTIONS) applied;
    any other option given with a different value is refused. Not validated yet."""
    model_changes, train_changes = split_overrides(changes)
    new_model = from_dict(ModelConfig, {**dataclasses.asdict(model_config), **model_changes})
    new_train = from_dict(TrainConfig, {**dataclasses.asdict(train_config), **train_changes})
    refused = [
        "--" + f.name.replace("_", "-")
        for old, new in ((model_config, new_model), (train_config, new_train))
        for f in dataclasses.fields(old)
        if getattr(old, f.name) != getattr(new, f.name) and f.name not in RESUMABLE_OPTIONS
    ]
    if refused:
        allowed = ", ".join("--" + name.replace("_", "-") for name in RESUMABLE_OPTIONS)
        raise ChargptError(
            f"cannot change {', '.join(refused)} when resuming (a resumed run keeps its model "
            f"and training recipe; only {allowed} may change): start a new run with --out instead"
        )
    return new_model, new_train


def saved_precision(state: dict[str, Any], changes: dict[str, Any]) -> TrainingPrecision | None:
    """The dtypes the run trained in, so that it goes on computing as it did (on another
    machine too), unless `changes` give a dtype (`auto` included) or a device: then they are
    decided again, as for a run saved before they were."""
    saved = state.get("precision")
    if saved is None or {"dtype", "device"} & changes.keys():
        return None
    return TrainingPrecision.from_json(saved)


def check_not_finished(
    run_dir: Path, step: int, train_time: float, train_config: TrainConfig
) -> None:
    if train_config.max_time:
        if train_time < parse_duration(train_config.max_time):
            return
        raise ChargptError(
            f"{run_dir} already trained for its --max-time {train_config.max_time} (a resumed "
            "run keeps its time budget, which paces its schedule): start a new run to train longer"
        )
    if step < train_config.max_iters:
        return
    after = (
        f" (past step {train_config.lr_decay_iters} the learning rate stays at min_lr "
        f"{train_config.min_lr:g})"
        if train_config.lr_schedule == "cosine"
        else ""
    )
    raise ChargptError(
        f"{run_dir} already ran {step} of its {train_config.max_iters} steps: pass a larger "
        f"--max-iters to train longer{after}"
    )


def resume_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    encoding_errors: str = "strict",
    **changes: Any,
) -> Trainer:
    """A Trainer that continues the run in `run_dir` exactly where it stopped (call `.run()`),
    on the run's own data (or `data`, which must be the same text). `changes` are options named
    in RESUMABLE_OPTIONS, e.g. `max_iters=2400`; the others must keep their saved values."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    model_config, _, tokenizer = run_configs(run_dir, config)
    tensors, state = load_trainer_state(run_dir)
    try:
        saved_train = from_dict(TrainConfig, state["train"])
        step, train_time = int(state["step"]), float(state["train_time"])
        precision = saved_precision(state, changes)
    except (KeyError, TypeError, ValueError, ChargptError) as err:
        raise ChargptError(f"{run_dir / LAST} is invalid ({err}): start a new run") from None
    model_config, train_config = resume_configs(model_config, saved_train, changes)
    check_not_finished(run_dir, step, train_time, train_config)
    model_config.validate()
    train_config.validate()
    resolve_device(train_config.device)
    data = data or config.get("data") or "shakespeare"
    # a fine-tuned run reads its data in its joined vocabulary, without the skipped characters
    dataset, _, digest = load_corpus(data, encoding_errors, tokenizer, train_config.on_unknown)
    if config.get("data_sha256") and digest != config["data_sha256"]:
        raise ChargptError(
            f"corpus {str(data)!r} is not the text {run_dir} was trained on (its SHA-256 "
            "differs): pass the original corpus with --data"
        )
    dataset.check_block_size(model_config.block_size)
    data_config = dict(data_name=str(data), data_sha256=digest, precision=precision)
    trainer = Trainer(model_config, train_config, dataset, tokenizer, run_dir, **data_config)
    trainer.restore(tensors, state)
    return trainer
