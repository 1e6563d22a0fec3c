"""The `chargpt` command line: its commands, flags and help texts (what each command does is in
chargpt.cli.main). The options' flags are made from the config dataclasses."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn

from chargpt.config import (
    QUANTIZE_HELP,
    LoadConfig,
    ModelConfig,
    SampleConfig,
    ServeConfig,
    TrainConfig,
)
from chargpt.config.presets import PRESET_NAMES, PRESETS
from chargpt.config.sources import INT64_MAX, add_dataclass_arguments, add_plain_options

DESCRIPTION = "Train, sample, evaluate and compare character-level GPT language models."


def add_data_arguments(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument(
        "--data",
        default=default,
        help="a UTF-8 text file, a `chargpt prepare` directory, or 'shakespeare' for the "
        "bundled corpus "
        f"(default: {default or 'the data the run was trained on'})",
    )
    add_plain_options(parser, LoadConfig, "encoding_errors")


def int64(text: str) -> int:
    """argparse type: an integer that PyTorch can take as a size, a count or a seed."""
    value = int(text)  # a ValueError is argparse's "invalid int64 value"
    if value > INT64_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {INT64_MAX}, got {value}")
    return value


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag or value is reported on one line, like every other mistake."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}: see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    # imported here, so that `prepare` can use this module without importing PyTorch
    from chargpt.model.quantize import METHODS as QUANTIZE_METHODS
    from chargpt.training.resume import RESUMABLE_OPTIONS

    parser = OneLineErrorParser(prog="chargpt", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model and save a run directory")
    run_dir = train.add_mutually_exclusive_group(required=True)
    run_dir.add_argument("--out", type=Path, help="run directory to create")
    run_dir.add_argument(
        "--resume",
        type=Path,
        metavar="RUN",
        help="continue a stopped run exactly where it stopped; only "
        + ", ".join("--" + name.replace("_", "-") for name in RESUMABLE_OPTIONS)
        + " may change",
    )
    add_data_arguments(train, None)
    train.add_argument(
        "--preset",
        default=None,
        choices=PRESET_NAMES,
        help="lab: the notebook's settings; cpu: a 5-minute budget on 2 cores with rope, "
        "rmsnorm, muon and EMA (the options that won an ablation at that budget); modern: lab "
        "sizes with those options (for GPUs); tiny: seconds; "
        "auto: lab when training on a CUDA GPU, cpu otherwise (default: auto)",
    )
    train.add_argument("--config", type=Path, help="TOML file of options (flags override it)")
    add_dataclass_arguments(train, ModelConfig, PRESETS)
    add_dataclass_arguments(train, TrainConfig, PRESETS)

    sample = commands.add_parser("sample", help="generate text from a trained run")
    sample.add_argument("--run", required=True, type=Path, help="run directory")
    prompt = sample.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue (default: a newline)")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    add_plain_options(sample, LoadConfig, "device", "backend", "onnx")
    add_dataclass_arguments(sample, SampleConfig)

    evaluate = commands.add_parser("eval", help="validation loss, bits per character, perplexity")
    evaluate.add_argument("--run", required=True, type=Path, help="run directory")
    add_data_arguments(evaluate, None)
    evaluate.add_argument(
        "--eval-iters",
        type=int64,
        default=None,
        help="batches to average (default: the run's eval_iters)",
    )
    evaluate.add_argument(
        "--batch-size",
        type=int64,
        default=None,
        help="windows per batch (default: the run's batch_size)",
    )
    evaluate.add_argument(
        "--stride",
        type=int64,
        default=None,
        help="full pass: characters each window adds, 1..block_size; every character is scored "
        "once with at least block_size - stride + 1 characters of context "
        "(default: block_size // 2; 1 gives each the full context)",
    )
    evaluate.add_argument(
        "--max-chars",
        type=int64,
        default=None,
        help="full pass: score only the first MAX_CHARS validation characters (default: all)",
    )
    add_plain_options(evaluate, LoadConfig, "device")
    evaluate.add_argument(
        "--quantize",
        default="none",
        choices=QUANTIZE_METHODS,
        help=f"{QUANTIZE_HELP} (default: none)",
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    add_plain_options(evaluate, LoadConfig, "backend", "onnx")
    add_compare_and_plot_parsers(commands)
    add_prepare_parser(commands)
    add_attention_parser(commands)
    add_serve_parser(commands)
    add_export_parser(commands)
    return parser


def add_prepare_parser(commands: argparse._SubParsersAction) -> None:
    prepare = commands.add_parser(
        "prepare", help="stream large text corpora into memory-mapped train/val token arrays"
    )
    prepare.add_argument(
        "--data",
        required=True,
        action="append",
        type=Path,
        help="a text file or a directory to recurse into (repeatable)",
    )
    prepare.add_argument("--out", required=True, type=Path, help="data directory to create")
    prepare.add_argument(
        "--glob", default="*.txt", help="which files to take from directories (default: *.txt)"
    )
    add_plain_options(prepare, LoadConfig, "encoding_errors")


def add_compare_and_plot_parsers(commands: argparse._SubParsersAction) -> None:
    compare = commands.add_parser(
        "compare",
        help="train the bigram and the GPT alike (or take two runs) and write a Markdown report",
    )
    compare.add_argument("--out", required=True, type=Path, help="directory for the report")
    add_data_arguments(compare, None)
    source = compare.add_mutually_exclusive_group()
    source.add_argument("--budget-iters", type=int64, help="training steps for each model")
    source.add_argument(
        "--budget-seconds",
        type=float,
        help="seconds of training steps for each model (evaluations not counted): "
        "--max-time S, the LR schedule following the elapsed fraction of it",
    )
    source.add_argument(
        "--runs", nargs=2, type=Path, metavar=("RUN_A", "RUN_B"), help="compare two trained runs"
    )
    compare.add_argument(
        "--preset", default="auto", choices=PRESET_NAMES, help="settings for both (default: auto)"
    )
    compare.add_argument(
        "--bigram-learning-rate",
        type=float,
        default=1e-2,
        help="the bigram's peak learning rate (its min_lr scales alike); a lookup table needs a "
        "higher one than the GPT to converge in the same budget (default: 1e-2)",
    )
    compare.add_argument("--config", type=Path, help="TOML file of options (flags override it)")
    compare.add_argument("--prompt", default="\n", help="prompt of both samples (default: newline)")
    compare.add_argument("--sample-length", type=int64, default=400, help="characters per sample")
    compare.add_argument("--sample-seed", type=int64, default=1337, help="seed of both samples")
    compare.add_argument("--stride", type=int64, default=None, help="full-pass stride (see eval)")
    add_dataclass_arguments(compare, ModelConfig, PRESETS)
    add_dataclass_arguments(compare, TrainConfig, PRESETS)

    plot = commands.add_parser("plot", help="draw a run's train/val loss curves (loss.png)")
    plot.add_argument("--run", required=True, type=Path, help="run directory")
    plot.add_argument("--out", type=Path, help="PNG file to write (default: RUN/loss.png)")


def add_attention_parser(commands: argparse._SubParsersAction) -> None:
    attention = commands.add_parser(
        "attention", help="draw a text's attention weights: every head, or one head large"
    )
    attention.add_argument("--run", required=True, type=Path, help="run directory")
    attention.add_argument(
        "--text", required=True, help="the text to read (at most the model's block_size)"
    )
    attention.add_argument("--out", required=True, type=Path, help="PNG file to write")
    attention.add_argument("--layer", type=int64, help="only this layer (from 0)")
    attention.add_argument(
        "--head", type=int64, help="only this head (from 0); with --layer: one head, large"
    )
    attention.add_argument(
        "--on-unknown",
        choices=("error", "skip"),
        default="error",
        help="characters the model never saw: error lists them, skip drops them",
    )
    add_plain_options(attention, LoadConfig, "device")


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="serve a run over HTTP: OpenAI's completions API, continuous batching"
    )
    serve.add_argument("--run", required=True, type=Path, help="run directory")
    add_dataclass_arguments(serve, ServeConfig)


def add_export_parser(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export", help="the model as an ONNX file, or as a static web page that runs it"
    )
    export.add_argument("--run", required=True, type=Path, help="run directory")
    export.add_argument(
        "--format",
        choices=("onnx", "web"),
        default="onnx",
        help="onnx: one .onnx file (prefill and decode step, KV cache as inputs and outputs); "
        "web: a static folder for any web server, the model run by onnxruntime-web "
        "(default: onnx)",
    )
    export.add_argument(
        "--out", required=True, type=Path, help="the .onnx file, or the site folder to create"
    )
    export.add_argument(
        "--ort-dir",
        type=Path,
        help="web: a folder with onnxruntime-web's ort.min.js and "
        "ort-wasm-simd-threaded.jsep.{mjs,wasm} (its dist/ folder; default: fetch them once "
        "with npm into the user cache)",
    )
