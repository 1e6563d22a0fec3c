"""Presets: named starting points for the options (`lab`, `cpu`, `modern`, `tiny`), and how the
layers of options combine: defaults, preset, TOML file, flags."""

from __future__ import annotations

import dataclasses
from typing import Any

from chargpt.config.budget import BUDGET_TABLES, fit_to_budget, fit_to_steps
from chargpt.config.options import ModelConfig, TrainConfig
from chargpt.config.sources import from_dict
from chargpt.errors import ChargptError

# Presets override the dataclass defaults; `auto` resolves to `gpu` on a CUDA GPU and `cpu`
# otherwise.
# What the `cpu` and `gpu` presets share: the recipe options that each beat the lab's own
# (docs/recipe.md) and nanoGPT's schedule (cosine decay, beta2 0.99, clipping).
RECIPE: dict[str, Any] = dict(
    pos_emb="rope",
    norm="rmsnorm",
    optimizer="muon",
    lr_schedule="cosine",
    weight_decay=0.1,
    beta2=0.99,
    grad_clip=1.0,
)
PRESETS: dict[str, dict[str, Any]] = {
    # The notebook's exact settings: AdamW at a constant 3e-4, no clipping, no schedule.
    "lab": {},
    # Five minutes on 2 CPU cores, start-up and evaluations included (benchmarks/budget.py):
    # a time budget, with the options that each beat the lab's architecture alone in a two-seed
    # ablation at this budget (benchmarks/recipe.py, docs/recipe.md). Depth, width, batch,
    # context, EMA, warmup and rates are those of chargpt.config.budget's row for the run's
    # time budget (below: five minutes'); a given --max-iters replaces the time budget.
    "cpu": dict(
        **RECIPE,
        block_size=128,
        n_embd=128,
        n_head=4,
        n_layer=4,
        dropout=0.0,
        batch_size=32,
        max_time="270s",
        eval_interval=200,
        eval_iters=20,
        learning_rate=3e-3,
        min_lr=3e-4,
        warmup_iters=100,
        ema_decay=0.995,
    ),
    # A CUDA GPU's, 90 seconds of wall time (start-up and evaluations included): the lab's
    # sizes, the `cpu` preset's options (rotary positions, RMSNorm, Muon, EMA) and nanoGPT's
    # shakespeare_char schedule (cosine to a tenth of the peak, beta2 0.99, clipping), short
    # estimates (50 batches: the val split is 111k characters, a batch 16k) every 250 steps.
    # Dropout, EMA, warmup, rates and compilation are those of chargpt.config.budget's GPU row
    # for the run's time budget (below: 90 seconds'), which await measurement (docs/gpu.md).
    "gpu": dict(
        **RECIPE,
        block_size=256,
        n_embd=384,
        n_head=6,
        n_layer=6,
        batch_size=64,
        max_time="75s",
        eval_interval=250,
        eval_iters=50,
        learning_rate=1e-3,
        min_lr=1e-4,
        warmup_iters=100,
    ),
    # The lab's sizes and training settings with the `cpu` preset's options.
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
        return "gpu" if on_gpu else "cpu"
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
    A step count given (`max_iters`) replaces a preset's time budget (`max_time`). The `cpu`
    and `gpu` presets' recipes are fitted to the budget, and any preset's warmup and moving
    average to a run of few steps (chargpt.config.budget); options given are checked, never
    changed.
    `auto` is `gpu` when training runs on a CUDA GPU (the device the overrides name, or for
    device auto, whether a CUDA GPU is available: `has_gpu`), else `cpu`."""
    given: dict[str, Any] = {}
    for layer in overrides:
        given.update(layer)
    device = str(given.get("device", "auto"))
    on_gpu = has_gpu if device == "auto" else device.startswith("cuda")
    name = resolve_preset(preset, on_gpu)
    preset_values = dict(PRESETS[name])
    if "max_iters" in given and "max_time" not in given:
        preset_values.pop("max_time", None)  # a step count given replaces a preset's time budget
    model_values, train_values = split_overrides({**preset_values, **given})
    model = from_dict(ModelConfig, model_values)
    train = from_dict(TrainConfig, train_values)
    if name in BUDGET_TABLES:
        model, train = fit_to_budget(name, model, train, set(given))
    train = dataclasses.replace(train, **fit_to_steps(train, set(given)))
    model.validate()
    train.validate()
    return model, train
