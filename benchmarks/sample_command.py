"""`chargpt sample` as a user runs it, whole command, batch 1: this checkout against another
(`--against OTHER/src`, an earlier commit's `git worktree`) in interleaved rounds, each
command a fresh process on one thread (OMP_NUM_THREADS=1), timed by its CPU time so that a
shared machine's waits do not count.

    python benchmarks/sample_command.py --against /tmp/old/src   # a lab-size run, random weights
    python benchmarks/sample_command.py --run runs/shakespeare --chars 500

Each round runs every checkout twice: 1 new character (start-up: imports, loading, the prompt)
and `--chars` of them; decoding speed is the extra characters over the extra CPU time, from the
medians of the rounds (and from their bests).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from serve import save_model

from chargpt.config import ModelConfig

SRC = Path(__file__).resolve().parents[1] / "src"


def cpu_seconds(src: Path, run: Path, chars: int) -> float:
    """CPU time of one `chargpt sample` of `chars` characters, run from the checkout `src`."""
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "chargpt", "sample", "--run", str(run), "--prompt", "ROMEO:"]
    command += ["--max-new-tokens", str(chars), "--seed", "1"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def compare(checkouts: dict[str, Path], run: Path, chars: int, rounds: int) -> None:
    seconds: dict[tuple[str, int], list[float]] = {}
    for turn in range(rounds):
        for name, src in checkouts.items():
            for n in (1, chars):
                seconds.setdefault((name, n), []).append(cpu_seconds(src, run, n))
        print(f"round {turn + 1}/{rounds} done", flush=True)
    print(
        f"\n| checkout | start-up CPU s (median) | {chars} chars CPU s | chars/s (medians) "
        "| chars/s (bests) |\n|---|---:|---:|---:|---:|"
    )
    for name in checkouts:
        one, many = seconds[name, 1], seconds[name, chars]
        median = (chars - 1) / (statistics.median(many) - statistics.median(one))
        best = (chars - 1) / (min(many) - min(one))
        print(
            f"| {name} | {statistics.median(one):.2f} | {statistics.median(many):.2f} "
            f"| {median:.1f} | {best:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="default: a lab-size run with random weights")
    parser.add_argument("--against", type=Path, help="another checkout's src directory")
    parser.add_argument("--chars", type=int, default=2000, help="characters of the long command")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    checkouts = {"this checkout": SRC} | ({str(args.against): args.against} if args.against else {})
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or save_model(Path(tmp), ModelConfig(dropout=0.0))
        compare(checkouts, run, args.chars, args.rounds)


if __name__ == "__main__":
    main()
