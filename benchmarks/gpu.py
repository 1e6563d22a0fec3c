"""chargpt on one GPU, side by side in one call of under 9 minutes: the default recipe against
nanoGPT's shakespeare_char settings for the same wall time, the step time of each preset, and
decoding with and without CUDA graphs.

Sections run in order (`--sections`); each adds its figures to OUT/results.json (written after
each section) and its table to OUT/gpu.md, and says what it does in OUT/gpu.log:

- `probe`: the start-up matmul timing behind `--dtype auto` (fp32, bf16, fp16 on a GPU) and
  the dtype it chooses (chargpt.model.precision);
- `steps`: milliseconds a training step, in this process, for each preset at its own sizes
  (`lab`, the lab's own code path, `modern`, the GPU default's 90-second row eager and
  compiled, nanoGPT's settings), fused attention unless said, with the compile time of the
  compiled ones (benchmarks/train_step.py's timing);
- `budgets`: for each wall-time budget (`--budgets`, 30 s and 90 s), `chargpt train --device
  DEV --max-time T` as a user runs it against nanoGPT's shakespeare_char settings run by
  chargpt for the same time (T as benchmarks/budget.py sets it: 90% of the budget less 6 s),
  each a fresh process, the wall time from its start to each loss estimate, a full pass over
  the validation split with the best weights afterwards, the issue's goals checked, and the
  curves in OUT/gpu.png;
- `decode`: characters per second of `chargpt sample`'s decoding at batch 1 and 64 and of the
  server's 16 busy slots, the plain step against CUDA graphs, at the lab size with random
  weights, and whether both give the same greedy text (benchmarks/decode.py), last, as
  the deadline allows.

A section is a function of (settings, results) named in SECTIONS, with its table in REPORTS:
another goes in beside them. A run that would end past `--deadline` seconds from the start is
skipped, and says so. `--smoke` runs every section at tiny sizes
with a 7-s budget (0.3 s of training), no samples and no compiling, in seconds on a CPU
(tests/test_gpu_script.py).

    benchmarks/gpu.sh --out DIR                  # on a GPU, about 7 minutes
    benchmarks/gpu.sh --out DIR --device cpu --smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from budget import plot, train_for
from decode import decode_rates, decode_table
from train_step import step_milliseconds

from chargpt.cli.parser import build_parser
from chargpt.config import ModelConfig, TrainConfig, build_configs
from chargpt.config.options import parse_duration
from chargpt.config.sources import given_fields
from chargpt.data.dataset import load_corpus
from chargpt.model.precision import (
    DTYPE_NAMES,
    choose_dtype,
    gpu_matmul_seconds,
    matmul_seconds,
    resolve_device,
    resolve_dtype,
)
from chargpt.training.trainer import Trainer

# nanoGPT's config/train_shakespeare_char.py with its train.py defaults (GELU, tied embeddings,
# weight decay 0.1, clipping at 1, compiled, bf16 where supported: --dtype auto here), the
# cosine following the elapsed fraction of the time instead of 5,000 steps; no samples
NANOGPT = shlex.split(
    "--preset lab --n-layer 6 --n-head 6 --n-embd 384 --block-size 256 --batch-size 64 "
    "--dropout 0.2 --mlp gelu --tie-embeddings --learning-rate 1e-3 --min-lr 1e-4 "
    "--lr-schedule cosine --warmup-iters 100 --beta2 0.99 --weight-decay 0.1 --grad-clip 1 "
    "--compile --eval-iters 200 --eval-interval 250 --sample-chars 0"
)
RECIPES = {"default": [], "nanogpt": NANOGPT}
STEP_SETTINGS = {
    "lab": ["--preset", "lab"],
    "lab, its own code (reference heads, fp32)": shlex.split(
        "--preset lab --attention reference --dtype fp32"
    ),
    "modern": ["--preset", "modern"],
    "gpu default (90-s row)": ["--max-time", "75s"],
    "gpu default (90-s row), compiled": ["--max-time", "75s", "--compile"],
    "nanogpt (compiled)": NANOGPT,
}
# the goals for the default: best val (lab estimate) within so many seconds of wall time
GOALS = {30.0: 1.50, 45.0: 1.46, 90.0: 1.45}
# the decoding issue's goals at the lab size: characters per second with CUDA graphs
DECODE_GOALS = {"batch 1": 2_000, "batch 64": 60_000}
SMOKE_SIZES = shlex.split(
    "--n-layer 1 --n-embd 32 --n-head 2 --block-size 16 --batch-size 4 --eval-iters 2 "
    "--eval-interval 50 --sample-chars 0 --no-compile"
)


class Bench:
    """What every section shares: the settings, the clock since the start and the log."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.start = args, time.perf_counter()
        self.device = resolve_device(args.device)
        self.out: Path = args.out
        self.extra = SMOKE_SIZES if args.smoke else []  # after a recipe's flags: they win

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, message: str) -> None:
        line = f"[{self.elapsed:5.0f} s] {message}"
        print(line, flush=True)
        with (self.out / "gpu.log").open("a", encoding="utf-8") as log:
            log.write(line + "\n")

    def time_left(self, seconds: float, what: str) -> bool:
        """Whether `what`, taking about `seconds`, ends before the deadline (else it says so)."""
        if self.elapsed + seconds <= self.args.deadline:
            return True
        self.say(f"skipped {what}: it would end past the {self.args.deadline:g}-s deadline")
        return False

    def flags(self, recipe: list[str]) -> list[str]:
        return [*recipe, "--device", self.args.device, *self.extra]


def configs(flags: list[str]) -> tuple[ModelConfig, TrainConfig]:
    """The configs `chargpt train FLAGS` would build."""
    args = build_parser().parse_args(["train", "--out", "unused", *flags])
    changes = given_fields(args, ModelConfig, TrainConfig)
    return build_configs(args.preset or "auto", torch.cuda.is_available(), changes)


def probe_section(bench: Bench) -> dict[str, Any]:
    device = bench.device
    seconds = gpu_matmul_seconds(device) if device.type == "cuda" else matmul_seconds()
    chosen = DTYPE_NAMES[choose_dtype(seconds)]
    ms = {DTYPE_NAMES[dtype]: 1e3 * value for dtype, value in seconds.items()}
    bench.say(f"probe: {chosen} ({', '.join(f'{name} {t:.3f} ms' for name, t in ms.items())})")
    return {"ms": ms, "chosen": chosen}


def steps_section(bench: Bench) -> dict[str, Any]:
    dataset, tokenizer, _ = load_corpus("shakespeare")
    trainers, rows = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe in STEP_SETTINGS.items():
            model, train = configs(bench.flags(recipe))
            bench.say(f"steps: building {name}")
            trainer = Trainer(model, train, dataset, tokenizer, Path(tmp) / str(len(trainers)))
            trainers[name] = trainer
            rows[name] = {
                "model": f"{model.n_layer} x {model.n_embd}",
                "batch": f"{train.batch_size} x {model.block_size}",
                "dtype": DTYPE_NAMES[trainer.dtype],
                "compile_s": round(trainer.compile_seconds, 1),
                "compiled": trainer.forward is not trainer.model,
            }
        rounds, steps = (2, 3) if bench.args.smoke else (3, 20)
        bench.say(f"steps: timing {len(trainers)} settings, {rounds} rounds of {steps} steps")
        times = step_milliseconds(trainers, rounds, steps)
    for name, ms in times.items():
        rows[name].update(ms_min=round(min(ms), 2), ms_median=round(statistics.median(ms), 2))
        bench.say(f"steps: {name}: {min(ms):.1f} ms a step")
    return rows


def decode_section(bench: Bench) -> dict[str, Any]:
    """`chargpt sample`'s and the server's decoding at the lab size (random weights), plain
    step against CUDA graphs (benchmarks/decode.py), with the issue's goals checked."""
    if not bench.time_left(60, "decode"):
        return {}
    dtype = resolve_dtype("auto", bench.device)
    bench.say(f"decode: {DTYPE_NAMES[dtype]}, plain step and CUDA graphs in turns")
    result = decode_rates(bench.device, dtype, quick=bench.args.smoke)
    rates = result["chars_per_s"]
    result.update(dtype=DTYPE_NAMES[dtype], smoke=bench.args.smoke)
    result["goals"] = [
        dict(case=case, goal=goal, graphs=rates[case]["graphs"], met=rates[case]["graphs"] >= goal)
        for case, goal in DECODE_GOALS.items()
    ]
    for case, rate in rates.items():
        bench.say(f"decode: {case}: {rate['plain']:,.0f} plain, {rate['graphs']:,.0f} graphs")
    return result


def budgets_section(bench: Bench) -> dict[str, Any]:
    rows = []
    for budget in bench.args.budgets.split(","):
        for recipe, recipe_flags in RECIPES.items():
            seconds = parse_duration(budget)
            if not bench.time_left(seconds + 10, f"{recipe} for {budget}"):
                continue
            bench.say(f"budgets: {recipe} for {budget} of wall time")
            out = bench.out / "runs" / f"{recipe}-{budget}"
            flags, device = bench.flags(recipe_flags), bench.args.device
            full_pass = 2000 if bench.args.smoke else None  # characters; None: all
            row = train_for(budget, recipe, flags, "shakespeare", out, None, device, full_pass)
            rows.append(row)
            bench.say(
                f"budgets: {recipe} {budget}: {row['steps']} steps in {row['wall_s']} s, best val "
                f"{row['best_val']}, full pass {row['full_val']}"
            )
    plot(rows, bench.out / "gpu.png")
    return {"rows": rows, "goals": goals(rows)}


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal against the default's best estimate within its seconds of wall time, read
    from the curve of the shortest budget that lasts that long."""
    checked = []
    defaults = sorted(
        (r for r in rows if r["recipe"] == "default"), key=lambda r: parse_duration(r["budget"])
    )
    for within, target in GOALS.items():
        row = next((r for r in defaults if parse_duration(r["budget"]) >= within), None)
        if row is None:
            continue
        losses = [loss for at, loss in row["curve"] if at <= within]
        best = min(losses) if losses else None
        met = best is not None and best <= target
        checked.append(dict(budget=row["budget"], within_s=within, goal=target, best=best, met=met))
    return checked


def probe_report(result: dict[str, Any]) -> list[str]:
    fp32 = result["ms"]["fp32"]
    lines = [
        "## The precision probe",
        "",
        "| dtype | matmul ms | speed vs fp32 |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {ms:.3f} | {fp32 / ms:.2f}x |" for name, ms in result["ms"].items()]
    return [*lines, "", f"`--dtype auto` chooses **{result['chosen']}**."]


def steps_report(result: dict[str, Any]) -> list[str]:
    lines = [
        "## Step time",
        "",
        "| setting | model | batch x context | dtype | ms a step (min) | median | compile s |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for name, r in result.items():
        compiled = f"{r['compile_s']:.1f}" if r["compiled"] else "-"
        lines.append(
            f"| {name} | {r['model']} | {r['batch']} | {r['dtype']} | {r['ms_min']:.1f} "
            f"| {r['ms_median']:.1f} | {compiled} |"
        )
    return lines


def budgets_report(result: dict[str, Any]) -> list[str]:
    lines = [
        "## The best model in N seconds of wall time",
        "",
        "| budget | recipe | --max-time | steps | wall s | best val (estimate) | at s "
        "| full-pass val |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        at = next((s for s, loss in r["curve"] if round(loss, 4) == r["best_val"]), None)
        lines.append(
            f"| {r['budget']} | {r['recipe']} | {r['max_time']} | {r['steps']} | {r['wall_s']} "
            f"| {r['best_val']:.4f} | {'-' if at is None else f'{at:.0f}'} | {r['full_val']:.4f} |"
        )
    lines += ["", "| goal (default) | run | best val by then | met |", "|---|---|---:|---|"]
    for g in result["goals"]:
        best = "-" if g["best"] is None else f"{g['best']:.4f}"
        lines.append(
            f"| <= {g['goal']:.2f} within {g['within_s']:g} s | {g['budget']} | {best} "
            f"| {'yes' if g['met'] else 'no'} |"
        )
    return [*lines, "", "![val loss against wall time](gpu.png)"]


def decode_report(result: dict[str, Any]) -> list[str]:
    if not result:
        return ["## Decoding", "", "Skipped: it would have ended past the deadline."]
    size = "a tiny model (--smoke)" if result["smoke"] else "the lab size"
    lines = ["## Decoding", "", f"{size}, {result['dtype']}.", "", *decode_table(result)]
    lines += ["", "| goal (CUDA graphs) | chars/s | met |", "|---|---:|---|"]
    for g in result["goals"]:
        met = "yes" if g["met"] else "no"
        lines.append(f"| {g['case']} >= {g['goal']:,} chars/s | {g['graphs']:,.0f} | {met} |")
    return lines


SECTIONS: dict[str, Callable[[Bench], Any]] = {
    "probe": probe_section,
    "steps": steps_section,
    "budgets": budgets_section,
    "decode": decode_section,
}
REPORTS: dict[str, Callable[[Any], list[str]]] = {
    "probe": probe_report,
    "steps": steps_report,
    "budgets": budgets_report,
    "decode": decode_report,
}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        return f"{name} (compute capability {major}.{minor}), CUDA {torch.version.cuda}"
    return f"{platform.processor() or platform.machine()} (no GPU)"


def write_report(results: dict[str, Any], out: Path) -> None:
    lines = [
        f"Measured on {results['machine']}, torch {results['torch']}, {results['date']} "
        f"(`benchmarks/gpu.sh{' --smoke' if results['smoke'] else ''}`).",
    ]
    for name, result in results["sections"].items():
        lines += ["", *REPORTS[name](result)]
    (out / "gpu.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the results")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N (cpu for --smoke)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--budgets", default="30s,90s", help="wall-time budgets")
    parser.add_argument("--deadline", type=float, default=510, help="seconds for everything")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds on a CPU")
    args = parser.parse_args()
    if args.smoke:
        args.budgets = "7s"
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    date = datetime.date.today().isoformat()
    results = {"machine": machine(bench.device), "torch": torch.__version__, "date": date}
    results.update(smoke=args.smoke, command=sys.argv[1:], sections={})
    bench.say(f"{results['machine']}: sections {args.sections}, out {args.out}")
    for name in args.sections.split(","):
        results["sections"][name] = SECTIONS[name](bench)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n", "utf-8")
        write_report(results, args.out)
    bench.say(f"done: {args.out / 'gpu.md'}")
    print((args.out / "gpu.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
