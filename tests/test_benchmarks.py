"""The training-throughput benchmark runs on every preset's model in its smoke mode (the `cpu`
preset's rotary positions once broke its FLOPs count, which assumed a position table)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_smoke_on_the_cpu_preset(tmp_path):
    out = tmp_path / "rows.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick"]
    command += ["--settings", "cpu", "--bf16", "never", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["attention"] for row in rows] == ["reference", "fused"]
    assert all(row["tokens_per_s"] > 0 and 0 < row["mfu"] for row in rows)
