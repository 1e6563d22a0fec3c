"""Nothing a request does kills the engine: faults injected into prefill, scoring, append and the
failure path itself fail that request and the server goes on; if the scheduler thread dies anyway,
`/health` says so (503) and new requests get an OpenAI-shaped 503 at once."""

from __future__ import annotations

import httpx
import pytest
from serve_support import MODEL, eventually, make_run, serving

from chargpt.serve.scoring import PromptScore

pytestmark = pytest.mark.usefixtures("one_thread")
BODY = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 5}
ECHO = {**BODY, "echo": True, "logprobs": 2, "n": 2}
RUNS = [("gpt", "fused"), ("bigram", "fused"), ("gpt", "reference")]


@pytest.fixture(scope="module", params=RUNS, ids=["fused", "bigram", "reference"])
def served(request, tmp_path_factory):
    kind, attention = request.param
    run_dir = make_run(tmp_path_factory.mktemp(f"liveness_{kind}_{attention}"), kind, attention)
    with serving(run_dir, dtype="fp32") as served:
        yield served


def post(served, body: dict) -> httpx.Response:
    return httpx.post(served.v1 + "/completions", json=body, timeout=30)


def fails_once(monkeypatch, target: object, name: str, error: Exception | None = None):
    """Make `target.name` raise `error` (a RuntimeError by default) on its next call only."""
    original = getattr(target, name)

    def broken(*args, **kwargs):
        monkeypatch.setattr(target, name, original)
        raise error or RuntimeError("boom")

    monkeypatch.setattr(target, name, broken)


def assert_alive(served) -> None:
    """The engine answers a plain request and /health says ok."""
    assert post(served, BODY).status_code == 200
    health = httpx.get(served.url + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    engine = served.app.state.engine
    assert eventually(lambda: (engine.queued, len(engine.running)) == (0, 0))
    assert len(engine.free_slots) == served.app.state.settings.max_batch


def server_error(response: httpx.Response, status: int = 500) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("step", ["start", "append"])
def test_a_failing_prefill_or_append_fails_that_request_only(served, monkeypatch, step):
    fails_once(monkeypatch, served.app.state.engine.decoder, step)
    assert server_error(post(served, BODY))["type"] == "server_error"
    assert_alive(served)


def test_failing_scoring_fails_that_request_only(served, monkeypatch):
    fails_once(monkeypatch, PromptScore, "run")
    server_error(post(served, ECHO))
    assert_alive(served)
    assert post(served, ECHO).status_code == 200


def test_a_failing_failure_path_still_answers_and_the_engine_goes_on(served, monkeypatch):
    """Prefill breaks, then freeing the broken slot breaks too (the bigram and `reference`
    runs' KeyError of issue 19, here forced on every backend)."""
    decoder = served.app.state.engine.decoder
    fails_once(monkeypatch, decoder, "start")
    fails_once(monkeypatch, decoder, "free", KeyError(0))
    server_error(post(served, BODY))
    assert_alive(served)


def test_a_dead_engine_is_reported_and_refuses_requests_at_once(tmp_path, monkeypatch):
    with serving(make_run(tmp_path), dtype="fp32", max_tokens_limit=200_000) as served:
        engine = served.app.state.engine
        stream = {**BODY, "max_tokens": 100_000, "stream": True}
        with httpx.stream("POST", served.v1 + "/completions", json=stream, timeout=30) as long:
            lines = long.iter_lines()
            next(lines)  # running
            # something no request can reach: the scheduler's own loop breaks
            monkeypatch.setattr(engine, "wait_for_work", lambda: 1 / 0)
            assert eventually(lambda: not engine.thread.is_alive())
            rest = "".join(lines)
        assert '"server_error"' in rest  # the request in flight got its error
        health = httpx.get(served.url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "error"
        refused = server_error(post(served, BODY), 503)
        assert refused["type"] == "server_error" and "restart" in refused["message"]
