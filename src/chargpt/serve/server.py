"""Running the app: load the run, listen, print where, stop gracefully on SIGTERM or Ctrl-C."""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
import uvicorn

from chargpt.config import ServeConfig
from chargpt.errors import ChargptError
from chargpt.model.precision import resolve_device
from chargpt.model.quantize import ROW_INDEPENDENT, quantized
from chargpt.runs.directory import load_run
from chargpt.serve.app import create_app
from chargpt.serve.middleware import is_loopback, url_host


class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that once it has shut down gracefully after SIGTERM or SIGINT it
    returns instead of raising the signal again, so that the process exits with status 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(run_dir: Path, settings: ServeConfig) -> int:
    """Serve `run_dir` until SIGTERM or Ctrl-C: requests in flight get `grace_period` seconds to
    finish, then are cut; the engine stops; exit status 0."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    run = load_run(run_dir, resolve_device(settings.device))
    # --deterministic: kernels whose rows never depend on the other rows of a step
    kernels = ROW_INDEPENDENT if settings.deterministic else None
    run = dataclasses.replace(run, model=quantized(run.model, settings.quantize, kernels))
    app = create_app(run, run_dir, settings)
    listener = bind(settings.host, settings.port)
    config = uvicorn.Config(
        app,
        timeout_graceful_shutdown=settings.grace_period,  # type: ignore[arg-type]
        log_level="info",
    )
    print(banner(app.state.model_id, settings, listener.getsockname()[1]), flush=True)
    if warning := exposure_warning(settings):
        print(warning, file=sys.stderr, flush=True)
    GracefulServer(config).run(sockets=[listener])
    return 0


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before uvicorn starts, so that port 0 (any free port) can be
    reported."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as err:
        listener.close()
        raise ChargptError(
            f"cannot listen on {host} port {port} ({err.strerror}): choose another --port or --host"
        ) from None
    return listener


def exposure_warning(settings: ServeConfig) -> str | None:
    """What to say when anyone who can reach the address may use the server."""
    if settings.api_key or is_loopback(settings.host):
        return None
    return (
        f"warning: listening on {settings.host} without an API key: anyone who can reach this "
        "machine can generate with it; set CHARGPT_API_KEY (or --api-key) to require a key"
    )


def banner(model_id: str, settings: ServeConfig, port: int) -> str:
    url = f"http://{url_host(settings.host)}:{port}"
    body = f'{{"model": "{model_id}", "prompt": "\\n", "max_tokens": 100}}'
    key = ' -H "Authorization: Bearer $CHARGPT_API_KEY"' if settings.api_key else ""
    return (
        f"chargpt serve: {model_id} at {url}/v1 (OpenAI completions API; Ctrl-C to stop)\n"
        f"try: curl {url}/v1/completions -H 'Content-Type: application/json'{key} "
        f"-d {shlex.quote(body)}"
    )
