"""Bounded work, off the event loop: the echo budget refuses what would build a huge answer, a
large allowed answer never blocks `/health`, `/v1/inspect` runs a few at a time, lets a few wait
and refuses more, and leaves the engine's model alone; an empty prompt echoes as OpenAI's does."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
from serve_support import MODEL, make_run, serve_subprocess, serving

from chargpt.serve import playground

pytestmark = pytest.mark.usefixtures("one_thread")
ECHO_LIMIT = 24_000
# Issue 19's goal is 100 ms, measured alone by benchmarks/serve_safety.py; beside the rest of the
# suite (two workers on two cores) the scheduler alone can delay a probe that long. An answer
# built on the event loop blocks it for seconds, so half a second still tells the two apart.
HEALTH_LIMIT_S = 0.5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve_limits"))


@pytest.fixture(scope="module")
def served(run_dir):
    with serving(run_dir, max_echo_chars=ECHO_LIMIT, dtype="fp32") as served:
        yield served


def completion(served, **body) -> httpx.Response:
    body = {"model": MODEL, **body}
    return httpx.post(served.v1 + "/completions", json=body, timeout=60)


def test_the_echo_budget_counts_characters_n_and_logprobs(served):
    """characters x n x (1 + logprobs): 24,000 fits the limit, one more character does not."""
    fits = [(1000, 4, 5), (1000, 24, None), (2000, 12, 0)]
    for chars, n, logprobs in fits:
        body = dict(prompt="A" * chars, n=n, echo=True, logprobs=logprobs, max_tokens=0)
        assert completion(served, **body).is_success
    for chars, n, logprobs, work in [(1001, 4, 5, 24_024), (1000, 25, None, 25_000)]:
        body = dict(prompt="A" * chars, n=n, echo=True, logprobs=logprobs, max_tokens=0)
        refused = completion(served, **body)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == "echo" and error["code"] == "echo_too_large"
        assert f"{work:,}" in error["message"] and "--max-echo-chars" in error["message"]
    # without echo the prompt is not sent back: nothing to count
    assert completion(served, prompt="A" * 1000, n=30, logprobs=5, max_tokens=1).is_success


def test_the_echo_budget_counts_a_token_id_as_a_character(served):
    newline = served.app.state.run.tokenizer.stoi["\n"]
    body = dict(n=4, echo=True, logprobs=5, max_tokens=0)
    assert completion(served, prompt=[newline] * 1000, **body).is_success
    refused = completion(served, prompt=[[newline] * 1001], **body)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "echo_too_large" and "24,024" in error["message"]


def test_an_empty_prompt_echoes_nothing(served):
    reply = completion(served, prompt="", echo=True, max_tokens=0).json()
    assert reply["choices"][0]["text"] == ""
    scored = completion(served, prompt=["", "AB"], echo=True, logprobs=1, max_tokens=0).json()
    empty, two = scored["choices"]
    assert empty["text"] == "" and empty["logprobs"]["tokens"] == []
    assert two["text"] == "AB" and two["logprobs"]["tokens"] == ["A", "B"]


def health_seconds(port: int) -> float:
    """How long GET /health takes, on a fresh connection with a raw socket (httpx's own
    keep-alive client adds ~40 ms of its own here)."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
    return time.perf_counter() - start


def slowest_health_during(url: str, body: dict) -> float:
    """The slowest /health while the server answers `body`, asked every 5 ms."""
    port = int(url.rsplit(":", 1)[1])
    replies: list[httpx.Response] = []
    big = threading.Thread(
        target=lambda: replies.append(httpx.post(url + "/v1/completions", json=body, timeout=120))
    )
    big.start()
    latencies = []
    while big.is_alive():
        latencies.append(health_seconds(port))
        time.sleep(0.005)
    big.join()
    (reply,) = replies
    assert reply.status_code == 200, reply.text[:300]
    tokens = [len(c["logprobs"]["tokens"]) for c in reply.json()["choices"]]
    assert tokens == [len(body["prompt"])] * body["n"] and len(latencies) >= 5
    return max(latencies)


def test_a_large_allowed_answer_never_blocks_health(run_dir, tmp_path):
    """An answer as large as the default budget allows (4,096 characters x n 8 x (1 + 5)): about
    7 MB of JSON, built in a worker thread and written in pieces, with the garbage collector's
    full passes kept off what start-up made. The server runs in its own process, so that the
    probes do not share its interpreter lock. On a loaded machine the scheduler alone can delay a
    probe now and then, so up to three tries: a blocked event loop delays every one."""
    prompt = ("To be, or not to be, that is the question:\n" * 100)[:4096]
    body = {"model": MODEL, "prompt": prompt, "n": 8, "echo": True, "logprobs": 5, "max_tokens": 0}
    slowest = []
    with serve_subprocess(run_dir, tmp_path / "serve.log", "--dtype", "fp32") as served:
        warm_up = {**body, "prompt": prompt[:100], "n": 1}  # first-call costs are not the test's
        assert httpx.post(served.url + "/v1/completions", json=warm_up, timeout=60).is_success
        while len(slowest) < 3 and min(slowest, default=1.0) >= HEALTH_LIMIT_S:
            slowest.append(slowest_health_during(served.url, body))
    assert min(slowest) < HEALTH_LIMIT_S, slowest


def test_inspect_runs_a_few_at_a_time_and_leaves_the_engines_model_alone(served, monkeypatch):
    model = served.app.state.run.model
    switched = []
    monkeypatch.setattr(model, "train", lambda mode=True: switched.append(mode))
    running, most = 0, 0
    lock = threading.Lock()
    inspect_text = playground.inspect_text

    def counted(*args, **kwargs):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        try:
            return inspect_text(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(playground, "inspect_text", counted)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            asks = [client.post("/v1/inspect", json={"text": "ROMEO"}) for _ in range(8)]
            return await asyncio.gather(*asks)

    assert all(r.status_code == 200 for r in asyncio.run(burst()))
    assert 1 <= most <= playground.INSPECT_CONCURRENCY
    assert switched == [] and not model.training  # no .train()/.eval() on the served model


def test_inspections_beyond_those_waiting_get_429_with_retry_after(served, monkeypatch):
    """Two run, INSPECT_WAITING wait, and the next is refused at once; the rest all finish."""
    release = threading.Event()
    inspect_text = playground.inspect_text

    def held(*args, **kwargs):
        release.wait(30)
        return inspect_text(*args, **kwargs)

    monkeypatch.setattr(playground, "inspect_text", held)
    turns = served.app.state.inspecting
    room = playground.INSPECT_CONCURRENCY + playground.INSPECT_WAITING

    async def crowd() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            asks = [
                asyncio.ensure_future(client.post("/v1/inspect", json={"text": "ROMEO"}))
                for _ in range(room)
            ]
            deadline = time.monotonic() + 30
            while turns.inside < room and time.monotonic() < deadline:  # all running or waiting
                await asyncio.sleep(0.01)
            refused = await client.post("/v1/inspect", json={"text": "ROMEO"})
            release.set()
            return refused, await asyncio.gather(*asks)

    refused, answered = asyncio.run(crowd())
    assert all(r.status_code == 200 for r in answered)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full")
    assert f"{playground.INSPECT_WAITING} inspections are waiting" in error["message"]
