"""Milliseconds per training step of the `cpu` preset, as `chargpt train` takes them.

Each setting builds a real `Trainer` (so the start-up choices apply: bf16 autocast where a bf16
matmul is measured fast, training's attention in fp32 where bf16's backward pass is measured
slower), takes 5 untimed steps, then rounds of 20 steps in turns (`step_milliseconds`, which
benchmarks/gpu.py uses too); the fastest round is given (the one least disturbed on a shared
machine) with the median. Compare code versions by running it
with each on PYTHONPATH, and CPUs with `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`.

    python benchmarks/train_step.py                         # batch 16 x 64 and 32 x 128
    python benchmarks/train_step.py --settings 12x64 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from chargpt.config.presets import build_configs
from chargpt.data.dataset import load_corpus
from chargpt.model.precision import tf32_matmuls
from chargpt.training.trainer import Trainer


def step_milliseconds(
    trainers: dict[str, Trainer], rounds: int, steps: int, warmup: int = 5
) -> dict[str, list[float]]:
    """Milliseconds a step of each trainer: `warmup` untimed steps, then `rounds` rounds of
    `steps` steps in turns, each round ended by reading its last loss (which waits for a GPU),
    as training reads it every log_interval steps; TF32 on for fp32 matmuls on a GPU, as in
    training."""
    times: dict[str, list[float]] = {name: [] for name in trainers}
    devices = {trainer.device for trainer in trainers.values()}
    with contextlib.ExitStack() as stack:
        for device in devices:
            stack.enter_context(tf32_matmuls(device))
        for trainer in trainers.values():
            for _ in range(warmup):
                trainer.train_step()
            trainer.train_step().item()
        for _ in range(rounds):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                for _ in range(steps):
                    loss = trainer.train_step()
                loss.item()
                times[name].append((time.perf_counter() - start) / steps * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="16x64,32x128", help="BATCHxCONTEXT, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    args = parser.parse_args()
    dataset, tokenizer, digest = load_corpus("shakespeare")
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings.split(","):
            batch, block = map(int, setting.split("x"))
            flags = {"max_iters": 10**6, "batch_size": batch, "block_size": block}
            model, train = build_configs("cpu", False, flags)
            trainers[setting] = Trainer(model, train, dataset, tokenizer, Path(tmp) / setting)
        times = step_milliseconds(trainers, args.rounds, args.steps)
    for setting, ms in times.items():
        trainer = trainers[setting]
        attention = {getattr(m, "attention_dtype", None) for m in trainer.model.modules()} - {None}
        print(
            f"{setting}: {min(ms):.1f} ms/step (median {statistics.median(ms):.1f}), "
            f"{str(trainer.dtype).removeprefix('torch.')} autocast, attention in "
            f"{', '.join(str(d).removeprefix('torch.') for d in attention) or 'the same'}"
        )


if __name__ == "__main__":
    main()
