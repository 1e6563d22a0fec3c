"""The engine hands an iteration's events to the event loop together: one wake-up of the loop (a
system call) per iteration, not one per character, with each request's events in order."""

from __future__ import annotations

import asyncio

import pytest
from serve_support import make_run

from chargpt.config import SampleConfig
from chargpt.generation.generate import generate
from chargpt.runs.directory import load_run
from chargpt.serve.engine import Engine
from chargpt.serve.jobs import Finish, Job, Piece
from chargpt.serve.metrics import ServeMetrics

pytestmark = pytest.mark.usefixtures("one_thread")


def test_an_iteration_wakes_the_event_loop_once_whatever_its_characters(tmp_path):
    run = load_run(make_run(tmp_path))
    prompt = run.tokenizer.encode("ROMEO:")
    chars, sequences = 12, 4

    async def serve() -> tuple[list[str], int]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counted(*args):
            nonlocal wakeups
            wakeups += 1
            return call_soon_threadsafe(*args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        engine = Engine(run.model, run.tokenizer, sequences, 16, ServeMetrics(sequences))
        engine.start()
        try:
            config = [SampleConfig(max_new_tokens=chars, seed=i) for i in range(sequences)]
            submissions = [engine.submit(Job([prompt], c)) for c in config]
            texts = []
            for submission in submissions:
                events = [event async for event in submission.events()]
                assert isinstance(events[-1], Finish)
                texts.append("".join(e.text for e in events if isinstance(e, Piece)))
        finally:
            engine.stop(timeout=10)
        return texts, wakeups

    texts, wakeups = asyncio.run(asyncio.wait_for(serve(), 60))
    for seed, text in enumerate(texts):
        assert (
            text == generate(run.model, run.tokenizer, "ROMEO:", max_new_tokens=chars, seed=seed)[0]
        )
    # a piece and a finish per sequence's last character: 4 x 13 events, in 12 or so iterations
    assert wakeups <= chars + 2
