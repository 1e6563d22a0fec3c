"""Generation speed and the quality cost of the windowed long-context mode.

    python benchmarks/generate.py            # speed at the lab model size (about 2-4 minutes)
    python benchmarks/generate.py --quick    # the same with shorter texts (under 2 minutes)
    python benchmarks/generate.py --quality  # train a small model briefly, loss per context length

Speed: characters per second at the `lab` model size (6 layers, 384 wide, 6 heads, block 256,
vocabulary 65, random weights), from a 1-character prompt, measured side by side in one run:
the lab's way (reference per-head attention, the whole context re-run for every character,
cropped to block_size) against ours (fused attention and a KV cache), at batch 1 and 8, and past
block_size (exact mode against window mode).

Quality: the window mode guarantees only `window_keep * block_size` characters of context after
the cache restarts. This trains a small GPT on the bundled Shakespeare and prints its validation
loss as a function of context length, so the cost of that shorter context is a measured number.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from chargpt.config import ModelConfig, TrainConfig
from chargpt.corpus import load_text
from chargpt.data import CharDataset
from chargpt.models import GPTLanguageModel
from chargpt.tokenizer import CharTokenizer
from chargpt.train import Trainer

VOCAB = 65  # tiny Shakespeare's vocabulary


def lab_size_models() -> tuple[GPTLanguageModel, GPTLanguageModel]:
    """The lab's model twice, same random weights: reference Heads, and fused attention."""
    torch.manual_seed(0)
    fused = GPTLanguageModel(ModelConfig(dropout=0.0), VOCAB).eval()
    reference = GPTLanguageModel(ModelConfig(dropout=0.0, attention="reference"), VOCAB).eval()
    reference.load_state_dict(fused.state_dict())
    return reference, fused


def chars_per_second(run: Callable[[], torch.Tensor], chars: int, repeats: int) -> float:
    """Best of `repeats` timings (the machine is shared: the best run is the least disturbed)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return chars / best


def speed(args: argparse.Namespace) -> None:
    reference, fused = lab_size_models()

    def gen(model: GPTLanguageModel, batch: int, new: int, **options) -> Callable[[], torch.Tensor]:
        prompt = torch.zeros(batch, 1, dtype=torch.long)  # a 1-character prompt
        generators = [torch.Generator().manual_seed(i) for i in range(batch)]
        return lambda: model.generate(prompt, new, 1.0, 0, generators, **options)

    lab = dict(kv_cache=False)  # on the reference model: the lab's loop exactly
    rows = [  # (what, batch, new characters, model, options)
        ("lab: reference, recompute", 1, args.chars, reference, lab),
        ("ours: fused + KV cache", 1, args.chars, fused, {}),
        ("lab: reference, recompute", 8, args.batch_chars, reference, lab),
        ("ours: fused + KV cache", 8, args.batch_chars, fused, {}),
        ("lab: reference, recompute", 1, args.long_chars, reference, lab),
        ("ours: exact", 1, args.long_chars, fused, dict(long_context="exact")),
        ("ours: window, keep 0.5", 1, args.long_chars, fused, dict(long_context="window")),
        ("ours: window, keep 0.75", 1, args.long_chars, fused, dict(window_keep=0.75)),
    ]
    print(f"{'':27} {'batch':>5} {'new chars':>9} {'chars/s':>9}")
    rates = []
    for what, batch, new, model, options in rows:
        rate = chars_per_second(gen(model, batch, new, **options), batch * new, args.repeats)
        rates.append(rate)
        print(f"{what:27} {batch:5d} {new:9d} {rate:9.1f}", flush=True)
    print(f"\nours / lab, batch 1, {args.chars} chars: {rates[1] / rates[0]:.1f}x")
    print(f"ours / lab, batch 8, {args.batch_chars} chars: {rates[3] / rates[2]:.1f}x")
    print(f"batch 8 / batch 1 throughput, ours: {rates[3] / rates[1]:.1f}x")
    print(f"past block_size ({args.long_chars} chars): exact / lab {rates[5] / rates[4]:.1f}x,")
    print(f"  window 0.5 / exact {rates[6] / rates[5]:.1f}x, ", end="")
    print(f"window 0.75 / exact {rates[7] / rates[5]:.1f}x")
    same = (
        reference.generate(torch.zeros(1, 1, dtype=torch.long), 300, temperature=0, kv_cache=False)
        == fused.generate(
            torch.zeros(1, 1, dtype=torch.long), 300, temperature=0, long_context="exact"
        )
    ).all()
    print(f"greedy, 300 chars: lab and ours identical: {bool(same)}")


def loss_by_context(
    model: GPTLanguageModel, dataset: CharDataset, windows: int, contexts: list[int]
) -> dict[int, float]:
    """Validation loss of the same characters predicted from their last c characters, for each
    c in `contexts`: every window's last character is scored once per context length, with the
    context at positions 0..c-1, exactly as after a window-mode restart. Scoring the same
    characters makes the differences between context lengths far less noisy than the absolute
    losses."""
    block = model.config.block_size
    generator = torch.Generator().manual_seed(1)
    batches = [dataset.get_batch("val", 50, block, generator) for _ in range(windows // 50)]
    out = {}
    with torch.inference_mode():
        for c in contexts:
            losses = [
                F.cross_entropy(model.logits(x[:, -c:])[:, -1, :], y[:, -1]) for x, y in batches
            ]
            out[c] = torch.stack(losses).mean().item()
    return out


def quality(args: argparse.Namespace) -> None:
    text = load_text("shakespeare", "strict")
    tokenizer = CharTokenizer.from_text(text)
    dataset = CharDataset.from_text(text, tokenizer)
    block = args.block
    model_config = ModelConfig(block_size=block, n_embd=128, n_head=4, n_layer=4, dropout=0.0)
    train_config = TrainConfig(
        batch_size=32,
        max_iters=args.steps,
        eval_interval=args.steps,
        eval_iters=20,
        learning_rate=2e-3,
        min_lr=2e-4,
        warmup_iters=50,
        lr_schedule="cosine",
        grad_clip=1.0,
        sample_chars=0,
        device="cpu",
        dtype="fp32",
    )
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model_config, train_config, dataset, tokenizer, out, "shakespeare")
        model = trainer.run().model.eval()
    step = block // 16
    contexts = sorted({1, 2, 4, 8, 16, *range(block // 4, block + 1, step), block - 1})
    losses = loss_by_context(model, dataset, args.windows, contexts)
    full = losses[block]
    print(f"\nsmall GPT (block {block}, 4x128, {args.steps} steps), {args.windows} val windows:")
    print("loss of the windows' last character by context length (difference to exact)")
    for c in contexts:
        print(f"  context {c:4d}: {losses[c]:.4f} ({losses[c] - full:+.4f})")
    for keep_fraction in (0.25, 0.5, 0.75):
        keep = int(keep_fraction * block)
        # the window cycle visits every context keep..block equally often: average the grid
        mean = sum(losses[c] for c in contexts if c >= keep) / sum(c >= keep for c in contexts)
        print(
            f"window keep {keep_fraction}: worst (context {keep}) {losses[keep] - full:+.4f}, "
            f"mean over its cycle {mean - full:+.4f} against exact"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter texts, under 2 minutes")
    parser.add_argument("--quality", action="store_true", help="measure loss by context length")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timings per row; the best counts")
    parser.add_argument("--steps", type=int, default=500, help="quality: training steps")
    parser.add_argument("--block", type=int, default=128, help="quality: block_size")
    parser.add_argument("--windows", type=int, default=1000, help="quality: val windows")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.chars, args.batch_chars, args.long_chars = (
        (200, 100, 400) if args.quick else (500, 200, 600)
    )
    threads = torch.get_num_threads()
    print(f"{platform.machine()}, {threads} torch threads, torch {torch.__version__}, fp32\n")
    if args.quality:
        quality(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
