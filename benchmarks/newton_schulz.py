"""Muon's step with Newton-Schulz batched over same-shaped matrices, against one chain per matrix.

For each model size (the `cpu` preset's two budget rows and the lab's), builds the model, gives
every Muon matrix a random gradient, and times a whole Muon step both ways: `Muon.step` (the
decoder blocks' matrices, or a fused qkv matrix's head blocks, orthogonalised a shape at a time
as one batch, with multi-tensor momentum and weight updates) and the same update one parameter
at a time (torch.optim.Muon's loop). One thread, in turns, the fastest of `--repeats`
(the least disturbed on a shared machine), in the dtype Muon would use here (bf16 where bf16
matmuls are measured fast, else fp32) unless `--dtype` says. With `--isas native,avx2` each ISA
runs in its own process (`ATEN_CPU_CAPABILITY` is read at import), in turns, `--rounds` times.

    python benchmarks/newton_schulz.py
    python benchmarks/newton_schulz.py --isas native,avx2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

from chargpt.config import ModelConfig, TrainConfig
from chargpt.model import GPTLanguageModel
from chargpt.training.optim import Muon, configure_optimizer, newton_schulz
from chargpt.training.precision import newton_schulz_dtype

SIZES = {"3x96": (3, 96, 4), "4x128": (4, 128, 4), "lab 6x384": (6, 384, 6)}
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


def optimizers(size: str, dtype: torch.dtype) -> dict[str, Muon]:
    n_layer, n_embd, n_head = SIZES[size]
    config = ModelConfig(block_size=64, n_embd=n_embd, n_head=n_head, n_layer=n_layer)
    model = GPTLanguageModel(config, 65)
    batched = configure_optimizer(model, TrainConfig(optimizer="muon"), dtype).parts["muon"]
    params = [p for group in batched.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.randn_like(p)
    blocks = {p: batched.block_rows[id(p)] for p in params if id(p) in batched.block_rows}
    per_matrix = PerMatrixMuon(params, lr=0.02, ns_dtype=dtype, block_rows=blocks)
    return {"per matrix": per_matrix, "batched": batched}


def measure(repeats: int, dtype_name: str) -> dict[str, dict[str, float]]:
    """Milliseconds a step, per size and way, in this process."""
    torch.set_num_threads(1)
    names = {"bf16": torch.bfloat16, "fp32": torch.float32}
    dtype = names.get(dtype_name) or newton_schulz_dtype(torch.device("cpu"))
    results = {}
    for size in SIZES:
        ways = optimizers(size, dtype)
        times: dict[str, list[float]] = {way: [] for way in ways}
        for optimizer in ways.values():
            optimizer.step()  # untimed: sets up the kernels and the momentum buffers
        for _ in range(repeats):
            for way, optimizer in ways.items():
                start = time.perf_counter()
                optimizer.step()
                times[way].append(time.perf_counter() - start)
        results[size] = {way: 1000 * min(seconds) for way, seconds in times.items()}
        results[size]["dtype"] = str(dtype).removeprefix("torch.")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--isas", default="", help="native,avx2: each in its own process")
    parser.add_argument("--rounds", type=int, default=1, help="with --isas: turns of each")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if not args.isas:
        results = measure(args.repeats, args.dtype)
        print(json.dumps(results) if args.json else table({"this process": results}))
        return
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for isa in args.isas.split(","):
            command = [sys.executable, __file__, "--json", "--repeats", str(args.repeats)]
            command += ["--dtype", args.dtype]
            env = {**os.environ, **ISAS[isa]}
            output = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            results = json.loads(output.stdout)
            for size, row in results.items():
                kept = best.setdefault(isa, {}).setdefault(size, row)
                for way in ("per matrix", "batched"):
                    kept[way] = min(kept[way], row[way])
    print(table(best))


def table(results: dict[str, dict]) -> str:
    lines = [
        "| CPU | model | Newton-Schulz in | per matrix ms | batched ms | speed-up |",
        "|---|---|---|---:|---:|---:|",
    ]
    for isa, sizes in results.items():
        for size, row in sizes.items():
            ratio = row["per matrix"] / row["batched"]
            lines.append(
                f"| {isa} | {size} | {row['dtype']} | {row['per matrix']:.2f} "
                f"| {row['batched']:.2f} | {ratio:.2f}x |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
