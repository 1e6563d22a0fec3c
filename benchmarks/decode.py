"""Decoding speed on a device, with and without CUDA graphs: characters per second of `chargpt
sample`'s decoding (a batch of B samples in slots 0..B-1, `make_decoder`) at batch 1 and 64, and
of the server's decoder with 16 busy slots at different positions, each side by side with the
plain step; then whether the two give the same greedy text.

    python benchmarks/decode.py                    # cuda if there is one, else cpu
    python benchmarks/decode.py --device cuda --dtype bf16
    python benchmarks/decode.py --quick            # a tiny model: checks that it runs

The model is the lab's size (6 layers, 384 wide, 6 heads, block 256, vocabulary 65) with random
weights. Rows run in interleaved rounds; the best round counts. On a CPU the graph rows fall back
to the plain step (one line says so), so both columns measure the same thing there.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from chargpt.config import ModelConfig
from chargpt.generation.decoders import Rows, new_decoder
from chargpt.generation.sampling import Controls
from chargpt.model import GPTLanguageModel
from chargpt.model.precision import autocast, resolve_device, resolve_dtype

VOCAB = 65


def sample_rate(
    model: GPTLanguageModel, batch: int, chars: int, graphs: bool, spread: bool = False
) -> float:
    """Characters per second of `chars` steps of `batch` rows sampled at temperature 1, prefill
    excluded; `spread`: the rows start at different positions (the server's case)."""
    device = next(model.parameters()).device
    decoder = new_decoder(model, batch, cuda_graphs=graphs)
    lengths = [1 + (37 * i) % 120 if spread else 1 for i in range(batch)]
    generator = torch.Generator(device=device).manual_seed(0)
    for slot, length in enumerate(lengths):
        prompt = torch.randint(VOCAB, (length,), generator=generator, device=device)
        decoder.start(slot, prompt.tolist())
    generators = [torch.Generator(device=device).manual_seed(i) for i in range(batch)]
    slots = list(range(batch))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(chars):
        ids = decoder.choose(slots, Controls(), generators)[:, 0].tolist()  # one copy to the host
        decoder.append(dict(zip(slots, ids, strict=True)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * chars / (time.perf_counter() - start)


def greedy_text(model: GPTLanguageModel, chars: int, graphs: bool) -> list[int]:
    rows = Rows(new_decoder(model, 1, cuda_graphs=graphs), torch.zeros(1, 1, dtype=torch.long))
    out = []
    for _ in range(chars):
        ids = rows.choose(Controls(temperature=0), None).cpu()
        out.append(ids.item())
        rows.append(ids)
    return out


CASES = {"batch 1": (1, False), "batch 64": (64, False), "16 slots, spread": (16, True)}


def decode_rates(
    device: torch.device, dtype: torch.dtype, quick: bool, chars: int = 200, repeats: int = 3
) -> dict[str, Any]:
    """Each case's best characters per second over interleaved rounds, plain step and CUDA
    graphs, and whether the two give the same greedy text, for a lab-size model with random
    weights in `dtype` (`quick`: a tiny model, few characters)."""
    config = ModelConfig(dropout=0.0)
    if quick:
        config = ModelConfig(block_size=32, n_embd=32, n_head=2, n_layer=2, dropout=0.0)
        chars, repeats = 10, 1
    torch.manual_seed(0)
    model = GPTLanguageModel(config, VOCAB).to(device).eval()
    best: dict[tuple[str, bool], float] = {}
    with torch.inference_mode(), autocast(device, dtype):
        for _ in range(repeats):
            for what, (batch, spread) in CASES.items():
                for graphs in (False, True):
                    rate = sample_rate(model, batch, chars, graphs, spread)
                    best[what, graphs] = max(best.get((what, graphs), 0.0), rate)
        same = greedy_text(model, chars, False) == greedy_text(model, chars, True)
    rates = {what: {"plain": best[what, False], "graphs": best[what, True]} for what in CASES}
    return {"chars_per_s": rates, "same_greedy_text": same, "chars": chars}


def decode_table(result: dict[str, Any]) -> list[str]:
    lines = ["| decoding | plain step chars/s | CUDA graphs chars/s | x |", "|---|---:|---:|---:|"]
    for what, rate in result["chars_per_s"].items():
        plain, graph = rate["plain"], rate["graphs"]
        lines.append(f"| {what} | {plain:,.0f} | {graph:,.0f} | {graph / plain:.2f} |")
    same, chars = result["same_greedy_text"], result["chars"]
    return [*lines, "", f"greedy text, {chars} characters, graphs against the plain step: {same}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto, fp32 or bf16 (autocast)")
    parser.add_argument("--chars", type=int, default=200, help="characters per row and round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best counts")
    parser.add_argument("--quick", action="store_true", help="a tiny model, few characters")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {name}, PyTorch {torch.__version__}, {dtype}\n")
    result = decode_rates(device, dtype, args.quick, args.chars, args.repeats)
    print("\n".join(decode_table(result)))


if __name__ == "__main__":
    main()
