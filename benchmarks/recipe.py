"""Ablation of the recipe options at a fixed training-time budget.

The lab's architecture (at the `cpu` preset's sizes and schedule) against each option added
alone, and against the best combination: the options that each beat the lab alone (mean
full-pass val loss over the seeds), all together. Every run trains for `--budget` of training
time (`max_time`: the schedule follows the elapsed fraction of it), then is scored by the lab's
estimate and by a full pass over the validation split. Writes results.json, recipe.png (val
loss against training time) and recipe.md (a Markdown table) into `--out`.

    python benchmarks/recipe.py --out docs/results/recipe              # 5m, 2 seeds, ~2 hours
    python benchmarks/recipe.py --out /tmp/r --variants lab,rope --seeds 1
    python benchmarks/recipe.py --out /tmp/r --smoke                   # seconds: tiny sizes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from chargpt.config import ModelConfig, TrainConfig
from chargpt.config.presets import build_configs
from chargpt.data.dataset import load_corpus
from chargpt.eval.evaluate import evaluate_run
from chargpt.runs.directory import load_run
from chargpt.runs.metrics import read_metrics
from chargpt.training.trainer import Trainer
from chargpt.viz.plot import new_figure, save_figure

FIELDS = {f.name: f for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls)}

# each option alone, over the `cpu` preset; `best` is made from those that beat `lab`
OPTIONS: dict[str, dict[str, Any]] = {
    "rope": dict(pos_emb="rope"),
    "relu2": dict(mlp="relu2"),
    "muon": dict(optimizer="muon"),
    "ema": dict(ema_decay=0.995),
    # regularisation: on ~1 M characters the data sets the floor
    "dropout": dict(dropout=0.1),
    "qk_norm": dict(qk_norm=True),
    "rmsnorm": dict(norm="rmsnorm"),
    "tied": dict(tie_embeddings=True),
    "gelu": dict(mlp="gelu"),
    "weight_decay": dict(weight_decay=0.5),  # selectable, not run by default
}
REGULARISATION = ("dropout", "weight_decay")  # the preset's values, varied but not "options"
# the lab's architecture and optimiser (every option off) over the `cpu` preset's sizes and
# schedule: the preset itself now carries the options that won this ablation
LAB = {
    key: FIELDS[key].default
    for name, option in OPTIONS.items()
    if name not in REGULARISATION
    for key in option
}
DEFAULT_VARIANTS = ["lab", *(name for name in OPTIONS if name != "weight_decay"), "best"]
SMOKE = dict(
    block_size=16, n_embd=32, n_head=2, n_layer=1, batch_size=8, eval_iters=2, eval_interval=20
)


def train_variant(
    name: str, overrides: dict[str, Any], seed: int, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    """Train one variant for the budget and score it; the run directory is kept under `out`."""
    base = {"max_time": args.budget, "seed": seed, "sample_chars": 0}
    base.update(device=args.device, dtype=args.dtype)
    model_config, train_config = build_configs(
        "cpu", False, LAB, base, SMOKE if args.smoke else {}, overrides
    )
    dataset, tokenizer, digest = load_corpus(args.data)
    run_dir = out / f"{name}-seed{seed}"
    trainer = Trainer(model_config, train_config, dataset, tokenizer, run_dir, args.data, digest)
    result = trainer.run()
    run = load_run(run_dir, trainer.device)
    max_chars = 2_000 if args.smoke else None
    evaluation = evaluate_run(run, dataset, trainer.device, max_chars=max_chars)
    curve = [(r["elapsed"], r["val_loss"]) for r in read_metrics(run_dir)]
    print(f"{name} seed {seed}: {result.steps} steps, full-pass val {evaluation.full_val.nats:.4f}")
    return {
        "variant": name,
        "seed": seed,
        "overrides": overrides,
        "steps": result.steps,
        "train_seconds": trainer.train_time,
        "estimate_val": result.best_val_loss,
        "full_val": evaluation.full_val.nats,
        "curve": curve,
    }


def mean_full_val(results: list[dict[str, Any]], name: str) -> float:
    return statistics.mean(r["full_val"] for r in results if r["variant"] == name)


def best_combination(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The options that each beat the lab alone, together; mlp: the better of relu2 and gelu."""
    lab = mean_full_val(results, "lab")
    winners = sorted(
        (mean_full_val(results, name), name)
        for name in {r["variant"] for r in results} - {"lab", "best"}
        if mean_full_val(results, name) < lab
    )
    combined: dict[str, Any] = {}
    for _, name in reversed(winners):  # the best last, so that it wins a shared option (mlp)
        combined.update(OPTIONS[name])
    return combined


def write_table(results: list[dict[str, Any]], out: Path, header: str) -> Path:
    lines = [
        header,
        "",
        "| variant | options | steps | lab estimate val | full-pass val (mean) |",
        "|---|---|---:|---|---:|",
    ]
    for name in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == name]
        options = ", ".join(f"{k}={v}" for k, v in runs[0]["overrides"].items()) or "(none)"
        steps = "/".join(str(r["steps"]) for r in runs)
        estimates = "/".join(f"{r['estimate_val']:.4f}" for r in runs)
        lines.append(
            f"| {name} | {options} | {steps} | {estimates} | {mean_full_val(results, name):.4f} |"
        )
    path = out / "recipe.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def plot(results: list[dict[str, Any]], out: Path) -> None:
    """Lab-estimate val loss against training time, one colour per variant, one line per seed."""
    figure = new_figure(8, 5)
    axes = figure.add_subplot()
    colors = {}
    for r in results:
        color = colors.setdefault(r["variant"], f"C{len(colors) % 10}")
        seconds, losses = zip(*r["curve"], strict=True)
        label = r["variant"] if r["seed"] == results[0]["seed"] else None
        axes.plot(seconds, losses, color=color, label=label, marker=".")
    axes.set(xlabel="training time (s)", ylabel="val loss (lab estimate, nats/char)")
    axes.legend()
    save_figure(figure, out / "recipe.png")


def load_done(path: Path, budget: str, dtype: str) -> list[dict[str, Any]]:
    """The runs an earlier, interrupted invocation finished with the same budget and precision."""
    if not path.exists():
        return []
    runs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [r for r in runs if r.get("budget") == budget and r.get("dtype") == dtype]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the results")
    parser.add_argument("--budget", default="5m", help="training time per run (default: 5m)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per variant (default: 2)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated")
    parser.add_argument("--data", default="shakespeare", help="corpus (default: shakespeare)")
    parser.add_argument("--device", default="cpu", help="device (default: cpu)")
    parser.add_argument("--dtype", default="auto", help="training precision (default: auto)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a 2s budget, 1 seed")
    args = parser.parse_args()
    if args.smoke:
        args.budget, args.seeds = "2s", 1
    variants = args.variants.split(",")
    unknown = set(variants) - {"lab", "best", *OPTIONS}
    if unknown:
        parser.error(
            f"unknown variants {sorted(unknown)}: choose from lab, best, {', '.join(OPTIONS)}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"  # one line per finished run: an interrupted ablation goes on
    results = load_done(log, args.budget, args.dtype)

    def run(name: str, overrides: dict[str, Any], seed: int, runs: Path) -> None:
        if any(r["variant"] == name and r["seed"] == seed for r in results):
            return
        result = train_variant(name, overrides, seed, args, runs)
        result.update(budget=args.budget, dtype=args.dtype)
        results.append(result)
        with log.open("a", encoding="utf-8") as file:
            file.write(json.dumps(result) + "\n")

    with tempfile.TemporaryDirectory(dir=args.out) as runs:
        # untimed: the first run in a process would pay one-off kernel set-up out of its budget
        warm_up = argparse.Namespace(**{**vars(args), "budget": "1s" if args.smoke else "10s"})
        train_variant("warm-up", {}, 0, warm_up, Path(runs))
        seeds = range(1337, 1337 + args.seeds)
        for name in [v for v in variants if v != "best"]:
            for seed in seeds:
                run(name, OPTIONS.get(name, {}), seed, Path(runs))
        if "best" in variants and any(r["variant"] == "lab" for r in results):
            combined = best_combination(results)
            for seed in seeds:
                run("best", combined, seed, Path(runs))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    meta = {"budget": args.budget, "machine": machine, "torch": torch.__version__}
    meta.update(device=args.device, dtype=args.dtype, threads=torch.get_num_threads())
    meta["smoke"] = args.smoke
    (args.out / "results.json").write_text(json.dumps({**meta, "runs": results}, indent=2) + "\n")
    plot(results, args.out)
    header = f"Budget {args.budget} per run on {machine}, torch {torch.__version__}, {args.dtype}."
    print(write_table(results, args.out, header).read_text())


if __name__ == "__main__":
    main()
