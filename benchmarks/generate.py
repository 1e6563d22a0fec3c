"""Generation speed, int8 weights, and the quality cost of the windowed long-context mode.

    python benchmarks/generate.py            # speed at the lab model size (about 5 minutes)
    python benchmarks/generate.py --quick    # the same with shorter texts (about 2 minutes)
    python benchmarks/generate.py --compile  # also int8 with torch.compile'd steps (+1 minute)
    python benchmarks/generate.py --threads 1 --cpu-time  # on a shared machine: CPU time
    python benchmarks/generate.py --quality  # train a small model briefly: loss per context
                                             # length, and int8's full-pass val loss against fp32
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/generate.py ...
                                             # as on a CPU with AVX2 only (no VNNI, no AVX512)

Speed: characters per second at the `lab` model size (6 layers, 384 wide, 6 heads, block 256,
vocabulary 65, random weights), from a 1-character prompt, sampling at temperature 1, measured
side by side in one run, at batch 1 and 8: the lab's way (reference per-head attention, the
whole context re-run for every character), the KV-cached decoder as it was before the lean step
(each new position through the general `logits(idx, caches)`), the lean step, and both again
with int8 weights; then past block_size (exact mode against window mode). The fast rows run in
interleaved rounds and the best round counts (the machine is shared: the best round is the
least disturbed); the lab's rows, ten times slower, run once.

Quality: the window mode guarantees only `window_keep * block_size` characters of context after
the cache restarts. This trains a small GPT on the bundled Shakespeare and prints its validation
loss as a function of context length, so the cost of that shorter context is a measured number;
then the full-pass validation loss of the same model with int8 weights against fp32, on each int8
kernel.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from chargpt.config import ModelConfig, TrainConfig
from chargpt.data.corpus import load_text
from chargpt.data.dataset import CharDataset
from chargpt.data.tokenizer import CharTokenizer
from chargpt.eval.evaluate import full_pass_loss, validation_stream
from chargpt.generation.decoders import LoopDecoder, Rows, SlotDecoder, make_decoder
from chargpt.generation.generate import generate_ids
from chargpt.generation.sampling import sample_next
from chargpt.model import GPTLanguageModel
from chargpt.model.quantize import KERNELS, quantized
from chargpt.training.trainer import Trainer

VOCAB = 65  # tiny Shakespeare's vocabulary


def lab_size_models() -> tuple[GPTLanguageModel, GPTLanguageModel]:
    """The lab's model twice, same random weights: reference Heads, and fused attention."""
    torch.manual_seed(0)
    fused = GPTLanguageModel(ModelConfig(dropout=0.0), VOCAB).eval()
    reference = GPTLanguageModel(ModelConfig(dropout=0.0, attention="reference"), VOCAB).eval()
    reference.load_state_dict(fused.state_dict())
    return reference, fused


StepRun = Callable[[torch.Tensor, list], torch.Tensor]  # (B, 1) ids, caches -> (B, V) logits
MakeDecoder = Callable[[GPTLanguageModel, torch.Tensor], Rows]


class LockstepDecoder(SlotDecoder):
    """Rows that step together (a batch of samples), each step through `run(ids, caches)` on
    `KVCache` views of the rows: the variants of the decode step that the rows below compare."""

    def __init__(self, model: GPTLanguageModel, slots: int, run: StepRun, **options: Any):
        super().__init__(model, slots, **options)
        self.run = run

    def step(self, next_ids: dict[int, int]) -> None:
        first, last = min(next_ids), max(next_ids)
        ids = torch.tensor([[next_ids[slot]] for slot in range(first, last + 1)])  # (B, 1)
        caches = [cache.rows(first, last + 1, self.lengths[first]) for cache in self.caches]
        self.set_logits(range(first, last + 1), self.run(ids, caches))  # (B, V)
        for slot in next_ids:
            self.lengths[slot] += 1


def general_step(model: GPTLanguageModel) -> StepRun:
    """The cached step before the lean one: each new position through the general
    `logits(idx, caches)` (positions, mask, transposes)."""
    return lambda ids, caches: model.logits(ids, caches)[:, -1]


def cached(exact: bool = False, keep: float = 0.5) -> MakeDecoder:
    """The KV-cached decoder of `chargpt sample` (the lean step), window mode or exact."""
    mode = "exact" if exact else "window"
    return lambda model, idx: make_decoder(model, idx, long_context=mode, window_keep=keep)


def stepping(step: Callable[[GPTLanguageModel], StepRun]) -> MakeDecoder:
    """Window mode, each step through `step(model)`."""
    return lambda model, idx: Rows(LockstepDecoder(model, idx.shape[0], step(model)), idx)


def compiled(model: GPTLanguageModel) -> MakeDecoder:
    """Window mode, with `model.step` compiled once (on first use) for every decoder."""
    step = torch.compile(model.step)
    return stepping(lambda _: step)


def lab_loop(model: GPTLanguageModel, idx: torch.Tensor) -> Rows:
    """The lab's loop: the whole context re-run for every character."""
    return Rows(LoopDecoder(model, idx.shape[0]), idx)


@dataclass
class Row:
    what: str
    batch: int
    chars: int
    model: GPTLanguageModel
    decoder: MakeDecoder
    once: bool = False  # the lab's loop: too slow to repeat
    clock: Callable[[], float] = time.perf_counter
    best: float = float("inf")  # seconds

    @property
    def rate(self) -> float:
        return self.batch * self.chars / self.best

    def run(self) -> None:
        """Sample `chars` characters per row of the batch, as `generate_steps` does."""
        generators = [torch.Generator().manual_seed(i) for i in range(self.batch)]
        start = self.clock()
        with torch.inference_mode():
            decoder = self.decoder(self.model, torch.zeros(self.batch, 1, dtype=torch.long))
            for step in range(self.chars):
                idx_next = sample_next(decoder.logits, 1.0, 0, 1.0, generators)  # (B, 1)
                if step + 1 < self.chars:
                    decoder.append(idx_next)
        self.best = min(self.best, self.clock() - start)


def speed_rows(args: argparse.Namespace) -> list[Row]:
    reference, fused = lab_size_models()
    int8 = quantized(fused, "int8")
    lab = lab_loop  # on the reference model: the lab's loop exactly
    rows = []
    for batch, chars in ((1, args.chars), (8, args.batch_chars)):
        rows += [
            Row("lab: reference, recompute", batch, chars, reference, lab, once=True),
            Row("before: fused + KV cache", batch, chars, fused, stepping(general_step)),
            Row("lean step", batch, chars, fused, cached()),
            Row("int8, step as before", batch, chars, int8, stepping(general_step)),
            Row("int8 + lean step", batch, chars, int8, cached()),
        ]
        if args.compile:
            rows.append(Row("int8 + compiled step", batch, chars, int8, compiled(int8)))
    long = args.long_chars
    rows = [
        *rows,
        Row("lab: reference, recompute", 1, long, reference, lab, once=True),
        Row("lean: exact", 1, long, fused, cached(exact=True)),
        Row("lean: window, keep 0.5", 1, long, fused, cached()),
        Row("lean: window, keep 0.75", 1, long, fused, cached(keep=0.75)),
        Row("int8 + lean: window 0.5", 1, long, int8, cached()),
    ]
    if args.cpu_time:  # one thread on a shared machine: waiting for a core does not count
        for row in rows:
            row.clock = time.process_time
    return rows


def warm_up_compiled(rows: list[Row]) -> None:
    """Compile before timing (untimed), and say how long it took."""
    for row in rows:
        if "compiled" in row.what:
            start = time.perf_counter()
            Row(row.what, row.batch, 4, row.model, row.decoder).run()
            print(f"torch.compile, batch {row.batch}: {time.perf_counter() - start:.1f} s")


def speed(args: argparse.Namespace) -> None:
    rows = speed_rows(args)
    warm_up_compiled(rows)
    for round_ in range(args.repeats):  # interleaved: every row once per round
        for row in rows:
            if round_ == 0 or not row.once:
                row.run()
    print(f"{'':27} {'batch':>5} {'new chars':>9} {'chars/s':>9}")
    for row in rows:
        print(f"{row.what:27} {row.batch:5d} {row.chars:9d} {row.rate:9.1f}")
    rate = {(row.what, row.batch, row.chars): row.rate for row in rows}
    for batch, chars in ((1, args.chars), (8, args.batch_chars)):
        lab = rate["lab: reference, recompute", batch, chars]
        before = rate["before: fused + KV cache", batch, chars]
        print(f"\nbatch {batch}, {chars} chars: before / lab {before / lab:.1f}x")
        for what in (
            "lean step",
            "int8, step as before",
            "int8 + lean step",
            "int8 + compiled step",
        ):
            if (what, batch, chars) in rate:
                ours = rate[what, batch, chars]
                print(f"  {what}: {ours / before:.2f}x before, {ours / lab:.1f}x lab")
    long = args.long_chars
    exact = rate["lean: exact", 1, long]
    print(f"\npast block_size ({long} chars): ", end="")
    print(f"exact / lab {exact / rate['lab: reference, recompute', 1, long]:.1f}x,")
    print(f"  window 0.5 / exact {rate['lean: window, keep 0.5', 1, long] / exact:.1f}x, ", end="")
    print(f"window 0.75 / exact {rate['lean: window, keep 0.75', 1, long] / exact:.1f}x")
    greedy_agreement(rows[0].model, rows[1].model)


def greedy_agreement(reference: GPTLanguageModel, fused: GPTLanguageModel) -> None:
    prompt = torch.zeros(1, 1, dtype=torch.long)
    labs = generate_ids(reference, prompt, 300, temperature=0, kv_cache=False)
    ours = generate_ids(fused, prompt, 300, temperature=0, long_context="exact")
    print(f"greedy, 300 chars: lab and ours identical: {bool((labs == ours).all())}")


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
    model_config = ModelConfig(
        block_size=block, n_embd=args.width, n_head=args.heads, n_layer=args.layers, dropout=0.0
    )
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
    shape = f"block {block}, {args.layers}x{args.width}, {args.heads} heads, {args.steps} steps"
    print(f"\nsmall GPT ({shape}), {args.windows} val windows:")
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
    int8_full_pass(model, dataset)


def int8_full_pass(model: GPTLanguageModel, dataset: CharDataset) -> None:
    """`chargpt eval`'s full pass (every validation character scored once), fp32 and int8 on
    each of its kernels (`chargpt.model.quantize.KERNELS`; the timing picks one per machine)."""
    block = model.config.block_size
    tokens, start = validation_stream(dataset, block)
    variants = {"fp32": model}
    variants |= {f"int8 {kernel}": quantized(model, "int8", (kernel,)) for kernel in KERNELS}
    results = {}
    for name, variant in variants.items():
        begin = time.perf_counter()
        loss, count = full_pass_loss(variant, tokens, block, start)
        results[name] = loss, time.perf_counter() - begin
    fp32, fp32_s = results.pop("fp32")
    print(f"\nfull-pass val loss ({count:,} characters): fp32 {fp32:.5f} ({fp32_s:.1f} s)")
    for name, (loss, seconds) in results.items():
        print(f"  {name}: {loss:.5f}, {loss - fp32:+.5f} nats, the pass took {seconds:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter texts, fewer steps")
    parser.add_argument(
        "--quality", action="store_true", help="loss by context length, int8 against fp32"
    )
    parser.add_argument("--compile", action="store_true", help="also int8 with compiled steps")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds of timings; the best counts")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by the process's CPU time, not the wall clock (with --threads 1 on a shared "
        "machine, time spent waiting for a core then does not count)",
    )
    parser.add_argument("--steps", type=int, default=None, help="quality: training steps (500)")
    parser.add_argument("--block", type=int, default=128, help="quality: block_size")
    parser.add_argument("--width", type=int, default=128, help="quality: n_embd")
    parser.add_argument("--layers", type=int, default=4, help="quality: n_layer")
    parser.add_argument("--heads", type=int, default=4, help="quality: n_head")
    parser.add_argument("--windows", type=int, default=None, help="quality: val windows (1000)")
    args = parser.parse_args()
    if args.cpu_time and args.threads != 1:
        parser.error("--cpu-time adds up the CPU time of every thread: pass --threads 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.chars, args.batch_chars, args.long_chars = (
        (200, 100, 400) if args.quick else (500, 200, 600)
    )
    args.steps = args.steps or (100 if args.quick else 500)
    args.windows = args.windows or (200 if args.quick else 1000)
    threads = torch.get_num_threads()
    clock = "CPU time" if args.cpu_time else "wall clock"
    print(f"{platform.machine()}, {threads} torch threads, torch {torch.__version__}, {clock}\n")
    if args.quality:
        quality(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
