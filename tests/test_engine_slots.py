"""The engine's scheduling for the lean step: a new sequence takes the lowest free slot, so the
running sequences stay together at the low end and a step's span of slots is their number."""

from __future__ import annotations

import asyncio

import pytest
import torch
from serve_support import make_run

from chargpt.config import SampleConfig
from chargpt.runs.directory import load_run
from chargpt.serve.engine import Engine
from chargpt.serve.jobs import Event, Failure, Finish, Job, Piece, Submission
from chargpt.serve.metrics import ServeMetrics

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_new_sequence_takes_the_lowest_free_slot(tmp_path):
    run = load_run(make_run(tmp_path))
    prompt = run.tokenizer.encode("ROMEO:")

    async def schedule() -> list[dict[int, int]]:
        """Each iteration's running sequences (slot: max_tokens); the engine's iterations run
        here, in turn, without its thread."""
        engine = Engine(run.model, run.tokenizer, 4, 16, ServeMetrics(4))
        for n in (3, 9, 5, 9):  # one character per iteration: slot 0 ends first, then slot 2
            engine.submit(Job([prompt], SampleConfig(max_new_tokens=n, seed=0)))
        running = []
        with torch.inference_mode():
            for iteration in range(6):
                if iteration == 5:  # slots 0 and 2 are free, 2 freed last
                    engine.submit(Job([prompt], SampleConfig(max_new_tokens=7, seed=1)))
                engine.wait_for_work()
                engine.iterate()
                running.append({s: seq.config.max_new_tokens for s, seq in engine.running.items()})
        return running

    running = asyncio.run(schedule())
    assert running[0] == {0: 3, 1: 9, 2: 5, 3: 9}  # the first four fill slots 0 to 3
    assert running[4] == {1: 9, 3: 9}
    assert running[5] == {0: 7, 1: 9, 3: 9}  # the newcomer takes slot 0, not the last freed


def test_a_failed_step_fails_the_running_request_not_the_queued_one(tmp_path, monkeypatch):
    """One slot: A runs, B waits for it. A step that breaks fails A only; B keeps its place in
    the queue and completes once A has left the slot."""
    run = load_run(make_run(tmp_path))
    prompt = run.tokenizer.encode("ROMEO:")
    engine = Engine(run.model, run.tokenizer, 1, 4, ServeMetrics(1))
    append = engine.decoder.append

    def broken(next_ids: dict[int, int]) -> None:
        monkeypatch.setattr(engine.decoder, "append", append)  # fails once
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine.decoder, "append", broken)

    async def events_of(submission: Submission) -> list[Event]:
        return [event async for event in submission.events()]

    async def serve_both() -> tuple[list[Event], list[Event]]:
        a = engine.submit(Job([prompt], SampleConfig(max_new_tokens=5, seed=0)))
        b = engine.submit(Job([prompt], SampleConfig(max_new_tokens=5, seed=1)))
        engine.start()  # both are waiting when its first iteration begins: A admitted, B queued
        try:
            return await asyncio.wait_for(asyncio.gather(events_of(a), events_of(b)), 60)
        finally:
            engine.stop(timeout=10)

    a_events, b_events = asyncio.run(serve_both())
    assert isinstance(a_events[-1], Failure)  # after its first character
    assert not any(isinstance(e, Failure) for e in b_events)
    assert b_events[-1] == Finish(0, "length", 5)
    assert "".join(e.text for e in b_events if isinstance(e, Piece))  # it generated text
