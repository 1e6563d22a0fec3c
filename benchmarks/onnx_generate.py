"""onnxruntime against PyTorch for generation on the CPU, batch 1: characters per second.

    python benchmarks/onnx_generate.py                 # the lab model size (about 3 minutes)
    python benchmarks/onnx_generate.py --threads 1     # one thread each (a shared machine)
    python benchmarks/onnx_generate.py --quick         # smoke: a tiny model, short texts

Rows, measured side by side in interleaved rounds (the best round counts: the least disturbed
on a shared machine), each the decoding loop of `chargpt sample` at temperature 1 from a
1-character prompt: PyTorch's lean decode step (fp32, `make_decoder`), the same with int8
weights (`--quantize int8`), and the exported graph in onnxruntime (`OnnxDecoder`, what
`--backend onnxruntime` runs). The lab size: 6 layers, 384 wide, 6 heads, block 256,
vocabulary 65, random weights; the text stays within block_size, so no window restarts.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime
import torch

from chargpt.config import ModelConfig
from chargpt.data.tokenizer import CharTokenizer
from chargpt.export.onnx_graph import export_model
from chargpt.export.runtime import OnnxDecoder, OnnxModel
from chargpt.generation.decoders import Rows, make_decoder
from chargpt.generation.sampling import sample_next
from chargpt.model import GPTLanguageModel
from chargpt.model.quantize import quantized

VOCAB = 65  # tiny Shakespeare's vocabulary
Decode = Callable[[torch.Tensor], object]  # (1, 1) prompt -> a decoder with logits and append


def chars_per_second(make_decoder: Decode, chars: int) -> float:
    """Time `chars` characters of sampling (prefill included), as `chargpt sample` runs it."""
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    with torch.inference_mode():
        decoder = make_decoder(torch.zeros(1, 1, dtype=torch.long))
        for step in range(chars):
            idx_next = sample_next(decoder.logits, 1.0, 0, 1.0, generator)
            if step + 1 < chars:
                decoder.append(idx_next)
    return chars / (time.perf_counter() - start)


def rows(config: ModelConfig, folder: Path, threads: int) -> dict[str, Decode]:
    torch.manual_seed(0)
    model = GPTLanguageModel(config, VOCAB).eval()
    int8 = quantized(model, "int8")
    path = folder / "model.onnx"
    export_model(model, CharTokenizer(tuple(chr(32 + i) for i in range(VOCAB))), path)
    graph = OnnxModel(path, threads=threads)
    return {
        "pytorch fp32 (lean step)": lambda idx: make_decoder(model, idx),
        "pytorch int8 (lean step)": lambda idx: make_decoder(int8, idx),
        "onnxruntime fp32": lambda idx: Rows(OnnxDecoder(graph, len(idx)), idx),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke: a tiny model, short texts")
    parser.add_argument("--threads", type=int, default=0, help="threads each (0: defaults)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best counts")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        config = ModelConfig(block_size=32, n_embd=32, n_head=2, n_layer=2, dropout=0.0)
        chars = 20
    else:
        config = ModelConfig(dropout=0.0)
        chars = config.block_size - 1  # one prefill, then steps only
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, threads: torch {torch.get_num_threads()}, "
        f"onnxruntime {args.threads or 'default'}; {chars} characters at batch 1"
    )
    with tempfile.TemporaryDirectory() as tmp:
        decoders = rows(config, Path(tmp), args.threads)
        best = dict.fromkeys(decoders, 0.0)
        for make in decoders.values():  # warm-up: allocations, onnxruntime's first run
            chars_per_second(make, 4)
        for _ in range(args.repeats):  # interleaved: every row once per round
            for name, make in decoders.items():
                best[name] = max(best[name], chars_per_second(make, chars))
    base = best["pytorch fp32 (lean step)"]
    for name, rate in best.items():
        print(f"{name:28s} {rate:8.1f} chars/s  {1000 / rate:6.2f} ms/char  {rate / base:5.2f}x")


if __name__ == "__main__":
    main()
