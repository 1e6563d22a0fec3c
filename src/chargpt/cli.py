"""The `chargpt` command: train, sample, eval. User mistakes print one line, not a traceback."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import torch

from chargpt.checkpoint import (
    CONFIG,
    LAST,
    WEIGHTS,
    load_run,
    load_trainer_state,
    read_run_config,
    remove_stale_temporaries,
    run_configs,
)
from chargpt.config import (
    PRESET_NAMES,
    QUANTIZE_HELP,
    ModelConfig,
    SampleConfig,
    ServeConfig,
    TrainConfig,
    add_dataclass_arguments,
    build_configs,
    from_dict,
    given_fields,
    load_toml,
)
from chargpt.data import CharDataset, load_corpus
from chargpt.device import resolve_device
from chargpt.distributed import close_world
from chargpt.errors import ChargptError
from chargpt.evaluate import evaluate_run
from chargpt.generate import encode_prompt, generate, resolve_seed, stream
from chargpt.quantize import METHODS as QUANTIZE_METHODS
from chargpt.quantize import quantized
from chargpt.train import Trainer, resume_configs


def add_data_arguments(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument(
        "--data",
        default=default,
        help="a UTF-8 text file, a `chargpt prepare` directory, or 'shakespeare' for the "
        "bundled corpus "
        f"(default: {default or 'the data the run was trained on'})",
    )
    parser.add_argument(
        "--encoding-errors",
        choices=("strict", "replace", "ignore"),
        default="strict",
        help="what to do with bytes that are not UTF-8",
    )


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag or value is reported on one line, like every other mistake."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}: see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="chargpt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model and save a run directory")
    run_dir = train.add_mutually_exclusive_group(required=True)
    run_dir.add_argument("--out", type=Path, help="run directory to create")
    run_dir.add_argument(
        "--resume",
        type=Path,
        metavar="RUN",
        help="continue a stopped run exactly where it stopped; only --max-iters, "
        "--eval-interval, --eval-iters, --sample-chars, --device, --dtype, --compile may change",
    )
    add_data_arguments(train, None)
    train.add_argument(
        "--preset",
        default=None,
        choices=PRESET_NAMES,
        help="lab: the notebook's settings; cpu: ~5 min on 2 cores; tiny: seconds; "
        "auto: lab on a GPU, cpu otherwise (default: auto)",
    )
    train.add_argument("--config", type=Path, help="TOML file of options (flags override it)")
    add_dataclass_arguments(train, ModelConfig)
    add_dataclass_arguments(train, TrainConfig)
    train.set_defaults(handler=cmd_train)

    sample = commands.add_parser("sample", help="generate text from a trained run")
    sample.add_argument("--run", required=True, type=Path, help="run directory")
    prompt = sample.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue (default: a newline)")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    sample.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    add_dataclass_arguments(sample, SampleConfig)
    sample.set_defaults(handler=cmd_sample)

    evaluate = commands.add_parser("eval", help="validation loss, bits per character, perplexity")
    evaluate.add_argument("--run", required=True, type=Path, help="run directory")
    add_data_arguments(evaluate, None)
    evaluate.add_argument(
        "--eval-iters",
        type=int,
        default=None,
        help="batches to average (default: the run's eval_iters)",
    )
    evaluate.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="windows per batch (default: the run's batch_size)",
    )
    evaluate.add_argument(
        "--stride",
        type=int,
        default=None,
        help="full pass: characters each window adds, 1..block_size; every character is scored "
        "once with at least block_size - stride + 1 characters of context "
        "(default: block_size // 2; 1 gives each the full context)",
    )
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    evaluate.add_argument(
        "--quantize",
        default="none",
        choices=QUANTIZE_METHODS,
        help=f"{QUANTIZE_HELP} (default: none)",
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(handler=cmd_eval)
    add_compare_and_plot_parsers(commands)
    add_prepare_parser(commands)
    add_attention_parser(commands)
    add_serve_parser(commands)
    return parser


def add_attention_parser(commands: argparse._SubParsersAction) -> None:
    attention = commands.add_parser(
        "attention", help="draw a text's attention weights: every head, or one head large"
    )
    attention.add_argument("--run", required=True, type=Path, help="run directory")
    attention.add_argument(
        "--text", required=True, help="the text to read (at most the model's block_size)"
    )
    attention.add_argument("--out", required=True, type=Path, help="PNG file to write")
    attention.add_argument("--layer", type=int, help="only this layer (from 0)")
    attention.add_argument(
        "--head", type=int, help="only this head (from 0); with --layer: one head, large"
    )
    attention.add_argument(
        "--on-unknown",
        choices=("error", "skip"),
        default="error",
        help="characters the model never saw: error lists them, skip drops them",
    )
    attention.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    attention.set_defaults(handler=cmd_attention)


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
    prepare.add_argument(
        "--encoding-errors",
        choices=("strict", "replace", "ignore"),
        default="strict",
        help="what to do with bytes that are not UTF-8",
    )
    prepare.set_defaults(handler=cmd_prepare)


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="serve a run over HTTP: OpenAI's completions API, continuous batching"
    )
    serve.add_argument("--run", required=True, type=Path, help="run directory")
    add_dataclass_arguments(serve, ServeConfig)
    serve.set_defaults(handler=cmd_serve)


def add_compare_and_plot_parsers(commands: argparse._SubParsersAction) -> None:
    compare = commands.add_parser(
        "compare",
        help="train the bigram and the GPT alike (or take two runs) and write a Markdown report",
    )
    compare.add_argument("--out", required=True, type=Path, help="directory for the report")
    add_data_arguments(compare, None)
    source = compare.add_mutually_exclusive_group()
    source.add_argument("--budget-iters", type=int, help="training steps for each model")
    source.add_argument(
        "--budget-seconds",
        type=float,
        help="seconds of training steps for each model (evaluations not counted); "
        "max_iters still caps the run and lays out the LR schedule",
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
    compare.add_argument("--sample-length", type=int, default=400, help="characters per sample")
    compare.add_argument("--sample-seed", type=int, default=1337, help="seed of both samples")
    compare.add_argument("--stride", type=int, default=None, help="full-pass stride (see eval)")
    add_dataclass_arguments(compare, ModelConfig)
    add_dataclass_arguments(compare, TrainConfig)
    compare.set_defaults(handler=cmd_compare)

    plot = commands.add_parser("plot", help="draw a run's train/val loss curves (loss.png)")
    plot.add_argument("--run", required=True, type=Path, help="run directory")
    plot.add_argument("--out", type=Path, help="PNG file to write (default: RUN/loss.png)")
    plot.set_defaults(handler=cmd_plot)


def check_new_run_dir(out: Path, num_parameters: int) -> None:
    """Never overwrite a user's run; fail before training if the directory cannot be written
    or its disk cannot hold the checkpoints."""
    if (out / CONFIG).exists() or (out / WEIGHTS).exists() or (out / LAST).exists():
        raise ChargptError(
            f"{out} already holds a run: continue it with --resume {out}, or choose another --out"
        )
    if out.exists() and not out.is_dir():
        raise ChargptError(f"--out {out} is a file: choose a directory path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # one per process under torchrun
        probe.write_bytes(b"ok")
        probe.unlink()
        free = shutil.disk_usage(out).free
    except OSError as err:
        raise ChargptError(
            f"cannot write to --out {out} ({err.strerror}): choose another"
        ) from None
    # fp32 weights twice (best, last), two AdamW moments, and a temporary copy while renaming
    needed = 2 * 4 * 4 * num_parameters + 2**20
    if free < needed:
        raise ChargptError(
            f"--out {out} has {free / 2**20:,.1f} MiB free but the run needs about "
            f"{needed / 2**20:,.1f} MiB: free some space or choose another --out"
        )


@contextlib.contextmanager
def removed_if_failed(out: Path) -> Iterator[None]:
    """Directories this command creates are removed again if it fails before writing into them."""
    created = [p for p in (out, *out.parents) if not p.exists()]  # innermost first
    try:
        yield
    except BaseException:
        for path in created:
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume is not None:
        return resume_training(args)
    file_options = load_toml(args.config) if args.config else {}
    flags = given_fields(args, ModelConfig, TrainConfig)
    has_gpu = torch.cuda.is_available()
    model_config, train_config = build_configs(args.preset or "auto", has_gpu, file_options, flags)
    resolve_device(train_config.device)
    data = args.data or "shakespeare"
    dataset, tokenizer, digest = load_corpus(data, args.encoding_errors)
    dataset.check_block_size(model_config.block_size)
    trainer = Trainer(
        model_config, train_config, dataset, tokenizer, args.out, data, data_sha256=digest
    )
    with removed_if_failed(args.out):
        check_new_run_dir(args.out, trainer.model.num_parameters())
        return train_and_report(trainer, dataset)


def resume_training(args: argparse.Namespace) -> int:
    """`train --resume RUN`: the run's own settings, data and state, plus allowed changes."""
    run_dir = args.resume
    if args.preset is not None:
        raise ChargptError("--preset cannot be used with --resume: a resumed run keeps its own")
    config = read_run_config(run_dir)
    model_config, _, tokenizer = run_configs(run_dir, config)
    tensors, state = load_trainer_state(run_dir)
    try:
        saved_train = from_dict(TrainConfig, state["train"])
    except (KeyError, TypeError, ChargptError) as err:
        raise ChargptError(f"{run_dir / LAST} is invalid ({err}): start a new run") from None
    changes = {**(load_toml(args.config) if args.config else {})}
    changes.update(given_fields(args, ModelConfig, TrainConfig))
    model_config, train_config = resume_configs(model_config, saved_train, changes)
    resolve_device(train_config.device)
    if state.get("step", 0) >= train_config.max_iters:
        raise ChargptError(
            f"{run_dir} already ran {state.get('step')} of its {train_config.max_iters} steps: "
            "pass a larger --max-iters to train longer"
        )
    data = args.data or config.get("data") or "shakespeare"
    dataset, _, digest = load_corpus(data, args.encoding_errors, tokenizer)
    if config.get("data_sha256") and digest != config["data_sha256"]:
        raise ChargptError(
            f"corpus {data!r} is not the text {run_dir} was trained on (its SHA-256 differs): "
            "pass the original corpus with --data"
        )
    dataset.check_block_size(model_config.block_size)
    trainer = Trainer(
        model_config, train_config, dataset, tokenizer, run_dir, data, data_sha256=digest
    )
    trainer.restore(tensors, state)
    remove_stale_temporaries(run_dir)
    print(f"resuming {run_dir} at step {trainer.step}", file=sys.stderr)
    return train_and_report(trainer, dataset)


def train_and_report(trainer: Trainer, dataset: CharDataset) -> int:
    """Run the trainer between one line that describes the run and one that sums it up (under
    torchrun, the main process alone prints)."""
    run_dir = trainer.out_dir

    def report(message: str) -> None:
        if trainer.world.is_main:
            print(message, file=sys.stderr)

    report(
        f"training {trainer.model_config.model} ({trainer.model.num_parameters():,} parameters) "
        f"on {trainer.data_name}: {len(dataset.train):,} train / {len(dataset.val):,} val "
        f"characters, vocabulary {trainer.tokenizer.vocab_size}, device {trainer.device}, "
        f"{str(trainer.dtype).removeprefix('torch.')}"
        + (f", {trainer.world.size} processes" if trainer.world.distributed else "")
    )
    try:
        result = trainer.run()
    finally:
        close_world()
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
    device = resolve_device(args.device)
    run = load_run(args.run, device)
    model = quantized(run.model, config.quantize)
    prompt = read_prompt(args)
    shown = run.tokenizer.decode(encode_prompt(run.tokenizer, prompt, config.on_unknown))
    if config.seed == -1:  # say which seed was drawn, so that a good sample can be had again
        config = dataclasses.replace(config, seed=resolve_seed(config.seed))
        print(f"seed {config.seed} (pass --seed {config.seed} to repeat)", file=sys.stderr)
    if config.num_samples == 1:  # one sample: print each character as soon as it exists
        print(shown, end="", flush=True)
        for piece in stream(model, run.tokenizer, prompt, config):
            print(piece.text, end="", flush=True)
        print()
        return 0
    texts = generate(model, run.tokenizer, prompt, config)
    print(("\n" + "-" * 40 + "\n").join(shown + text for text in texts))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    run = load_run(args.run, device)
    run = dataclasses.replace(run, model=quantized(run.model, args.quantize))
    data = args.data or run.meta.get("data") or "shakespeare"
    dataset, _, _ = load_corpus(data, args.encoding_errors, run.tokenizer)
    result = evaluate_run(run, dataset, device, args.batch_size, args.eval_iters, args.stride)
    full = result.full_val
    if args.json:
        # headline figures from the deterministic full pass; details of both methods beside them
        headline = {"val_loss": full.nats, "bits_per_char": full.bits_per_char}
        print(json.dumps({"data": str(data), **headline, **result.to_dict()}))
    else:
        print(f"{data}\n{result.summary()}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from chargpt import compare

    if args.sample_length < 0:
        raise ChargptError(f"--sample-length must not be negative, got {args.sample_length}")
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
        if args.budget_seconds is not None and not args.budget_seconds > 0:
            raise ChargptError(f"--budget-seconds must be positive, got {args.budget_seconds}")
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
            args.budget_seconds,
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
    references = compare.count_references(dataset, tokenizer.vocab_size)
    report = compare.write_report(
        args.out, results, references, str(data), args.prompt, args.sample_seed, command
    )
    print(f"wrote {report} and {args.out / compare.CURVES}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from chargpt.plot import plot_run

    print(f"wrote {plot_run(args.run, args.out)}")
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from chargpt.attention_plot import plot_attention
    from chargpt.inspection import inspect_text

    if not args.out.parent.is_dir():
        raise ChargptError(
            f"--out {args.out}: the directory {args.out.parent} does not exist: create it first"
        )
    run = load_run(args.run, resolve_device(args.device))
    seen = inspect_text(run.model, run.tokenizer, args.text, on_unknown=args.on_unknown)
    print(f"wrote {plot_attention(seen, args.out, args.layer, args.head)}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from chargpt.corpus import BUNDLED, resolve_corpus_path
    from chargpt.prepare import prepare

    paths = [resolve_corpus_path(p) if str(p) in BUNDLED else p for p in args.data]
    info = prepare(paths, args.out, args.glob, args.encoding_errors)
    print(
        f"wrote {args.out}: {info['train_tokens']:,} train / {info['val_tokens']:,} val "
        f"characters from {len(info['sources'])} file(s), vocabulary "
        f"{len(info['tokenizer']['chars'])} ({info['dtype']})\n"
        f"next: chargpt train --data {args.out} --out RUN_DIR"
    )
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ChargptError as err:
        print(f"chargpt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away, as in `chargpt sample | head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second one at exit
        return 128 + signal.SIGPIPE
    except OSError as err:  # e.g. the disk filled up while saving: the previous files are intact
        where = f" ({err.filename})" if err.filename else ""
        print(f"chargpt {args.command}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"chargpt {args.command}: interrupted", file=sys.stderr)
        return 130
