import dataclasses

import pytest

from chargpt.cli.parser import build_parser
from chargpt.config import MAX_SEED, LoadConfig, ModelConfig, TrainConfig
from chargpt.config.presets import PRESETS, build_configs
from chargpt.config.sources import given_fields, load_toml
from chargpt.errors import ChargptError


def test_lab_preset_is_the_notebooks_settings():
    model, train = build_configs("lab", has_gpu=False)
    assert (train.batch_size, model.block_size, model.n_embd) == (64, 256, 384)
    assert (model.n_head, model.n_layer, model.dropout) == (6, 6, 0.2)
    assert (train.learning_rate, train.lr_schedule, train.max_iters) == (3e-4, "constant", 5000)
    assert (train.warmup_iters, train.grad_clip) == (0, 0.0)


def test_auto_preset_picks_gpu_on_gpu_and_cpu_otherwise():
    assert build_configs("auto", has_gpu=True) == build_configs("gpu", has_gpu=True)
    assert build_configs("auto", has_gpu=False) == build_configs("cpu", has_gpu=False)


@pytest.mark.parametrize(
    ("has_gpu", "device", "preset"),
    [(True, "cpu", "cpu"), (True, "cuda:1", "gpu"), (False, "cuda", "gpu"), (True, "mps", "cpu")],
)
def test_auto_preset_follows_the_device_training_runs_on(has_gpu, device, preset):
    """--device cpu on a GPU host trains the cpu preset, not the GPU's."""
    flags = {"device": device}
    assert build_configs("auto", has_gpu, flags) == build_configs(preset, has_gpu, flags)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_is_valid(preset):
    build_configs(preset, has_gpu=False)


def test_later_layers_override_earlier_ones():
    model, train = build_configs("tiny", False, {"n_embd": 48, "max_iters": 7}, {"max_iters": 9})
    assert model.n_embd == 48 and train.max_iters == 9
    assert model.n_layer == PRESETS["tiny"]["n_layer"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"n_embd": 30, "n_head": 4}, r"n_embd \(30\) must be divisible by n_head \(4\)"),
        ({"n_layer": 0}, "n_layer must be a positive integer"),
        ({"block_size": -1}, "block_size must be a positive integer"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"max_iters": 0}, "max_iters must be a positive integer"),
        ({"learning_rate": 0.0}, "learning_rate must be a positive"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"grad_clip": -1.0}, "grad_clip must be"),
        ({"lr_schedule": "linear"}, "lr_schedule must be one of constant, cosine"),
        ({"n_embd": "wide"}, "n_embd must be of type int"),
        ({"n_embdd": 3}, r"unknown option\(s\) n_embdd"),
        ({"min_lr": 0.1}, r"min_lr \(0.1\) exceeds learning_rate \(0.01\): pass a --min-lr"),
        ({"warmup_iters": 61}, r"warmup_iters \(61\) exceeds max_iters \(60\)"),
        ({"warmup_iters": 5, "lr_decay_iters": 4}, r"warmup_iters \(5\) exceeds lr_decay_iters"),
        ({"log_interval": 0}, "log_interval must be a positive integer"),
        ({"grad_accum": -1}, "grad_accum must not be negative"),
        ({"seed": 2**64}, r"seed must be at most 9223372036854775807, got 1844"),
        ({"batch_size": 2**64}, r"batch_size must be at most 9223372036854775807"),
        ({"seed": -1}, r"seed must be an integer in 0\.\.9223372036854775807"),
    ],
)
def test_impossible_settings_fail_with_one_line(override, message):
    with pytest.raises(ChargptError, match=message) as err:
        build_configs("tiny", False, override)
    assert "\n" not in str(err.value)


def test_every_field_has_a_cli_flag_and_flags_override():
    parser = build_parser()
    flags = ["--n-embd", "64", "--no-compile", "--lr-schedule", "cosine", "--learning-rate", "1e-3"]
    args = parser.parse_args(["train", "--out", "x", *flags])
    assert given_fields(args, ModelConfig, TrainConfig) == {
        "n_embd": 64,
        "compile": False,
        "lr_schedule": "cosine",
        "learning_rate": 1e-3,
    }
    help_text = parser._subparsers._group_actions[0].choices["train"].format_help()
    for cls in (ModelConfig, TrainConfig):
        for field in dataclasses.fields(cls):
            assert "--" + field.name.replace("_", "-") in help_text


@pytest.mark.parametrize(
    ("command", "name"),
    [
        ("sample", "device"),
        ("eval", "device"),
        ("attention", "device"),
        ("train", "encoding_errors"),
        ("eval", "encoding_errors"),
        ("compare", "encoding_errors"),
        ("prepare", "encoding_errors"),
    ],
)
def test_load_flags_are_made_from_load_config(command, name):
    """--device and --encoding-errors: LoadConfig's help, choices and default in every command."""
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    action = next(a for a in parser._actions if a.dest == name)
    field = next(f for f in dataclasses.fields(LoadConfig) if f.name == name)
    assert action.default == field.default and action.help.startswith(field.metadata["help"])
    if name == "encoding_errors":
        assert tuple(action.choices) == ("strict", "replace", "ignore")


def test_help_gives_each_presets_default():
    """--help names the values the presets give, not only the dataclass defaults (the lab's)."""
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    help_text = " ".join(train.format_help().split())
    assert "(default by --preset: lab 384, cpu 128, gpu 384, modern 384, tiny 32)" in help_text
    assert "(default by --preset: lab 5000, cpu 5000, gpu 5000, modern 5000, tiny 60)" in help_text
    max_time = "(default by --preset: lab off, cpu 270s, gpu 75s, modern off, tiny off)"
    assert max_time in help_text
    assert "(default: 1337)" in help_text  # --seed: the same in every preset


def test_toml_accepts_flat_keys_and_tables(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("n_layer = 3\n[model]\nn_embd = 64\n[train]\nlearning_rate = 1\n")
    values = load_toml(path)
    assert values == {"n_layer": 3, "n_embd": 64, "learning_rate": 1}
    model, train = build_configs("tiny", False, values)
    assert (model.n_layer, model.n_embd, train.learning_rate) == (3, 64, 1.0)


def test_bad_toml_is_a_one_line_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("n_layer = = 3\n")
    with pytest.raises(ChargptError, match="not valid TOML"):
        load_toml(path)


def test_a_step_count_given_replaces_a_presets_time_budget():
    _, by_time = build_configs("cpu", False)
    _, by_steps = build_configs("cpu", False, {"max_iters": 900})
    _, both = build_configs("cpu", False, {"max_iters": 900}, {"max_time": "1m"})
    assert (by_time.max_time, by_steps.max_time, by_steps.max_iters) == ("270s", "", 900)
    assert both.max_time == "1m"


@pytest.mark.parametrize(
    ("preset", "given", "warmup"),
    [
        ("cpu", {"max_iters": 50}, 5),  # the preset's 100 steps: a tenth of a 50-step run
        ("cpu", {"max_iters": 3}, 0),
        ("cpu", {"max_iters": 5000}, 100),  # a long run keeps the preset's warmup
        ("cpu", {}, 100),  # a time budget: its steps are unknown, the warmup stays
        ("cpu", {"max_iters": 900, "lr_decay_iters": 300}, 30),  # the schedule's steps
        ("tiny", {"max_iters": 6, "lr_decay_iters": 12}, 1),  # the same when resumed to 12
        ("cpu", {"max_iters": 50, "lr_decay_iters": 2000}, 50),  # never longer than the run
        ("tiny", {"max_iters": 20}, 2),
        ("lab", {"max_iters": 10}, 0),
        ("cpu", {"max_iters": 50, "warmup_iters": 50}, 50),  # given: kept as it is
    ],
)
def test_a_presets_warmup_fits_a_short_run(preset, given, warmup):
    _, train = build_configs(preset, False, given)
    assert train.warmup_iters == warmup


def test_a_warmup_given_longer_than_the_run_is_still_an_error():
    with pytest.raises(ChargptError, match=r"warmup_iters \(100\) exceeds max_iters \(50\)"):
        build_configs("cpu", False, {"max_iters": 50}, {"warmup_iters": 100})


def test_a_seed_past_the_bound_is_refused_by_the_config_itself():
    """A TrainConfig made in Python (no from_dict) checks its seed too: seed + k must fit."""
    with pytest.raises(ChargptError, match=r"seed must be an integer in 0\.\.9223372036854775807"):
        TrainConfig(seed=MAX_SEED + 1).validate()
