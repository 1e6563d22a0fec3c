"""onnxruntime and int8 against fp32 PyTorch on the CPU: characters per second, and scoring.

    python benchmarks/onnx_generate.py                 # the lab model size (about 3 minutes)
    python benchmarks/onnx_generate.py --threads 1     # one thread each (a shared machine)
    python benchmarks/onnx_generate.py --threads 1 --cpu-time  # and the process's CPU time
    python benchmarks/onnx_generate.py --quick         # smoke: a tiny model, short texts
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/onnx_generate.py
                                                       # PyTorch as on a CPU with AVX2 only

Rows, measured side by side in interleaved rounds (the best round counts: the least disturbed
on a shared machine). Decoding, each the loop of `chargpt sample` at temperature 1 from a
1-character prompt: PyTorch's lean decode step (fp32, `make_decoder`), the same with int8
weights (`--quantize int8`), and the exported graph in onnxruntime (`OnnxDecoder`, what
`--backend onnxruntime` runs), at batch 1; fp32 and int8 again at batch 16 (16 samples, or a
server's 16 slots). Scoring, as `chargpt eval`'s full pass reads text: 8 windows of block_size
in one forward pass, in fp32, int8 and onnxruntime. The lab size: 6 layers, 384 wide, 6 heads,
block 256, vocabulary 65, random weights; the text stays within block_size (no window
restarts). The kernels int8 chose and onnxruntime's session settings are printed: both are
chosen by timings at start-up. The emulation's variables reach PyTorch only: onnxruntime picks
its own kernels from the CPU (so, emulated on an AVX512 machine, its row keeps AVX512's).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import onnxruntime
import torch

from chargpt.config import ModelConfig
from chargpt.data.tokenizer import CharTokenizer
from chargpt.export.onnx_graph import export_model
from chargpt.export.runtime import OnnxDecoder, OnnxLanguageModel, OnnxModel
from chargpt.generation.decoders import Rows, make_decoder
from chargpt.generation.sampling import sample_next
from chargpt.generation.speed import Work
from chargpt.model import GPTLanguageModel
from chargpt.model.quantize import KERNELS, fastest_kernel, quantized

VOCAB = 65  # tiny Shakespeare's vocabulary
Decode = Callable[[torch.Tensor], object]  # (B, 1) prompt -> a decoder with logits and append
WINDOWS = 8  # scored in one pass


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def chars_per_second(make_decoder: Decode, batch: int, chars: int, clock: str) -> float:
    """Time `chars` characters of sampling per row (prefill included), as `chargpt sample`."""
    generators = [torch.Generator().manual_seed(row) for row in range(batch)]
    start = CLOCK[clock]()
    with torch.inference_mode():
        decoder = make_decoder(torch.zeros(batch, 1, dtype=torch.long))
        for step in range(chars):
            idx_next = sample_next(decoder.logits, 1.0, 0, 1.0, generators)
            if step + 1 < chars:
                decoder.append(idx_next)
    return batch * chars / (CLOCK[clock]() - start)


def windows_per_second(score: Callable[[torch.Tensor], object], block: int, clock: str) -> float:
    idx = torch.randint(VOCAB, (WINDOWS, block), generator=torch.Generator().manual_seed(0))
    start = CLOCK[clock]()
    with torch.inference_mode():
        score(idx)
    return WINDOWS / (CLOCK[clock]() - start)


def rows(
    config: ModelConfig, folder: Path, threads: int, clock: str
) -> dict[str, Callable[[], float]]:
    """Each row's timing: a function that returns characters (or windows) per second."""
    torch.manual_seed(0)
    model = GPTLanguageModel(config, VOCAB).eval()
    int8 = quantized(model, "int8")
    path = folder / "model.onnx"
    export_model(model, CharTokenizer(tuple(chr(32 + i) for i in range(VOCAB))), path)
    graph = OnnxModel(path, threads=threads)  # settings timed on a batch-1 decode step
    scorer = OnnxLanguageModel(OnnxModel(path, threads=threads, work=Work(scoring=True)))
    block, chars = config.block_size, config.block_size - 1  # one prefill, then steps only
    decode = {
        "fp32": lambda idx: make_decoder(model, idx),
        "int8": lambda idx: make_decoder(int8, idx),
        "onnxruntime": lambda idx: Rows(OnnxDecoder(graph, len(idx)), idx),
    }
    out = {}
    for batch in (1, 16):
        for name, make in decode.items():
            if batch == 1 or name != "onnxruntime":
                timing = partial(chars_per_second, make, batch, chars, clock)
                out[f"{name}, batch {batch}"] = timing
    for name, scoring in (("fp32", model), ("int8", int8), ("onnxruntime", scorer)):
        out[f"{name}, scoring"] = partial(windows_per_second, scoring.logits, block, clock)
    print(f"onnxruntime sessions: decoding {graph.settings}, scoring {scorer.onnx.settings}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke: a tiny model, short texts")
    parser.add_argument("--threads", type=int, default=0, help="threads each (0: defaults)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best counts")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by the process's CPU time (with --threads 1 on a shared machine: time spent "
        "waiting for a core does not count)",
    )
    args = parser.parse_args()
    if args.cpu_time and args.threads != 1:
        parser.error("--cpu-time adds up the CPU time of every thread: pass --threads 1")
    clock = "cpu" if args.cpu_time else "wall"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        config = ModelConfig(block_size=32, n_embd=32, n_head=2, n_layer=2, dropout=0.0)
    else:
        config = ModelConfig(dropout=0.0)
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__} "
        f"(CPU capability {torch.backends.cpu.get_cpu_capability()}), onnxruntime "
        f"{onnxruntime.__version__}, threads: torch {torch.get_num_threads()}, onnxruntime "
        f"{args.threads or 'timed'}; {config.block_size - 1} characters a row; {clock} clock"
    )
    with tempfile.TemporaryDirectory() as tmp:
        timings = rows(config, Path(tmp), args.threads, clock)
        for timing in timings.values():  # warm-up: allocations, first runs, kernel timings
            timing()
        best = dict.fromkeys(timings, 0.0)
        for _ in range(args.repeats):  # interleaved: every row once per round
            for name, timing in timings.items():
                best[name] = max(best[name], timing())
    widest = config.n_embd, 4 * config.n_embd
    chosen = {rows: fastest_kernel(*widest, rows, tuple(KERNELS)) for rows in (1, 16, 64)}
    print("int8 kernels by rows a product:", ", ".join(f"{r}: {k}" for r, k in chosen.items()))
    for name, rate in best.items():
        kind, unit = name.split(", ")[-1], "windows/s" if "scoring" in name else "chars/s"
        base = best[f"fp32, {kind}"]
        print(f"{name:24s} {rate:9.1f} {unit:9s} {1000 / rate:8.2f} ms  {rate / base:5.2f}x fp32")


if __name__ == "__main__":
    main()
