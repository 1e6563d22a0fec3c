#!/usr/bin/env bash
# One GPU, under 8 minutes: the `lab` preset (fp32, the notebook's code path, and bf16) and the
# `modern` preset (bf16, fused attention, without and with --compile), 1,000 steps each with a
# loss estimate every 250, then generation speed (characters/s) at batch 1 and 64 from each run.
# Prints ms/iter (from metrics.jsonl: training time between estimates, evaluations excluded, the
# first window, which holds compilation, left out when there are later ones), the val loss at
# every estimate and the best, and writes the same as summary.json in the output directory.
#
#   benchmarks/gpu.sh [--device cuda] [--out DIR] [--smoke]
#
# --smoke: tiny sizes and a few steps, for a test on the CPU (tests/test_gpu_script.py); the
# compiled run then skips --compile, which alone takes half a minute on a CPU.
# Reference figures on an H200: the lab's own code 56 ms/iter (fp32), val 1.573 after 1,000
# steps; nanoGPT 14.8 ms/iter (bf16, compile, flash), best val 1.4629 at step 1,750.
set -euo pipefail

device=cuda
out=""
smoke=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --smoke) smoke=1; shift ;;
        *) echo "gpu.sh: unknown argument $1 (use --device DEV, --out DIR, --smoke)" >&2; exit 2 ;;
    esac
done
out="${out:-$(mktemp -d -t chargpt-gpu-XXXXXX)}"
mkdir -p "$out"
python="${PYTHON:-python}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"

if [[ $smoke == 1 ]]; then
    steps=4; eval_interval=2; chars=20
    sizes=(--block-size 16 --n-embd 32 --n-head 2 --n-layer 1 --batch-size 4 --eval-iters 1)
    compile=--no-compile
else
    steps=1000; eval_interval=250; chars=500
    sizes=()
    compile=--compile
fi

train() {  # name, then chargpt train flags
    local name="$1"; shift
    echo "== $name: $*" >&2
    "$python" -m chargpt train --out "$out/$name" --device "$device" --max-iters "$steps" \
        --eval-interval "$eval_interval" --sample-chars 0 "$@" "${sizes[@]}" >&2
}

train lab-fp32 --preset lab --dtype fp32 --attention reference
train lab-bf16 --preset lab --dtype bf16
train modern-bf16 --preset modern --dtype bf16
train modern-bf16-compile --preset modern --dtype bf16 "$compile"

"$python" - "$out" "$device" "$chars" <<'EOF'
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from chargpt.generation.generate import generate
from chargpt.runs.directory import load_run

out, device, chars = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])


def ms_per_iter(records: list[dict], tokens_per_step: int) -> float:
    """Median over the evaluation windows, the first left out when there are later ones."""
    windows = [r for r in records if r["tokens_per_s"] > 0][1:] or records[:1]
    return statistics.median(1000 * tokens_per_step / r["tokens_per_s"] for r in windows)


def chars_per_s(run, batch: int) -> float:
    generate(run.model, run.tokenizer, max_new_tokens=8, num_samples=batch, seed=0)  # warm up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    began = time.perf_counter()
    generate(run.model, run.tokenizer, max_new_tokens=chars, num_samples=batch, seed=0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch * chars / (time.perf_counter() - began)


rows = []
for run_dir in sorted(p for p in out.iterdir() if (p / "metrics.jsonl").is_file()):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    config = json.loads((run_dir / "config.json").read_text())
    tokens_per_step = config["train"]["batch_size"] * config["model"]["block_size"]
    run = load_run(run_dir, device, attention="fused")
    rows.append(
        {
            "run": run_dir.name,
            "ms_per_iter": ms_per_iter(records, tokens_per_step),
            "val_curve": [(r["step"], r["val_loss"]) for r in records],
            "best_val": config["best_val_loss"],
            "chars_per_s_batch1": chars_per_s(run, 1),
            "chars_per_s_batch64": chars_per_s(run, 64),
        }
    )
machine = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
(out / "summary.json").write_text(json.dumps({"device": machine, "runs": rows}, indent=2) + "\n")
print(f"device: {machine}; runs in {out}")
print("| run | ms/iter | val loss at each estimate (step: loss) | best val | chars/s b1 | b64 |")
print("|---|---:|---|---:|---:|---:|")
for r in rows:
    curve = ", ".join(f"{step}: {loss:.4f}" for step, loss in r["val_curve"])
    print(
        f"| {r['run']} | {r['ms_per_iter']:.1f} | {curve} | {r['best_val']:.4f} "
        f"| {r['chars_per_s_batch1']:,.0f} | {r['chars_per_s_batch64']:,.0f} |"
    )
EOF
