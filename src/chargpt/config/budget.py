"""The `cpu` and `gpu` presets' recipes fitted to the run's budget.

The settings that give the best model in 90 seconds are not those of 15 minutes: a short run
needs a smaller model, many small steps (a small batch and context) and no moving average; a
long one gains from larger batches, a slow average and, on a GPU, dropout against overfitting
and a compiled model (its compile time paid back by faster steps). With a time budget
(`max_time`), the preset's depth, width, batch size, context, dropout, EMA decay, warmup,
learning rates and compilation come from the row of its table (`BUDGET_TABLES`) for that many
seconds of training: the CPU's measured with benchmarks/budget.py (docs/recipe.md), the GPU's
with benchmarks/gpu.sh (docs/gpu.md). With a step budget (`max_iters`), the warmup and the
average's horizon are cut to fit the steps. An option given (TOML file or flag) always wins
over the table.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

from chargpt.config.options import (
    PRESET_WARMUP_FRACTION,
    ModelConfig,
    TrainConfig,
    parse_duration,
)

# a step budget's moving average spans at most this fraction of its steps (as the 5-minute row's)
EMA_HORIZON_FRACTION = 0.2


@dataclass(frozen=True)
class BudgetRow:
    """The recipe for time budgets of up to `up_to_seconds` of training."""

    up_to_seconds: float
    n_layer: int
    n_embd: int
    batch_size: int
    block_size: int
    ema_decay: float
    warmup_iters: int
    learning_rate: float
    muon_lr: float
    dropout: float = 0.0
    compile: bool = False

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "up_to_seconds"}


# measured on 2 cores of an AMD EPYC (docs/recipe.md, benchmarks/budget.py): at 90 s of wall
# time, a smaller model, many small steps and no average; from 5 minutes on, the five-minute
# ablation's settings
CPU_TABLE = (
    BudgetRow(150, 3, 96, 16, 64, 0.0, 30, 3e-3, 0.02),
    BudgetRow(math.inf, 4, 128, 32, 128, 0.995, 100, 3e-3, 0.02),
)
# NOT MEASURED YET: these rows await a GPU (benchmarks/gpu.sh, docs/gpu.md). Chosen from what is
# known (docs/gpu.md): nanoGPT's shakespeare_char settings (6 x 384, batch 64 x 256, dropout
# 0.2, lr 1e-3, warmup 100) reach their best val in under 2,000 steps and overfit after; Muon,
# rotary positions, RMSNorm and EMA each helped on CPUs (docs/recipe.md). So the lab's size
# throughout; in a 30- or 45-second run (under 40 s of training, ~2,000 steps) less
# dropout and no average, which lags early; in a 90-second one nanoGPT's dropout and a short
# average; compiled only from 3 minutes on, where its compile time (tens of seconds on a cold
# cache) can pay back.
GPU_TABLE = (
    BudgetRow(40, 6, 384, 64, 256, 0.0, 50, 1e-3, 0.02, dropout=0.1),
    BudgetRow(150, 6, 384, 64, 256, 0.99, 100, 1e-3, 0.02, dropout=0.2),
    BudgetRow(math.inf, 6, 384, 64, 256, 0.995, 100, 1e-3, 0.02, dropout=0.2, compile=True),
)
BUDGET_TABLES = {"cpu": CPU_TABLE, "gpu": GPU_TABLE}
TABLE_DOCS = {"cpu": "docs/recipe.md", "gpu": "docs/gpu.md"}


def budget_row(seconds: float, preset: str = "cpu") -> BudgetRow:
    return next(row for row in BUDGET_TABLES[preset] if seconds <= row.up_to_seconds)


def fit_to_budget(
    preset: str, model: ModelConfig, train: TrainConfig, given: set[str]
) -> tuple[ModelConfig, TrainConfig]:
    """The configs of `preset` (one with a table) with its table's row for their time budget in
    place of every setting not `given`."""
    if not train.max_time:
        return model, train
    row = budget_row(parse_duration(train.max_time), preset)
    fitted = {k: v for k, v in row.settings().items() if k not in given}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    in_model = {k: v for k, v in fitted.items() if k in model_fields}
    in_train = {k: v for k, v in fitted.items() if k not in model_fields}
    return dataclasses.replace(model, **in_model), dataclasses.replace(train, **in_train)


def fit_to_steps(train: TrainConfig, given: set[str]) -> dict[str, Any]:
    """For a step budget: the warmup cut to PRESET_WARMUP_FRACTION of the steps the schedule
    covers (lr_decay_iters, fixed when the run starts so that a resumed run follows the same
    schedule, else max_iters) and never longer than the run; the moving average's horizon,
    1 / (1 - decay) steps, cut to EMA_HORIZON_FRACTION of the steps (off under 2 steps).
    A time budget's step count is unknown until the run ends: its settings stay as they are."""
    if train.max_time:
        return {}
    changes: dict[str, Any] = {}
    steps = train.lr_decay_iters or train.max_iters
    if "warmup_iters" not in given:
        warmup = int(PRESET_WARMUP_FRACTION * steps)
        changes["warmup_iters"] = min(train.warmup_iters, warmup, train.max_iters)
    horizon = EMA_HORIZON_FRACTION * train.max_iters
    if "ema_decay" not in given and train.ema_decay and 1 / (1 - train.ema_decay) > horizon:
        changes["ema_decay"] = 1 - 1 / horizon if horizon >= 2 else 0.0
    return changes


def describe_recipe(preset: str, model: ModelConfig, train: TrainConfig, given: set[str]) -> str:
    """One line for the run's header: the recipe's settings, and what they were fitted to."""
    ema = f"EMA {train.ema_decay:g}" if train.ema_decay else "no EMA"
    muon = f", Muon {train.muon_lr:g}" if train.optimizer == "muon" else ""
    dropout = f", dropout {model.dropout:g}" if model.dropout else ""
    settings = (
        f"model {model.n_layer} x {model.n_embd}, batch {train.batch_size} x context "
        f"{model.block_size}, {ema}, "
        f"warmup {train.warmup_iters} steps, lr {train.learning_rate:g}{muon}{dropout}"
        f"{', compiled' if train.compile else ''}"
    )
    if not train.max_time:
        cuts = f"{PRESET_WARMUP_FRACTION:.0%}/{EMA_HORIZON_FRACTION:.0%}"
        why = (
            f"{train.max_iters} steps: the {preset} preset's, warmup and EMA at most {cuts} of them"
        )
    elif preset in BUDGET_TABLES:
        why = f"{train.max_time} of training: {row_name(preset, parse_duration(train.max_time))}"
    else:
        why = f"{train.max_time} of training: the {preset} preset's settings"
    chosen = sorted(given & {f.name for f in dataclasses.fields(BudgetRow)})
    return f"recipe: {settings} ({why}{'; given: ' + ', '.join(chosen) if chosen else ''})"


def row_name(preset: str, seconds: float) -> str:
    """Which row of `preset`'s table a budget of `seconds` takes, as the header says it."""
    table = BUDGET_TABLES[preset]
    row = budget_row(seconds, preset)
    index = table.index(row)
    lower = table[index - 1].up_to_seconds if index else 0.0
    span = f"over {lower:g}" if math.isinf(row.up_to_seconds) else f"up to {row.up_to_seconds:g}"
    name = f"the row for {span} s of {TABLE_DOCS[preset]}'s table"
    if preset == "gpu":
        return f"on a CUDA GPU, {name}, not measured yet"
    return name
