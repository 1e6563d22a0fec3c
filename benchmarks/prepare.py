"""`chargpt prepare` on a large synthetic corpus: MB/s and peak memory, then training step time
and memory on the prepared arrays against tiny Shakespeare (memory-mapped: they should match).
Training memory is split into the process's own (anonymous) pages and mapped file pages.

    python benchmarks/prepare.py --mb 500 --workdir /tmp/chargpt-bench

Each measurement runs in its own subprocess; peak RSS is that process's ru_maxrss.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from chargpt.data.corpus import resolve_corpus_path

# lines in other scripts, so that the corpus has 2-, 3- and 4-byte UTF-8 characters
MULTIBYTE = [
    "Señor Muñoz leyó «El Quijote» junto al río; ¿qué más daba?\n",
    "Ἐν ἀρχῇ ἦν ὁ λόγος, καὶ ὁ λόγος ἦν πρὸς τὸν θεόν.\n",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。\n",  # noqa: RUF001
    "Schöne Grüße aus Köln — naïve café façade ✓ 😀🎭📜\n",
]


def write_corpus(path: Path, megabytes: int) -> None:
    """Shakespeare's lines interleaved with multi-byte lines, repeated up to `megabytes`."""
    lines = resolve_corpus_path("shakespeare").read_text(encoding="utf-8").splitlines(True)
    block = "".join(
        line + (MULTIBYTE[i % len(MULTIBYTE)] if i % 7 == 0 else "") for i, line in enumerate(lines)
    ).encode("utf-8")
    target = megabytes * 1_000_000
    with path.open("wb") as f:
        written = 0
        while written < target:
            piece = block[: target - written]
            piece = piece[: len(piece.decode("utf-8", "ignore").encode("utf-8"))]  # whole chars
            f.write(piece)
            written += len(piece)


def run_measured(args: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stdout) of one subprocess."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(args)} failed")
    return wall, usage.ru_maxrss / 1024, out


TRAIN_PROBE = """
import sys, time, json
from pathlib import Path
from chargpt.config.presets import build_configs
from chargpt.data.dataset import load_prepared
from chargpt.training.trainer import Trainer
dataset, tokenizer = load_prepared(Path(sys.argv[1]))
model_config, train_config = build_configs("cpu", False, {"max_iters": 10**6})
trainer = Trainer(model_config, train_config, dataset, tokenizer, Path(sys.argv[2]))
for _ in range(3):
    trainer.train_step()
start = time.perf_counter()
for _ in range(int(sys.argv[3])):
    trainer.train_step()
status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Rss"))
mib = {k: int(v.split()[0]) / 1024 for k, v in status.items()}
print(json.dumps({"ms_per_step": 1000 * (time.perf_counter() - start) / int(sys.argv[3]),
                  "rss_anon_mib": round(mib["RssAnon"]), "rss_file_mib": round(mib["RssFile"])}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=500, help="synthetic corpus size in MB")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/chargpt-bench"))
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus = args.workdir / f"synthetic-{args.mb}mb.txt"
    if not corpus.exists() or corpus.stat().st_size < args.mb * 1_000_000:
        write_corpus(corpus, args.mb)
    results: dict = {"corpus_bytes": corpus.stat().st_size}
    chargpt = [sys.executable, "-m", "chargpt"]
    for name, source in (("synthetic", corpus), ("shakespeare", "shakespeare")):
        out = args.workdir / f"prepared-{name}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        wall, rss, _ = run_measured([*chargpt, "prepare", "--data", str(source), "--out", str(out)])
        size = (
            corpus.stat().st_size
            if name == "synthetic"
            else resolve_corpus_path(source).stat().st_size
        )
        results[name] = {
            "prepare_s": round(wall, 2),
            "prepare_mb_per_s": round(size / 1e6 / wall, 1),
            "prepare_peak_rss_mib": round(rss),
        }
        run_dir = args.workdir / f"run-{name}"
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        wall, rss, out_text = run_measured(
            [sys.executable, "-c", TRAIN_PROBE, str(out), str(run_dir), str(args.steps)]
        )
        results[name].update(json.loads(out_text.strip().splitlines()[-1]))
        results[name]["train_peak_rss_mib"] = round(rss)
        results[name]["train_process_s"] = round(wall, 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
