"""Wall time and best validation loss of `chargpt train` with its default preset.

On a machine without a GPU the default (`auto`) preset is `cpu`, sized to finish in about five
minutes on 2 cores. Runs the real command in a subprocess, so start-up is included.

    python benchmarks/train_default.py [--preset auto] [extra chargpt train flags...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="auto")
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [
            sys.executable,
            "-m",
            "chargpt",
            "train",
            "--out",
            str(out),
            "--preset",
            args.preset,
            *extra,
        ]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        config = json.loads((out / "config.json").read_text())
        curve = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    result = {
        "command": " ".join(["chargpt", "train", "--preset", args.preset, *extra]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "wall_s": round(wall, 1),
        "best_val_loss": round(config["best_val_loss"], 4),
        "best_step": config["step"],
        "model": config["model"],
        "val_curve": [(r["step"], round(r["val_loss"], 4)) for r in curve],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
