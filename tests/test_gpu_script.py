"""benchmarks/gpu.sh runs every section end to end on the CPU in its smoke mode, and writes its
tables, plot, log and each run's output into the --out directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    "lab",
    "lab, its own code (reference heads, fp32)",
    "modern",
    "gpu default (90-s row)",
    "gpu default (90-s row), compiled",
    "nanogpt (compiled)",
]


def test_gpu_script_smoke_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    command = ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--device", "cpu", "--smoke"]
    result = subprocess.run(
        [*command, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["sections"]) == ["probe", "steps", "budgets", "decode"]
    assert results["sections"]["probe"]["chosen"] in ("fp32", "bf16")
    steps = results["sections"]["steps"]
    assert list(steps) == SETTINGS and all(row["ms_min"] > 0 for row in steps.values())
    runs = results["sections"]["budgets"]["rows"]
    assert [(r["budget"], r["recipe"]) for r in runs] == [("7s", "default"), ("7s", "nanogpt")]
    for run in runs:
        assert run["curve"] and all(0 < at < 300 for at, _ in run["curve"])  # wall seconds
        assert (tmp_path / "runs" / f"{run['recipe']}-7s.log").is_file()
    nanogpt = json.loads((tmp_path / "runs" / "nanogpt-7s" / "config.json").read_text())
    assert nanogpt["model"]["tie_embeddings"] and nanogpt["model"]["mlp"] == "gelu"
    report = (tmp_path / "gpu.md").read_text()
    assert all(f"| {name} |" in report for name in SETTINGS)
    assert "| 7s | nanogpt |" in report and "![val loss against wall time](gpu.png)" in report
    assert (tmp_path / "gpu.png").is_file()
    decode = results["sections"]["decode"]  # on a CPU both columns run the plain step
    assert decode["same_greedy_text"] and len(decode["goals"]) == 2
    rates = decode["chars_per_s"]
    assert list(rates) == ["batch 1", "batch 64", "16 slots, spread"]
    assert all(rate["plain"] > 0 and rate["graphs"] > 0 for rate in rates.values())
    assert "| batch 64 |" in report
    assert "done:" in (tmp_path / "gpu.log").read_text()
