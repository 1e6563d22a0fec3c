"""Atomic writes, durable appends and the metrics file read back tolerantly."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from chargpt.data.files import (
    append_line,
    atomic_write,
    atomic_write_text,
    remove_stale_temporaries,
)
from chargpt.errors import ChargptError
from chargpt.runs.metrics import METRICS, append_metrics, keep_metrics_up_to, read_metrics


def record(step: int, loss: float = 2.0) -> dict:
    return {"step": step, "train_loss": loss, "val_loss": loss}


def test_atomic_write_gives_a_new_files_permissions_and_leaves_the_umask(tmp_path, monkeypatch):
    def replace_with_private_file(tmp: Path) -> None:  # as some writers do
        tmp.unlink()
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))

    def no_umask(mask: int) -> int:
        raise AssertionError("the process umask is changed: other threads see it")

    previous = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", no_umask)
        atomic_write(tmp_path / "file", replace_with_private_file)
        atomic_write_text(tmp_path / "text", "hello")
    finally:
        monkeypatch.undo()
        os.umask(previous)
    for name in ("file", "text"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "text"]  # no temporaries


def test_a_failed_write_leaves_the_previous_file(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "file", "old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "file", fail)
    assert (tmp_path / "file").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / ".model.safetensors.1a2b3c4d.tmp").write_text("killed mid-write")
    (tmp_path / "notes.tmp").write_text("the user's")
    remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.tmp"]


def test_metrics_are_appended_in_place_and_a_torn_line_is_skipped(tmp_path: Path) -> None:
    append_metrics(tmp_path, record(0))
    inode = (tmp_path / METRICS).stat().st_ino
    with (tmp_path / METRICS).open("a") as f:
        f.write('{"step": 5, "train_lo')  # a crash in the middle of an append
    append_metrics(tmp_path, record(5))
    assert (tmp_path / METRICS).stat().st_ino == inode  # appended, not rewritten
    assert (tmp_path / METRICS).read_text().splitlines()[1] == '{"step": 5, "train_lo'
    assert read_metrics(tmp_path) == [record(0), record(5)]


def test_the_latest_record_of_a_step_wins_and_a_resume_drops_later_ones(tmp_path: Path) -> None:
    for step, loss in ((0, 3.0), (2, 2.5), (4, 2.0), (2, 2.4)):
        append_metrics(tmp_path, record(step, loss))
    assert read_metrics(tmp_path) == [record(0, 3.0), record(2, 2.4), record(4, 2.0)]
    keep_metrics_up_to(tmp_path, 2)
    lines = (tmp_path / METRICS).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 2, 2]


def test_reading_metrics_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ChargptError, match="does not exist"):
        read_metrics(tmp_path)
    append_line(tmp_path / METRICS, "not a record")
    with pytest.raises(ChargptError, match="no loss records yet"):
        read_metrics(tmp_path)
