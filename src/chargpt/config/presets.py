"""Presets: named starting points for the options (`lab`, `cpu`, `modern`, `tiny`), and how the
layers of options combine: defaults, preset, TOML file, flags."""

from __future__ import annotations

import dataclasses
from typing import Any

from chargpt.config.options import PRESET_WARMUP_FRACTION, ModelConfig, TrainConfig
from chargpt.config.sources import from_dict
from chargpt.errors import ChargptError

# Presets override the dataclass defaults; `auto` resolves to `lab` on a GPU and `cpu` otherwise.
PRESETS: dict[str, dict[str, Any]] = {
    # The notebook's exact settings: AdamW at a constant 3e-4, no clipping, no schedule.
    "lab": {},
    # Five minutes on 2 CPU cores, start-up and evaluations included (benchmarks/train_default.py):
    # a time budget, with the options that each beat the lab's architecture alone in a two-seed
    # ablation at this budget (benchmarks/recipe.py, docs/recipe.md). A given --max-iters
    # replaces the time budget.
    "cpu": dict(
        block_size=128,
        n_embd=128,
        n_head=4,
        n_layer=4,
        dropout=0.0,
        pos_emb="rope",
        norm="rmsnorm",
        batch_size=32,
        max_time="270s",
        eval_interval=200,
        eval_iters=20,
        learning_rate=3e-3,
        min_lr=3e-4,
        warmup_iters=100,
        lr_schedule="cosine",
        weight_decay=0.1,
        beta2=0.99,
        grad_clip=1.0,
        optimizer="muon",
        ema_decay=0.995,
    ),
    # For GPUs: the lab's sizes and training settings with the `cpu` preset's options.
    "modern": dict(
        pos_emb="rope",
        norm="rmsnorm",
        optimizer="muon",
        ema_decay=0.999,
    ),
    # Seconds: for smoke tests and trying the commands.
    "tiny": dict(
        block_size=32,
        n_embd=32,
        n_head=2,
        n_layer=2,
        dropout=0.0,
        batch_size=16,
        max_iters=60,
        eval_interval=20,
        eval_iters=4,
        learning_rate=1e-2,
        min_lr=1e-3,
        warmup_iters=5,
        lr_schedule="cosine",
        grad_clip=1.0,
        sample_chars=40,
    ),
}
PRESET_NAMES = ("auto", *PRESETS)


def resolve_preset(name: str, on_gpu: bool) -> str:
    if name == "auto":
        return "lab" if on_gpu else "cpu"
    if name not in PRESETS:
        raise ChargptError(f"unknown preset {name!r}: choose one of {', '.join(PRESET_NAMES)}")
    return name


def split_overrides(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route flat option names to the model or the training config; unknown names are an error."""
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - model_names - train_names)
    if unknown:
        raise ChargptError(f"unknown option(s) {', '.join(unknown)}: see `chargpt train --help`")
    model = {k: v for k, v in values.items() if k in model_names}
    train = {k: v for k, v in values.items() if k in train_names}
    return model, train


def build_configs(
    preset: str, has_gpu: bool, *overrides: dict[str, Any]
) -> tuple[ModelConfig, TrainConfig]:
    """Defaults, then the preset, then each override in turn (TOML file, then CLI flags).
    A step count given (`max_iters`) replaces a preset's time budget (`max_time`), and a
    preset's warmup is cut to fit a run of few steps (a warmup given is checked, not cut).
    `auto` is `lab` when training runs on a CUDA GPU: the device the overrides name, or for
    device auto, whether a CUDA GPU is available (`has_gpu`)."""
    given: dict[str, Any] = {}
    for layer in overrides:
        given.update(layer)
    device = str(given.get("device", "auto"))
    on_gpu = has_gpu if device == "auto" else device.startswith("cuda")
    preset_values = dict(PRESETS[resolve_preset(preset, on_gpu)])
    if "max_iters" in given and "max_time" not in given:
        preset_values.pop("max_time", None)  # a step count given replaces a preset's time budget
    model_values, train_values = split_overrides({**preset_values, **given})
    model = from_dict(ModelConfig, model_values)
    train = from_dict(TrainConfig, train_values)
    if "warmup_iters" not in given:  # the preset's (or no) warmup: made to fit a short run
        train = dataclasses.replace(train, warmup_iters=fitted_warmup(train))
    model.validate()
    train.validate()
    return model, train


def fitted_warmup(train: TrainConfig) -> int:
    """`train`'s warmup, at most PRESET_WARMUP_FRACTION of the steps its schedule covers
    (lr_decay_iters, fixed when the run starts so that a resumed run follows the same schedule,
    else max_iters) and no longer than the run. A time budget's step count is unknown until the
    run ends: its warmup stays as it is."""
    if train.max_time:
        return train.warmup_iters
    steps = train.lr_decay_iters or train.max_iters
    return min(train.warmup_iters, int(PRESET_WARMUP_FRACTION * steps), train.max_iters)
