"""A run's `metrics.jsonl`: one JSON line per loss estimate, appended as training goes.

Each record is appended and fsynced, so the file grows by whole lines; a crash can tear only the
line being written, and the reader skips such a line. A resumed run redoes the estimates logged
after its saved state: the latest record of a step wins. Torch-free, like plotting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chargpt.data.files import append_line, atomic_write_text
from chargpt.errors import ChargptError

METRICS = "metrics.jsonl"
REQUIRED = ("step", "train_loss", "val_loss")


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    append_line(Path(run_dir) / METRICS, json.dumps(record))


def parse_record(line: str) -> dict[str, Any] | None:
    """One line's record, or None for a line that is not one (a line torn by a crash)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not all(k in record for k in REQUIRED):
        return None
    return record


def records_in(path: Path) -> list[dict[str, Any]]:
    """Every whole record of a metrics file, in file order; none if it does not exist."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [record for record in map(parse_record, lines) if record is not None]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The evaluation records of a run, one per step, in step order."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise ChargptError(f"{path} does not exist: pass the directory of a `chargpt train` run")
    by_step = {record["step"]: record for record in records_in(path)}  # the latest one wins
    if not by_step:
        raise ChargptError(f"{path} holds no loss records yet: train for at least one evaluation")
    return [by_step[step] for step in sorted(by_step)]


def keep_metrics_up_to(run_dir: Path, step: int) -> None:
    """Drop the records after `step` (and any torn line), for a run resumed from that step."""
    path = Path(run_dir) / METRICS
    if path.is_file():
        kept = [json.dumps(r) + "\n" for r in records_in(path) if r["step"] <= step]
        atomic_write_text(path, "".join(kept))
