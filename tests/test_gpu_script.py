"""benchmarks/gpu.sh runs end to end on the CPU in its smoke mode and prints its summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("lab-bf16", "lab-fp32", "modern-bf16", "modern-bf16-compile")


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
    assert result.returncode == 0, result.stderr[-2000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0].removeprefix("| ") for line in table[1:]] == list(RUNS)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["run"] for r in summary["runs"]] == list(RUNS)
    for run in summary["runs"]:
        assert run["ms_per_iter"] > 0 and run["chars_per_s_batch64"] > 0
        assert [step for step, _ in run["val_curve"]] == [0, 2, 4]
    modern = json.loads((tmp_path / "modern-bf16" / "config.json").read_text())
    assert modern["model"]["pos_emb"] == "rope" and modern["train"]["optimizer"] == "muon"
