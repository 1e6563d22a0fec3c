"""`chargpt serve` as its own process: a bounded fault run leaves it answering with flat memory,
SIGTERM ends it with status 0 within the grace period, and without the serve extra the command
fails in one line while the rest of chargpt imports fine."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serve_support import MODEL, ROOT, eventually, make_run, serve_subprocess

from chargpt.cli.main import main
from chargpt.serve.server import bind

CLIENTS = 64
FAULT_REQUESTS = 320  # per round; the first round warms up, the second is measured
# Resident memory may grow this much over the second round. The first round, the same mix at the
# same concurrency, has grown the allocators' pools and PyTorch's caches to what this load needs
# (measured: the second round then adds about 0.2 MiB, and six more add as little), so what
# grows now is a leak: keeping what one request allocates (its sequences and their generators,
# events, logprobs entries and JSON: 25 KB or more) would add 8 MiB over 320 requests.
RSS_GROWTH_LIMIT = 8 * 2**20
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve_process"))


def fault_request(i: int) -> tuple[str, dict | bytes, bool]:
    """Request i of the mix: (kind, body, stream)."""
    kind = ["plain", "stream", "malformed", "huge", "unknown", "drop", "mistyped", "echo"][i % 8]
    base = {"model": MODEL, "prompt": f"Citizen {i}:", "max_tokens": 24}
    bodies: dict[str, dict | bytes] = {
        "plain": base,
        "stream": {**base, "stream": True, "n": 2},
        "malformed": b'{"model": "' + MODEL.encode() + b'", "prompt": ',
        "huge": {**base, "max_tokens": 10**12},
        "unknown": {**base, "prompt": "\u00bfqu\u00e9 tal?"},
        "drop": {**base, "stream": True, "max_tokens": 3000},
        "mistyped": {**base, "n": "two"},
        "echo": {**base, "echo": True, "logprobs": 2, "prompt": "x" * (i % 90)},
    }
    return kind, bodies[kind], kind in ("stream", "drop")


def check_error(response: httpx.Response) -> None:
    assert response.status_code in (400, 429), response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}


async def one_request(client: httpx.AsyncClient, i: int) -> str:
    kind, body, stream = fault_request(i)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    if not stream:
        response = await client.post("/v1/completions", content=content, headers=JSON)
        if response.status_code != 200:
            check_error(response)
            return kind
        assert response.json()["object"] == "text_completion"
        return kind
    async with client.stream("POST", "/v1/completions", content=content, headers=JSON) as response:
        if response.status_code != 200:
            await response.aread()
            check_error(response)
            return kind
        lines = [line async for line in take_lines(response, 3 if kind == "drop" else None)]
    if kind == "stream":
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert all(c["object"] == "text_completion" for c in chunks)
    return kind


async def take_lines(response: httpx.Response, limit: int | None):
    """The stream's non-empty lines; with a limit, the client leaves after that many."""
    count = 0
    async for line in response.aiter_lines():
        if line:
            yield line
            count += 1
            if limit is not None and count == limit:
                return


async def fault_run(url: str, requests: int) -> list[str]:
    # A new connection per request: uvicorn closes a connection idle for 5 s, and on a busy
    # machine a pooled one can wait that long, so that reusing it races the close (a ReadError
    # that says nothing about the server).
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        queue = iter(range(requests))

        async def worker() -> list[str]:
            return [await one_request(client, i) for i in queue]

        done = await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CLIENTS))), 90)
    return [kind for kinds in done for kind in kinds]


def test_a_bounded_fault_run_leaves_the_server_answering_with_flat_memory(run_dir, tmp_path):
    with serve_subprocess(run_dir, tmp_path / "log", "--max-queue", "256") as server:
        asyncio.run(fault_run(server.url, FAULT_REQUESTS))
        before = server.rss_bytes()
        kinds = asyncio.run(fault_run(server.url, FAULT_REQUESTS))
        assert len(kinds) == FAULT_REQUESTS

        def drained() -> bool:
            health = httpx.get(server.url + "/health").json()
            return (health["queued"], health["running"]) == (0, 0)

        assert eventually(drained, timeout=20)  # dropped streams left the batch too
        growth = server.rss_bytes() - before
        assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.1f} MiB"
        assert server.process.poll() is None
        completion = httpx.post(
            server.url + "/v1/completions", json={"model": MODEL, "prompt": "A", "max_tokens": 5}
        )
        assert completion.status_code == 200


KEY = {"Authorization": "Bearer k3y"}


def read_stream(url: str, body: dict, lines: list[str], started: threading.Event) -> None:
    try:
        with httpx.stream("POST", url, json=body, headers=KEY, timeout=30) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    started.set()
    except httpx.HTTPError:
        lines.append("cut")
    started.set()


def test_sigterm_finishes_or_cuts_requests_in_flight_and_exits_0(run_dir, tmp_path):
    grace = 2.0
    flags = ("--grace-period", str(grace), "--max-tokens-limit", "10000000")
    with serve_subprocess(run_dir, tmp_path / "log", *flags, api_key="k3y") as server:
        url = server.url + "/v1/completions"
        assert httpx.post(url, json={"model": MODEL, "prompt": "A"}).status_code == 401
        banner = server.log.read_text()
        assert "Bearer $CHARGPT_API_KEY" in banner and "k3y" not in banner
        short = {"model": MODEL, "prompt": "A", "max_tokens": 40, "stream": True}
        endless = {"model": MODEL, "prompt": "B", "max_tokens": 5_000_000, "stream": True}
        streams = {}
        for name, body in (("short", short), ("endless", endless)):
            lines: list[str] = []
            started = threading.Event()
            thread = threading.Thread(target=read_stream, args=(url, body, lines, started))
            thread.start()
            assert started.wait(20)
            streams[name] = (thread, lines)
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(grace + 15) == 0
        elapsed = time.monotonic() - sent
        for thread, _ in streams.values():
            thread.join(10)
            assert not thread.is_alive()
    assert streams["short"][1][-1] == "data: [DONE]"  # finished within the grace period
    assert streams["endless"][1][-1] != "data: [DONE]"  # cut when it ran out
    assert grace <= elapsed < grace + 15


BLOCK_SERVE_EXTRA = (
    "import sys\n"
    "for name in ('fastapi', 'starlette', 'pydantic', 'uvicorn', 'prometheus_client'):\n"
    "    sys.modules[name] = None  # as if the serve extra were not installed\n"
)


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-c", BLOCK_SERVE_EXTRA + code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_without_the_serve_extra_serve_fails_in_one_line_and_the_rest_imports(run_dir):
    code = (
        "import importlib, pkgutil, chargpt\n"
        "for m in pkgutil.walk_packages(chargpt.__path__, 'chargpt.'):\n"
        "    if not m.name.startswith(('chargpt.serve', 'chargpt.__main__')):\n"
        "        importlib.import_module(m.name)\n"
        "from chargpt.cli.main import main\n"
        f"sys.exit(main(['serve', '--run', {str(run_dir)!r}]))\n"
    )
    result = run_python(code)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1
    assert "pip install 'chargpt[serve]'" in result.stderr


def test_serve_mistakes_are_one_line_errors_that_name_the_fix(run_dir, tmp_path, capsys):
    taken = bind("127.0.0.1", 0)
    taken.listen()
    cases = [
        (["--run", str(tmp_path / "nothing")], "does not exist"),
        (["--run", str(run_dir), "--max-batch", "0"], "max_batch must be a positive integer"),
        (["--run", str(run_dir), "--port", str(taken.getsockname()[1])], "choose another --port"),
    ]
    for flags, says in cases:
        assert main(["serve", *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err
    taken.close()
