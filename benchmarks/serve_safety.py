"""Issue 19's bad requests against `chargpt serve`, and how long /health takes meanwhile; and
issue 26's `/v1/inspect` of a whole context.

    python benchmarks/serve_safety.py          # the lab model size (about a minute on 2 cores)
    python benchmarks/serve_safety.py --smoke  # a tiny model: checks that it runs

Serves a model with random weights (the lab's size, or a tiny one) in a subprocess on a free
port of 127.0.0.1, with an API key, and prints for each request the status, the time to the
answer, and the slowest `GET /health` (a fresh connection every 5 ms) while it ran: the
refusals (the echo budget, a body not sent as JSON, a rebinding Host, a non-ASCII key), the
largest answers the default limits allow, and an inspection of block_size characters (at the
lab's size: 6 layers x 6 heads x 256 characters).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from chargpt.config import ModelConfig, TrainConfig
from chargpt.data.corpus import load_text
from chargpt.data.tokenizer import CharTokenizer
from chargpt.model import build_model
from chargpt.runs.directory import save_run

ROOT = Path(__file__).resolve().parents[1]
KEY = "benchmark-key"
LAB = ModelConfig(block_size=256, n_embd=384, n_head=6, n_layer=6, dropout=0.0)
TINY = ModelConfig(block_size=32, n_embd=32, n_head=2, n_layer=2, dropout=0.0)


def save_model(directory: Path, config: ModelConfig) -> Path:
    run_dir = directory / "random"
    tokenizer = CharTokenizer.from_text(load_text("shakespeare"))
    torch.manual_seed(0)
    model = build_model(config, tokenizer.vocab_size)
    save_run(run_dir, model, tokenizer, config, TrainConfig(), step=0)
    return run_dir


def start_server(run_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "chargpt", "serve", "--run", str(run_dir), "--port", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CHARGPT_API_KEY": KEY}
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log.read_text()
        if "Application startup complete" in text:
            return process, text.split(" at ", 1)[1].split("/v1", 1)[0]
        if process.poll() is not None:
            raise SystemExit(f"chargpt serve exited:\n{text}")
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"chargpt serve did not start:\n{log.read_text()}")


def health_seconds(port: int) -> float:
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        while connection.recv(65536):
            pass
    return time.perf_counter() - start


def measure(url: str, path: str, headers: dict, body: bytes) -> tuple[int, float, float, int]:
    """(status, seconds to the answer, slowest /health meanwhile, answer bytes)."""
    port = int(url.rsplit(":", 1)[1])
    answer: list[httpx.Response] = []
    start = time.perf_counter()

    def ask() -> None:
        answer.append(httpx.post(url + path, content=body, headers=headers, timeout=300))

    asking = threading.Thread(target=ask)
    asking.start()
    slowest = 0.0
    while asking.is_alive():
        slowest = max(slowest, health_seconds(port))
        time.sleep(0.005)
    asking.join()
    return answer[0].status_code, time.perf_counter() - start, slowest, len(answer[0].content)


COMPLETIONS, INSPECT = "/v1/completions", "/v1/inspect"


def cases(model: str, block_size: int) -> list[tuple[str, str, dict, bytes]]:
    """(what, path, headers, body) of each request."""
    prompt = (load_text("shakespeare") * 2)[:16_384]
    json_type = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}

    def echo(n: int, logprobs: int | None) -> bytes:
        body = {"model": model, "prompt": prompt, "n": n, "echo": True, "max_tokens": 0}
        return httpx.Request("POST", "/", json={**body, "logprobs": logprobs}).read()

    inspect = httpx.Request("POST", "/", json={"text": prompt[:block_size]}).read()
    plain = {**json_type, "Content-Type": "text/plain"}
    rebinding = {**json_type, "Host": "evil.example"}
    accented = {**json_type, "Authorization": "Bearer clé".encode()}
    return [
        ("n 64, echo, logprobs 5, 16,384 chars", COMPLETIONS, json_type, echo(64, 5)),
        ("n 16, echo, logprobs 5, 16,384 chars", COMPLETIONS, json_type, echo(16, 5)),
        ("text/plain body", COMPLETIONS, plain, echo(1, None)),
        ("Host evil.example", COMPLETIONS, rebinding, echo(1, None)),
        ("bearer key 'clé'", COMPLETIONS, accented, echo(1, None)),
        ("largest allowed: n 2, logprobs 5", COMPLETIONS, json_type, echo(2, 5)),
        ("the same again", COMPLETIONS, json_type, echo(2, 5)),
        ("largest allowed: n 16, no logprobs", COMPLETIONS, json_type, echo(16, None)),
        (f"/v1/inspect, {block_size} chars", INSPECT, json_type, inspect),
        ("the same again", INSPECT, json_type, inspect),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = TINY if args.smoke else LAB
        run_dir = save_model(Path(tmp), config)
        process, url = start_server(run_dir, Path(tmp) / "serve.log")
        try:
            print("| request | status | answer s | slowest /health ms | answer bytes |")
            print("|---|---:|---:|---:|---:|")
            for what, path, headers, body in cases(run_dir.name, config.block_size):
                status, seconds, slowest, size = measure(url, path, headers, body)
                print(f"| {what} | {status} | {seconds:.2f} | {slowest * 1000:.0f} | {size:,} |")
        finally:
            process.terminate()
            process.wait(30)


if __name__ == "__main__":
    main()
