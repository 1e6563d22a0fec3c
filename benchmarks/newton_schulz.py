"""Muon's step with Newton-Schulz batched over same-shaped matrices, against one chain per matrix.

Two comparisons, each one thread, in turns, the least CPU time of `--repeats` (thread CPU time:
on a shared machine, time spent waiting for a core is not the code's), in the dtype Muon would
use here (bf16 where bf16 matmuls are measured fast, else fp32) unless `--dtype` says:

- `optimizer`: a Muon step alone, for each model size (`--sizes`), every matrix with a random
  gradient: `Muon.step` (the matrices, or a fused qkv matrix's head blocks, orthogonalised a
  shape at a time as one batch, with multi-tensor momentum and weight updates) against the same
  update one parameter at a time (torch.optim.Muon's loop, `PerMatrixMuon`). Alone, the batch's
  larger working set can cost page faults that the per-matrix loop's reused memory does not;
- `training`: a whole training step of the `cpu` preset's budget rows (`--rows`) with each
  Muon, which is what a run sees.

With `--isas native,avx2` each ISA runs in its own process (`ATEN_CPU_CAPABILITY` is read at
import), in turns, `--rounds` times, the least of each kept.

    python benchmarks/newton_schulz.py
    python benchmarks/newton_schulz.py --isas native,avx2 --rounds 2 --sizes 3x96,4x128,6x384
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from chargpt.config import ModelConfig, TrainConfig, build_configs
from chargpt.data.dataset import load_corpus
from chargpt.model import GPTLanguageModel
from chargpt.training.optim import Muon, configure_optimizer, newton_schulz
from chargpt.training.precision import newton_schulz_dtype
from chargpt.training.trainer import Trainer

SIZES = {"3x96": (3, 96, 4), "4x128": (4, 128, 4), "6x384": (6, 384, 6)}  # layers, width, heads
ISAS = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}


class PerMatrixMuon(Muon):
    """The same update, one parameter's Newton-Schulz chain at a time."""

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            ns = (group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
            for p in group["params"]:
                buffer = self.momentum_buffer(p)
                buffer.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                rows, cols = self.block_rows.get(id(p), p.shape[0]), p.shape[1]
                if rows != p.shape[0]:
                    update = update.reshape(-1, rows, cols)
                update = newton_schulz(update, *ns).reshape(p.shape)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * math.sqrt(max(1.0, rows / cols)))


def per_matrix(muon: Muon) -> PerMatrixMuon:
    """A PerMatrixMuon over `muon`'s parameters, with its settings."""
    params = [p for group in muon.param_groups for p in group["params"]]
    blocks = {p: muon.block_rows[id(p)] for p in params if id(p) in muon.block_rows}
    group = muon.param_groups[0]
    twin = PerMatrixMuon(params, group["lr"], group["weight_decay"], block_rows=blocks)
    twin.ns_dtype = muon.ns_dtype
    for twin_group in twin.param_groups:
        twin_group.setdefault("initial_lr", twin_group["lr"])
    return twin


def optimizer_jobs(size: str, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    n_layer, n_embd, n_head = SIZES[size]
    config = ModelConfig(block_size=64, n_embd=n_embd, n_head=n_head, n_layer=n_layer)
    model = GPTLanguageModel(config, 65)
    batched = configure_optimizer(model, TrainConfig(optimizer="muon"), dtype).parts["muon"]
    for group in batched.param_groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p)
    return {"per matrix": per_matrix(batched).step, "batched": batched.step}


def training_jobs(row: str, dtype: torch.dtype, tmp: Path) -> dict[str, Callable[[], None]]:
    """A training step of the `cpu` preset's row for `row` of training time, with each Muon."""
    dataset, tokenizer, _ = load_corpus("shakespeare")
    model, train = build_configs("cpu", False, {"max_time": row})
    jobs = {}
    for way in ("per matrix", "batched"):
        trainer = Trainer(model, train, dataset, tokenizer, tmp / way.replace(" ", "-"))
        muon = trainer.optimizer.parts["muon"]
        muon.ns_dtype = dtype
        if way == "per matrix":
            trainer.optimizer.parts["muon"] = per_matrix(muon)
        jobs[way] = trainer.train_step
    return jobs


def least_cpu_ms(jobs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The least thread CPU time of `repeats` runs of each job, in turns, after 3 untimed."""
    times: dict[str, list[float]] = {way: [] for way in jobs}
    for job in jobs.values():
        for _ in range(3):
            job()
    for _ in range(repeats):
        for way, job in jobs.items():
            start = time.thread_time()
            job()
            times[way].append(time.thread_time() - start)
    return {way: 1000 * min(seconds) for way, seconds in times.items()}


def measure(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Milliseconds per step, by comparison and setting, in this process."""
    torch.set_num_threads(1)
    names = {"bf16": torch.bfloat16, "fp32": torch.float32}
    dtype = names.get(args.dtype) or newton_schulz_dtype(torch.device("cpu"))
    results: dict[str, dict[str, Any]] = {}
    for size in args.sizes.split(","):
        jobs = optimizer_jobs(size, dtype)
        results[f"optimizer {size}"] = least_cpu_ms(jobs, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        for row in args.rows.split(","):
            jobs = training_jobs(row, dtype, Path(tmp))
            results[f"training, cpu row {row}"] = least_cpu_ms(jobs, args.repeats)
    for result in results.values():
        result["dtype"] = str(dtype).removeprefix("torch.")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--sizes", default="3x96,4x128", help=f"of {', '.join(SIZES)}")
    parser.add_argument("--rows", default="75s,270s", help="the cpu preset's, by training time")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--isas", default="", help="native,avx2: each in its own process")
    parser.add_argument("--rounds", type=int, default=1, help="with --isas: turns of each")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if not args.isas:
        results = measure(args)
        print(json.dumps(results) if args.json else table({"this process": results}))
        return
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for isa in args.isas.split(","):
            command = [sys.executable, __file__, "--json", "--repeats", str(args.repeats)]
            command += ["--dtype", args.dtype, "--sizes", args.sizes, "--rows", args.rows]
            env = {**os.environ, **ISAS[isa]}
            output = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            for setting, row in json.loads(output.stdout).items():
                kept = best.setdefault(isa, {}).setdefault(setting, row)
                for way in ("per matrix", "batched"):
                    kept[way] = min(kept[way], row[way])
    print(table(best))


def table(results: dict[str, dict]) -> str:
    lines = [
        "| CPU | step | Newton-Schulz in | per matrix ms | batched ms | speed-up |",
        "|---|---|---|---:|---:|---:|",
    ]
    for isa, settings in results.items():
        for setting, row in settings.items():
            ratio = row["per matrix"] / row["batched"]
            lines.append(
                f"| {isa} | {setting} | {row['dtype']} | {row['per matrix']:.2f} "
                f"| {row['batched']:.2f} | {ratio:.2f}x |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
