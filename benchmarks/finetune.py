"""Fine-tuning a trained run on a small text with new characters, against training from scratch
for the same budget: the full-pass validation loss on that text at several budgets.

    python benchmarks/finetune.py --workdir DIR [--run RUN] [--budgets 50,100,200,400] [-- FLAGS]

RUN is the default run unless --run names one: `chargpt train` with --preset (default: auto, the
`cpu` preset on a CPU, about 5 minutes on 2 cores) on tiny Shakespeare, trained first. The new text
is --data (default: the bundled `cartas`, 11 KB of Spanish letters with 11 characters Shakespeare
lacks). Both sides take RUN's model shape and the preset's training settings, with --max-iters
set to each budget (each budget is a run of its own, with its schedule), estimates every
--eval-interval steps and the best weights kept; flags after `--` go to both sides (e.g.
`-- --dropout 0.1`). Each side is scored by `chargpt eval`'s full pass over every validation
character, in nats per character; `step0` is the fine-tuned side before any step (the estimate).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from chargpt.cli.main import main as chargpt
from chargpt.data.dataset import load_corpus
from chargpt.eval.evaluate import evaluate_run
from chargpt.runs.directory import load_run


def shape_flags(run_dir: Path) -> list[str]:
    """RUN's model options as `chargpt train` flags, so that scratch has its shape."""
    flags = []
    for name, value in json.loads((run_dir / "config.json").read_text())["model"].items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def train(args: list[str]) -> float:
    start = time.perf_counter()
    if chargpt(["train", *args]) != 0:
        raise SystemExit(f"chargpt train {' '.join(args)} failed")
    return time.perf_counter() - start


def full_pass(run_dir: Path, data: str) -> float:
    """Full-pass validation loss of a run's saved (best) weights on `data`, in its vocabulary."""
    run = load_run(run_dir)
    dataset = load_corpus(data, tokenizer=run.tokenizer)[0]
    return evaluate_run(run, dataset, torch.device("cpu")).full_val.nats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/chargpt-finetune"))
    parser.add_argument("--run", type=Path, help="the trained run (default: train one)")
    parser.add_argument("--preset", default="auto")
    parser.add_argument("--data", default="cartas")
    parser.add_argument("--budgets", default="50,100,200,400", help="steps, comma-separated")
    parser.add_argument("--eval-interval", type=int, default=25)
    args, extra = parser.parse_known_args()
    extra = [flag for flag in extra if flag != "--"]
    args.workdir.mkdir(parents=True, exist_ok=True)
    run = args.run
    if run is None:
        run = args.workdir / "run"
        if not (run / "config.json").is_file():
            shutil.rmtree(run, ignore_errors=True)
            train(["--out", str(run), "--preset", args.preset, "--sample-chars", "0"])
    results = {"run": str(run), "data": args.data, "extra_flags": extra, "budgets": []}
    common = ["--data", args.data, "--preset", args.preset, "--sample-chars", "0", *extra]
    for budget in map(int, args.budgets.split(",")):
        interval = str(min(args.eval_interval, budget))
        every = ["--max-iters", str(budget), "--eval-interval", interval]
        sides = {
            "scratch": [*shape_flags(run), *common, *every],
            "finetuned": ["--init-from", str(run), *common, *every],
        }
        row: dict = {"steps": budget}
        for side, flags in sides.items():
            out = args.workdir / f"{side}-{budget}"
            shutil.rmtree(out, ignore_errors=True)
            row[f"{side}_wall_s"] = round(train(["--out", str(out), *flags]), 1)
            row[f"{side}_val"] = round(full_pass(out, args.data), 4)
            if side == "finetuned":
                step0 = json.loads((out / "metrics.jsonl").open().readline())["val_loss"]
                row["finetuned_step0_estimate"] = round(step0, 4)
        results["budgets"].append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
