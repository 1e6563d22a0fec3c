"""The best model in N minutes: chargpt's default recipe against nanoGPT's CPU settings.

For each wall-time budget (start-up, evaluations and the closing sample included), runs
`chargpt train --max-time T` in a subprocess, with T = 90% of the budget less 6 s (start-up,
estimates and the closing sample take the rest; 264 s of five minutes), natively and under an
AVX2-only emulation (`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`, where bf16 matmuls are
~100x slower than fp32). Two recipes, both run by chargpt for the same time:

- `default`: `chargpt train` as a user runs it (the `cpu` preset, its recipe fitted to the budget);
- `nanogpt`: nanoGPT's README settings for a CPU (4x128, context 64, batch 12, AdamW 1e-3 cosine
  to 1e-4, warmup 100, GELU, fp32, 20-batch estimates every 250 steps), the cosine following the
  elapsed fraction of the budget instead of 2,000 steps.

Each row keeps the best lab-style estimate of the val loss (what the run reports), a full pass
over the validation split with the best weights (untimed, after the run), the steps, the wall
time and the val curve against wall time. Rows go to `--out`/results.json as they finish (a rerun
replaces the rows it measures), then budget.md (the table) and budget.png (the curves).

    python benchmarks/budget.py --out docs/results/budget                  # ~90 minutes
    python benchmarks/budget.py --out /tmp/b --budgets 90s --isas native --recipes default
    python benchmarks/budget.py --out docs/results/budget --report         # table and plot only
    python benchmarks/budget.py --out /tmp/g --device cuda --isas native --budgets 30s,90s \
        --recipes default --variant 'd1=--dropout 0.1'                    # fitting the GPU's table

`train_for` (one budget, any flags) is what benchmarks/gpu.py runs on a GPU too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from chargpt.config.options import parse_duration
from chargpt.data.dataset import load_corpus
from chargpt.eval.evaluate import evaluate_run
from chargpt.runs.directory import load_run
from chargpt.runs.metrics import read_metrics
from chargpt.viz.plot import new_figure, save_figure

TRAINING_SHARE, START_UP = 0.9, 6.0  # --max-time is 90% of the wall budget less 6 s
RECIPES: dict[str, list[str]] = {
    "default": [],
    "nanogpt": shlex.split(
        "--preset lab --n-layer 4 --n-head 4 --n-embd 128 --block-size 64 --batch-size 12 "
        "--dropout 0 --mlp gelu --learning-rate 1e-3 --min-lr 1e-4 --lr-schedule cosine "
        "--warmup-iters 100 --beta2 0.99 --weight-decay 0.1 --grad-clip 1 --tie-embeddings "
        "--dtype fp32 --eval-iters 20 --eval-interval 250"
    ),
}
ISAS = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}


def run_once(
    budget: str, recipe: str, isa: str, data: str, workdir: Path, device: str = "cpu"
) -> dict[str, Any]:
    """Train one recipe for one budget under one CPU ISA, on `device` (see train_for)."""
    out = workdir / f"{recipe}-{isa}-{budget}"
    env = {**os.environ, **ISAS[isa]}
    flags = [*RECIPES[recipe], *(["--device", device] if device != "cpu" else [])]
    row = train_for(budget, recipe, flags, data, out, env, device)
    print(
        f"{budget} {recipe} {isa}: {row['steps']} steps in {row['wall_s']} s, "
        f"best val {row['best_val']}, full-pass val {row['full_val']}",
        flush=True,
    )
    return {**row, "isa": isa}


def train_for(
    budget: str,
    recipe: str,
    flags: list[str],
    data: str,
    out: Path,
    env: dict[str, str] | None = None,
    device: str = "cpu",
    full_pass_chars: int | None = None,
) -> dict[str, Any]:
    """Train `chargpt train FLAGS` for one wall-time budget in a subprocess into `out` (its output
    in OUT.log beside it); the val curve is stamped with wall time as the estimates appear, the
    run's header lines are kept, and the best weights get a full pass over the validation split
    (or its first `full_pass_chars` characters) on `device` afterwards."""
    max_time = f"{TRAINING_SHARE * parse_duration(budget) - START_UP:g}s"
    command = [sys.executable, "-m", "chargpt", "train", "--data", data, "--out", str(out)]
    command += ["--max-time", max_time, *flags]
    curve: list[tuple[float, float]] = []
    header, notes, lines = "", [], []
    start = time.perf_counter()
    output = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with subprocess.Popen(command, env=env, **output) as process:
        assert process.stdout is not None
        for line in process.stdout:  # a line per estimate (tqdm's \r ends lines too): stamp it
            lines.append(line)
            if line.startswith("step ") and "val loss" in line:
                curve.append((time.perf_counter() - start, float(line.rsplit(" ", 1)[1])))
            elif line.startswith("recipe:"):
                header = line.strip()
            elif line.startswith(("training ", "torch.compile")):
                notes.append(line.strip())
    wall = time.perf_counter() - start
    log = out.parent / f"{out.name}.log"
    log.write_text("".join(lines), encoding="utf-8")
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed with exit code {process.returncode}: {log}")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    dataset, _, _ = load_corpus(data)
    on = torch.device(device)
    full = evaluate_run(load_run(out, on), dataset, on, max_chars=full_pass_chars)
    row = {"budget": budget, "recipe": recipe, "max_time": max_time}
    steps = read_metrics(out)[-1]["step"]  # config.json's step is the best weights'
    row.update(wall_s=round(wall, 1), steps=steps, best_step=config["step"], header=header)
    row.update(notes=notes)
    row.update(best_val=round(config["best_val_loss"], 4), full_val=round(full.full_val.nats, 4))
    row.update(model=config["model"], train=config["train"], curve=curve)
    return row


def write_report(results: dict[str, Any], out: Path) -> str:
    rows = results["rows"]
    lines = [
        f"Measured on {results['machine']}, torch {results['torch']} "
        f"(`python benchmarks/budget.py`). Val loss in nats per character: the best lab estimate "
        "the run reported, and a full pass over the validation split with those weights.",
        "",
        "| budget | CPU | recipe | steps | wall s | best val (estimate) | full-pass val |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    names = [*RECIPES, *(r["recipe"] for r in rows if r["recipe"] not in RECIPES)]
    order = {name: i for i, name in enumerate([*ISAS, *names])}
    key = lambda r: (parse_duration(r["budget"]), order[r["isa"]], order[r["recipe"]])  # noqa: E731
    for r in sorted(rows, key=key):
        lines.append(
            f"| {r['budget']} | {r['isa']} | {r['recipe']} | {r['steps']} | {r['wall_s']} "
            f"| {r['best_val']:.4f} | {r['full_val']:.4f} |"
        )
    table = "\n".join(lines) + "\n"
    (out / "budget.md").write_text(table, encoding="utf-8")
    plot(rows, out / "budget.png")
    return table


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Val loss (estimate) against wall time, a panel per budget: a colour per recipe, solid
    native (or on a GPU), dashed AVX2."""
    budgets = sorted({r["budget"] for r in rows}, key=parse_duration)
    recipes = sorted({r["recipe"] for r in rows})
    figure = new_figure(4 * len(budgets), 4.5)
    for i, budget in enumerate(budgets):
        axes = figure.add_subplot(1, len(budgets), i + 1)
        for r in (r for r in rows if r["budget"] == budget and r["curve"]):
            seconds, losses = zip(*r["curve"], strict=True)
            isa = r.get("isa", "")
            style = "--" if isa == "avx2" else "-"
            color = f"C{recipes.index(r['recipe']) % 10}"
            label = f"{r['recipe']}, {isa}" if isa else r["recipe"]
            axes.plot(seconds, losses, style, color=color, marker=".", markersize=3, label=label)
        axes.set(title=f"{budget} of wall time", xlabel="wall time (s)", ylim=(1.4, 2.4))
        axes.grid(alpha=0.3)
        if i == 0:
            axes.set_ylabel("val loss (lab estimate, nats/char)")
            axes.legend(fontsize=8)
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the results")
    parser.add_argument("--budgets", default="90s,5m,15m", help="wall-time budgets")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated")
    parser.add_argument("--isas", default=",".join(ISAS), help="native, avx2 (emulated)")
    parser.add_argument("--data", default="shakespeare", help="corpus (default: shakespeare)")
    parser.add_argument("--device", default="cpu", help="train on (e.g. cuda: --isas native)")
    parser.add_argument("--report", action="store_true", help="only write the table and plot")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="also a recipe of your own: `chargpt train` flags, e.g. 'small=--batch-size 16'",
    )
    args = parser.parse_args()
    for variant in args.variant:
        name, _, flags = variant.partition("=")
        RECIPES[name] = shlex.split(flags)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    results = {"machine": machine, "torch": torch.__version__, "rows": []}
    if path.exists():
        results = json.loads(path.read_text(encoding="utf-8"))
    if not args.report:
        with tempfile.TemporaryDirectory() as workdir:
            for budget in args.budgets.split(","):
                for isa in args.isas.split(","):
                    for recipe in args.recipes.split(","):
                        row = run_once(budget, recipe, isa, args.data, Path(workdir), args.device)
                        same = (budget, recipe, isa)
                        kept = [
                            r
                            for r in results["rows"]
                            if (r["budget"], r["recipe"], r["isa"]) != same
                        ]
                        results["rows"] = [*kept, row]
                        path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(write_report(results, args.out))


if __name__ == "__main__":
    main()
