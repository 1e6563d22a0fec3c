"""Short timings at start-up that choose between ways of doing the same work on this machine
(bf16 or fp32 products, int8 kernels, onnxruntime's threads): measured, never read from CPU
flags, so that a real AVX2 machine and its emulation choose alike."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

import torch

Key = TypeVar("Key", bound=Hashable)
CPU = torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a GPU runs asynchronously; a CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fastest_seconds(
    jobs: Mapping[Key, Callable[[], object]],
    repeats: int,
    threads: int | None = 1,
    warm_up: bool = True,
    budget: float = math.inf,
    device: torch.device = CPU,
) -> dict[Key, float]:
    """The fastest of `repeats` runs of each job, taken in turns (a busy spell slows the jobs of
    a round alike, and the minimum is each job's least disturbed run), after one untimed run
    each if `warm_up` (which sets kernels and caches up). On `threads` PyTorch threads (one by
    default: on a busy machine, threads that wait for each other blur a comparison; None: the
    process's setting). A job whose first run took more than `budget` seconds runs no more: the
    slowest way of doing some work can take a hundred times as long as the fastest, and for
    the fastest to lose, its least disturbed run would have to be slower than that. On a GPU
    `device`, each run is timed until the device has finished it."""
    times = dict.fromkeys(jobs, math.inf)
    before = torch.get_num_threads()
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        if warm_up:
            for job in jobs.values():
                job()
            synchronize(device)
        for repeat in range(repeats):
            for key, job in jobs.items():
                if repeat and times[key] > budget:
                    continue
                start = time.perf_counter()
                job()
                synchronize(device)
                times[key] = min(times[key], time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return times
