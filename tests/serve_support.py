"""Helpers of the `chargpt serve` tests: a small saved run, and real servers on 127.0.0.1 (uvicorn
in a thread, or `chargpt serve` as a subprocess), each on a free port and stopped afterwards."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI

from chargpt.config import ModelConfig, ServeConfig, TrainConfig
from chargpt.data.corpus import load_text
from chargpt.data.tokenizer import CharTokenizer
from chargpt.model import build_model
from chargpt.model.quantize import quantized
from chargpt.runs.directory import load_run, save_run
from chargpt.serve.app import create_app
from chargpt.serve.server import bind

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32
MODEL = "tiny-shakespeare"  # the run directory's name is the model id


def make_run(parent: Path, kind: str = "gpt", attention: str = "fused") -> Path:
    """A small run with the bundled corpus's vocabulary and weights spread wider than the
    N(0, 0.02) init, so that its choices are as decisive as a trained model's."""
    run_dir = parent / MODEL
    tokenizer = CharTokenizer.from_text(load_text("shakespeare"))
    config = ModelConfig(
        model=kind,  # type: ignore[arg-type]
        block_size=BLOCK,
        n_embd=32,
        n_head=2,
        n_layer=2,
        dropout=0.0,
        attention=attention,  # type: ignore[arg-type]
    )
    torch.manual_seed(0)
    model = build_model(config, tokenizer.vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.25)
    save_run(run_dir, model, tokenizer, config, TrainConfig(), step=0, best_val_loss=2.5)
    return run_dir


def eventually(condition: Callable[[], bool], timeout: float = 10) -> bool:
    """Whether `condition()` becomes true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@dataclass
class Served:
    url: str  # http://127.0.0.1:PORT
    app: FastAPI

    @property
    def v1(self) -> str:
        return self.url + "/v1"


@contextlib.contextmanager
def serving(run_dir: Path, **settings: Any) -> Iterator[Served]:
    """uvicorn in a thread of this process, serving `run_dir` on a free port of 127.0.0.1
    (quantized as `chargpt serve` does, when `settings` say so)."""
    config = ServeConfig(**settings)
    run = load_run(run_dir)
    app = create_app(replace(run, model=quantized(run.model, config.quantize)), run_dir, config)
    listener = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield Served(f"http://127.0.0.1:{listener.getsockname()[1]}", app)
    finally:
        server.should_exit = True
        thread.join(20)


@dataclass
class Subprocess:
    process: subprocess.Popen
    url: str
    log: Path  # its stdout and stderr

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


@contextlib.contextmanager
def serve_subprocess(
    run_dir: Path, log_path: Path, *flags: str, api_key: str = ""
) -> Iterator[Subprocess]:
    """`python -m chargpt serve --run RUN --port 0 FLAGS...` (with `api_key` in its environment);
    the URL is read from its banner."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CHARGPT_API_KEY": api_key}
    command = [sys.executable, "-m", "chargpt", "serve", "--run", str(run_dir), "--port", "0"]
    with log_path.open("w+") as log:
        process = subprocess.Popen(
            [*command, "--threads", "1", *flags], stdout=log, stderr=subprocess.STDOUT, env=env
        )
        try:
            yield Subprocess(process, wait_for_url(process, log_path), log_path)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(10)


def wait_for_url(process: subprocess.Popen, log_path: Path, timeout: float = 60) -> str:
    """The server's URL, once it prints its banner and accepts connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text()
        found = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", text)
        if found and "Application startup complete" in text:
            return found.group(1)
        assert process.poll() is None, f"chargpt serve exited:\n{text}"
        time.sleep(0.05)
    raise AssertionError(f"chargpt serve did not start:\n{log_path.read_text()}")
