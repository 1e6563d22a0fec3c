"""The `cpu` and `gpu` presets' recipes follow the budget (chargpt.config.budget): the table's
row for a time budget, warmup and moving average fitted to a step budget, options given kept."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chargpt.config import ModelConfig, TrainConfig, build_configs
from chargpt.config.budget import (
    BUDGET_TABLES,
    CPU_TABLE,
    EMA_HORIZON_FRACTION,
    GPU_TABLE,
    budget_row,
    describe_recipe,
)
from chargpt.errors import ChargptError

TABLE_FIELDS = [f.name for f in dataclasses.fields(CPU_TABLE[0]) if f.name != "up_to_seconds"]


def settings(model: ModelConfig, train: TrainConfig) -> dict:
    both = {**dataclasses.asdict(model), **dataclasses.asdict(train)}
    return {name: both[name] for name in TABLE_FIELDS}


@pytest.mark.parametrize("table", BUDGET_TABLES.values())
def test_each_table_covers_every_budget_in_order(table) -> None:
    limits = [row.up_to_seconds for row in table]
    assert limits == sorted(limits) and limits[-1] == float("inf")


@pytest.mark.parametrize(("max_time", "row"), [("75s", 0), ("2.5m", 0), ("270s", 1), ("804s", 1)])
def test_a_time_budget_takes_its_rows_settings(max_time, row) -> None:
    model, train = build_configs("cpu", False, {"max_time": max_time})
    assert settings(model, train) == CPU_TABLE[row].settings()


def test_the_default_run_is_the_five_minute_row() -> None:
    model, train = build_configs("auto", False)
    assert train.max_time == "270s"
    assert settings(model, train) == budget_row(270).settings()


def test_the_rows_differ_where_the_budgets_do() -> None:
    """A 90-second run takes more, smaller steps with no average than a 15-minute one."""
    short, long = budget_row(75), budget_row(804)
    assert short.batch_size * short.block_size < long.batch_size * long.block_size
    assert short.ema_decay < long.ema_decay


@given(
    seconds=st.sampled_from(["75s", "5m", "15m"]),
    batch_size=st.integers(1, 64),
    ema_decay=st.sampled_from([0.0, 0.9, 0.999]),
)
def test_options_given_win_over_the_table(seconds, batch_size, ema_decay) -> None:
    flags = {"max_time": seconds, "batch_size": batch_size, "ema_decay": ema_decay}
    _, train = build_configs("cpu", False, flags)
    assert (train.batch_size, train.ema_decay) == (batch_size, ema_decay)


@pytest.mark.parametrize("preset", ["lab", "modern", "tiny"])
def test_other_presets_keep_their_settings_under_a_time_budget(preset) -> None:
    by_steps = build_configs(preset, False)
    model, train = build_configs(preset, False, {"max_time": "75s"})
    assert (model, dataclasses.replace(train, max_time="")) == by_steps


def test_the_lab_preset_is_still_the_notebooks() -> None:
    model, train = build_configs("lab", False)
    assert (model.block_size, model.n_embd, model.n_head, model.n_layer) == (256, 384, 6, 6)
    assert (train.batch_size, train.learning_rate, train.lr_schedule) == (64, 3e-4, "constant")
    assert (train.warmup_iters, train.ema_decay, train.max_iters) == (0, 0.0, 5000)


@pytest.mark.parametrize(
    ("steps", "ema_decay"),
    [(5000, 0.995), (1000, 0.995), (500, 0.99), (50, 0.9), (9, 0.0)],  # horizon 1/(1-d) <= steps/5
)
def test_a_step_budget_cuts_the_averages_horizon(steps, ema_decay) -> None:
    _, train = build_configs("cpu", False, {"max_iters": steps})
    assert train.ema_decay == pytest.approx(ema_decay)
    if train.ema_decay:
        assert 1 / (1 - train.ema_decay) <= EMA_HORIZON_FRACTION * steps + 1e-9


def test_an_ema_given_is_kept_for_a_step_budget() -> None:
    _, train = build_configs("cpu", False, {"max_iters": 50, "ema_decay": 0.999})
    assert train.ema_decay == 0.999


def test_the_header_says_what_was_chosen_and_why() -> None:
    flags = {"max_time": "75s", "batch_size": 20}
    model, train = build_configs("cpu", False, flags)
    line = describe_recipe("cpu", model, train, set(flags))
    row = budget_row(75)
    shape = f"model {row.n_layer} x {row.n_embd}"
    assert line.startswith(f"recipe: {shape}, batch 20 x context {row.block_size}, ")
    assert f"75s of training: the row for up to {row.up_to_seconds:g} s" in line
    assert line.endswith("given: batch_size)")
    model, train = build_configs("cpu", False, {"max_iters": 50})
    line = describe_recipe("cpu", model, train, set())
    assert "warmup 5 steps" in line and "EMA 0.9," in line  # a tenth; a horizon of 10 steps
    assert "50 steps: the cpu preset's, warmup and EMA at most 10%/20% of them" in line


def test_a_time_budget_run_prints_its_recipe_and_measured_precision(tmp_path, capsys) -> None:
    """`chargpt train --max-time 1s` on the `cpu` preset (at tiny widths): the header names the
    90-second row's batch and context, the budget, and the bf16 timing behind the dtype."""
    from chargpt.cli.main import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question. " * 200, encoding="utf-8")
    widths = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--eval-iters", "2"]
    args = ["train", "--data", str(corpus), "--out", str(tmp_path / "run"), "--max-time", "1s"]
    assert main([*args, *widths, "--sample-chars", "0", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    row = budget_row(1)
    given = "model 1 x 16"  # the widths given win over the row's
    assert f"recipe: {given}, batch {row.batch_size} x context {row.block_size}, " in err
    assert "given: n_embd, n_layer)" in err
    assert "1s of training: the row for up to" in err
    assert "(a bf16 matmul measured " in err and "x fp32's speed here)" in err


def test_a_time_budget_of_the_wrong_type_is_one_line() -> None:
    """A TOML file's `max_time = 90` (a number, not a duration): the type check runs before
    the table is read."""
    with pytest.raises(ChargptError, match="max_time must be of type str, got 90"):
        build_configs("cpu", False, {"max_time": 90})


# the GPU's table, consulted wherever training runs on a CUDA device (none is needed to build the
# configs: the device named, or `has_gpu` for device auto, decides)
GPU_RUNS = [({"device": "cuda"}, False), ({"device": "cuda:1"}, False), ({}, True)]


@pytest.mark.parametrize(("flags", "has_gpu"), GPU_RUNS)
@pytest.mark.parametrize(("max_time", "row"), [("21s", 0), ("34.5s", 0), ("75s", 1), ("804s", 2)])
def test_a_cuda_run_takes_the_gpu_tables_row(flags, has_gpu, max_time, row) -> None:
    model, train = build_configs("auto", has_gpu, {**flags, "max_time": max_time})
    assert settings(model, train) == GPU_TABLE[row].settings()
    assert (model.pos_emb, model.norm, train.optimizer) == ("rope", "rmsnorm", "muon")


def test_the_default_cuda_run_is_the_90_second_row() -> None:
    model, train = build_configs("auto", True)
    assert train.max_time == "75s"  # 90 s of wall time, start-up and estimates included
    assert settings(model, train) == budget_row(75, "gpu").settings()


def test_a_cpu_run_on_a_gpu_machine_takes_the_cpu_table() -> None:
    model, train = build_configs("auto", True, {"device": "cpu", "max_time": "75s"})
    assert settings(model, train) == budget_row(75, "cpu").settings()


@given(
    seconds=st.sampled_from(["20s", "75s", "15m"]),
    dropout=st.sampled_from([0.0, 0.05, 0.3]),
    compile=st.booleans(),
    n_layer=st.integers(1, 8),
)
def test_options_given_win_over_the_gpu_table(seconds, dropout, compile, n_layer) -> None:
    flags = {"max_time": seconds, "dropout": dropout, "compile": compile, "n_layer": n_layer}
    model, train = build_configs("auto", False, {"device": "cuda", **flags})
    assert (model.dropout, train.compile, model.n_layer) == (dropout, compile, n_layer)


def test_the_lab_preset_on_a_gpu_is_still_the_notebooks() -> None:
    model, train = build_configs("lab", True, {"device": "cuda", "max_time": "75s"})
    on_cpu = build_configs("lab", False, {"max_time": "75s"})
    assert (model, dataclasses.replace(train, device="auto")) == on_cpu


def test_the_cuda_header_names_the_gpu_row_and_why() -> None:
    flags = {"device": "cuda", "max_time": "20s", "dropout": 0.3}
    model, train = build_configs("auto", False, flags)
    line = describe_recipe("gpu", model, train, set(flags))
    row = budget_row(20, "gpu")
    assert line.startswith(f"recipe: model {row.n_layer} x {row.n_embd}, batch {row.batch_size} ")
    assert "dropout 0.3" in line and "compiled" not in line
    assert "20s of training: on a CUDA GPU, the row for up to 40 s of docs/gpu.md's table" in line
    assert "not measured yet" in line
    assert line.endswith("given: dropout)")
    model, train = build_configs("auto", False, {"device": "cuda", "max_time": "5m"})
    line = describe_recipe("gpu", model, train, set())
    assert ", compiled (5m of training: on a CUDA GPU, the row for over 150 s" in line
