"""Milliseconds per training step of the `cpu` preset, as `chargpt train` takes them.

Each setting builds a real `Trainer` (so the start-up choices apply: bf16 autocast where a bf16
matmul is measured fast, training's attention in fp32 where bf16's backward pass is measured
slower), takes 5 untimed steps, then rounds of 20 steps in turns; the fastest round is given (the
one least disturbed on a shared machine) with the median. Compare code versions by running it
with each on PYTHONPATH, and CPUs with `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`.

    python benchmarks/train_step.py                         # batch 16 x 64 and 32 x 128
    python benchmarks/train_step.py --settings 12x64 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from chargpt.config.presets import build_configs
from chargpt.data.dataset import load_corpus
from chargpt.training.trainer import Trainer


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
            trainer = Trainer(model, train, dataset, tokenizer, Path(tmp) / setting)
            for _ in range(5):
                trainer.train_step()
            trainers[setting] = trainer
        times: dict[str, list[float]] = {setting: [] for setting in trainers}
        for _ in range(args.rounds):
            for setting, trainer in trainers.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    trainer.train_step().item()
                times[setting].append((time.perf_counter() - start) / args.steps * 1000)
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
