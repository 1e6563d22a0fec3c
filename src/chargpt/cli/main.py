"""The `chargpt` command: train, sample, eval, compare, plot, prepare. A thin shell over the
package's functions; user mistakes print one line, not a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Iterator

import torch

from chargpt.cli.export_commands import cmd_export, onnxruntime_run, onnxruntime_sampler
from chargpt.cli.parser import build_parser
from chargpt.cli.shell import cmd_prepare, run_command
from chargpt.cli.train_command import cmd_train
from chargpt.config import (
    MAX_SEED,
    ModelConfig,
    SampleConfig,
    ServeConfig,
    TrainConfig,
    from_dict,
)
from chargpt.config.presets import build_configs
from chargpt.config.sources import given_fields, load_toml
from chargpt.data.dataset import load_corpus
from chargpt.errors import ChargptError
from chargpt.eval import compare
from chargpt.eval.counts import count_references
from chargpt.eval.evaluate import evaluate_run
from chargpt.generation.generate import TextPiece, encode_prompt, resolve_seed, stream
from chargpt.generation.speed import Job, Work, pytorch_job, slower_note
from chargpt.model.gpt import GPTLanguageModel
from chargpt.model.precision import resolve_device
from chargpt.model.quantize import quantized
from chargpt.runs.directory import Run, load_run, read_run_config
from chargpt.viz.plot import plot_run


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
    work = Work(rows=config.num_samples)
    if args.backend == "onnxruntime":
        graph, sampler = onnxruntime_sampler(args, config)
        tokenizer = graph.tokenizer
        note_if_slower("--backend onnxruntime", graph.job(work), load_run(args.run, "cpu"), work)
    else:
        run = load_run(args.run, resolve_device(args.device))
        model, tokenizer = quantized(run.model, config.quantize), run.tokenizer
        if model is not run.model:
            note_if_slower(f"--quantize {config.quantize}", pytorch_job(model, work), run, work)

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


def note_if_slower(asked: str, job: Job, fp32: Run, work: Work) -> None:
    """One line on stderr where what the user asked for runs slower here than fp32 PyTorch."""
    if isinstance(fp32.model, GPTLanguageModel):
        note = slower_note(asked, job, pytorch_job(fp32.model, work), work)
        if note:
            print(note, file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> int:
    device = torch.device("cpu") if args.backend == "onnxruntime" else resolve_device(args.device)
    fp32 = load_run(args.run, device)
    work = Work(scoring=True)
    if args.backend == "onnxruntime":
        run = onnxruntime_run(args, fp32)
        note_if_slower("--backend onnxruntime", run.model.onnx.job(work), fp32, work)
    else:
        run = dataclasses.replace(fp32, model=quantized(fp32.model, args.quantize))
        if run.model is not fp32.model:
            note_if_slower(f"--quantize {args.quantize}", pytorch_job(run.model, work), fp32, work)
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
