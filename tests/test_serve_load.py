"""Continuous batching under load: with --deterministic, at temperature 0 a request's text does
not depend on what else is in the batch, whether 32 streams run at once or one at a time."""

from __future__ import annotations

import asyncio

import openai
import pytest
from serve_support import BLOCK, MODEL, make_run, serving

pytestmark = pytest.mark.usefixtures("one_thread")
LINES = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak."


def prompts(count: int) -> list[str]:
    """Different texts of different lengths, some longer than block_size."""
    return [LINES[i % 17 : i % 17 + 1 + (5 * i) % (BLOCK + 9)] for i in range(count)]


async def stream_text(client: openai.AsyncOpenAI, prompt: str) -> str:
    chunks = await client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=2 * BLOCK, temperature=0, stream=True
    )
    return "".join([chunk.choices[0].text async for chunk in chunks if chunk.choices])


async def together_then_alone(url: str, texts: list[str]) -> tuple[list[str], list[str]]:
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    together = await asyncio.gather(*(stream_text(client, t) for t in texts))
    alone = [await stream_text(client, t) for t in texts]
    await client.close()
    return list(together), alone


def test_32_concurrent_greedy_streams_equal_the_same_requests_one_at_a_time(tmp_path):
    texts = prompts(32)
    assert len(set(texts)) == 32 and max(map(len, texts)) > BLOCK
    run_dir = make_run(tmp_path)
    # 32 streams for 16 slots: 16 run, 16 wait
    with serving(run_dir, max_batch=16, dtype="fp32", deterministic=True) as served:
        assert served.app.state.engine.decoder.deterministic
        together, alone = asyncio.run(asyncio.wait_for(together_then_alone(served.v1, texts), 60))
        batch_sizes = served.app.state.metrics.batch_size.collect()[0].samples
    assert together == alone
    assert all(len(text) == 2 * BLOCK for text in together)  # past block_size: window restarts
    steps_of_16 = next(s.value for s in batch_sizes if s.labels.get("le") == "16.0")
    fewer = next(s.value for s in batch_sizes if s.labels.get("le") == "8.0")
    assert steps_of_16 - fewer > 0  # some steps did run more than 8 sequences together
