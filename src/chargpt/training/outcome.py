"""How a training run ends: its result, or what stopped it early (SIGINT or SIGTERM, or a loss
that is no longer a finite number)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from chargpt.errors import ChargptError
from chargpt.model import LanguageModel


@dataclass
class TrainResult:
    model: LanguageModel
    best_val_loss: float
    best_step: int
    steps: int
    elapsed: float  # seconds of training in this session
    tokens_per_second: float
    stopped_by: int | None = None  # the signal that stopped training early, if one did


class TrainingDiverged(ChargptError):
    """The loss became NaN or infinite; the last good checkpoint stays on disk."""


def diverged(
    what: str, value: float, step: int, saved_step: int, out_dir: Path, lr: float, clip: float
) -> TrainingDiverged:
    """The error for a NaN or infinite `what` at `step` of a run whose state was last saved at
    `saved_step` (-1: never), trained at learning rate `lr` with gradient clipping `clip`."""
    kept = (
        f"the last good state (step {saved_step}) is kept in {out_dir}"
        if saved_step >= 0
        else "nothing was saved"
    )
    fix = f"a lower --learning-rate (now {lr})" + (" or set --grad-clip 1.0" if clip == 0 else "")
    stopped = f"training stopped at step {step}: the {what} is {value}"
    return TrainingDiverged(f"{stopped}; {kept}: start a new run with {fix}")


@contextlib.contextmanager
def stop_on_signals(request_stop: Callable[[int], None]) -> Iterator[None]:
    """While training, SIGINT and SIGTERM only call `request_stop(signum)`: the loop then
    finishes its step, saves and stops, instead of dying in the middle of an update or a write."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = {
        signum: signal.signal(signum, lambda received, _frame: request_stop(received))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
