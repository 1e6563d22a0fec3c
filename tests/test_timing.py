"""`fastest_seconds`, which start-up choices rest on: each job's least disturbed of interleaved
runs, a job over the budget timed once, on the threads asked for, all on a faked clock."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from chargpt.model import timing
from chargpt.model.timing import fastest_seconds


def test_the_least_disturbed_run_counts_and_a_slow_job_runs_once(monkeypatch):
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    durations = {"fast": [5.0, 1.0, 3.0, 2.0], "slow": [20.0, 30.0, 40.0, 50.0]}
    threads: list[int] = []

    def job(name: str):
        def run() -> None:
            threads.append(torch.get_num_threads())
            clock.now += durations[name].pop(0)

        return run

    before = torch.get_num_threads()
    jobs = {"fast": job("fast"), "slow": job("slow")}
    seconds = fastest_seconds(jobs, repeats=4, warm_up=False, budget=10.0)
    assert seconds == {"fast": 1.0, "slow": 20.0}
    assert durations == {"fast": [], "slow": [30.0, 40.0, 50.0]}  # the slow one ran once
    assert set(threads) == {1} and torch.get_num_threads() == before


def test_a_warm_up_run_is_not_timed(monkeypatch):
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    durations = [100.0, 2.0, 3.0]

    def run() -> None:
        clock.now += durations.pop(0)

    assert fastest_seconds({"job": run}, repeats=2, threads=None) == {"job": 2.0}
