"""Training throughput: tokens/s and model FLOPs utilisation, the lab's way against ours.

Variants (attention path, precision, compile) run in interleaved rounds on the same batches, so
that their ratios are measured side by side even on a shared, noisy machine: the speed-up is
given from the median round and from each variant's fastest round (the one least disturbed by
other work). The peak used for MFU is measured in the same run with a large matmul in each
precision.

    python benchmarks/throughput.py                      # lab and cpu settings, JSON + table
    python benchmarks/throughput.py --settings cpu --rounds 5 --compile
    python benchmarks/throughput.py --quick              # smoke test: batch 2, one step each
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from chargpt.config.presets import build_configs
from chargpt.data.corpus import load_text
from chargpt.data.dataset import CharDataset
from chargpt.data.tokenizer import CharTokenizer
from chargpt.model import GPTLanguageModel
from chargpt.model.precision import autocast, bf16_is_fast, resolve_device
from chargpt.training.optim import configure_optimizer


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of an n x n matmul in `dtype`, fastest of `reps`: the practical peak of this device
    (the fastest, not the mean, so that other work on a shared machine does not lower it)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    fastest = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * n**3 / fastest


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_token(model: GPTLanguageModel) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention's scores; a
    learned position table is a lookup, not a product (rotary positions have none)."""
    c = model.config
    positions = getattr(model, "position_embedding_table", None)
    n_weights = model.num_parameters() - (positions.weight.numel() if positions else 0)
    return 6 * n_weights + 12 * c.n_layer * c.n_embd * c.block_size


@dataclasses.dataclass
class Variant:
    name: str
    attention: str
    dtype: torch.dtype
    compile: bool = False


def time_steps(model, optimizer, batches, device, dtype, steps: int) -> float:
    """Seconds per optimisation step, averaged over `steps` steps."""
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        with autocast(device, dtype):
            _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return (time.perf_counter() - start) / steps


def bench_setting(preset: str, variants: list[Variant], args, device, peaks) -> list[dict]:
    overrides = {"batch_size": args.batch_size} if args.batch_size else {}
    model_cfg, train_cfg = build_configs(preset, device.type == "cuda", overrides)
    text = load_text("shakespeare")
    tok = CharTokenizer.from_text(text)
    data = CharDataset.from_text(text, tok)
    gen = torch.Generator().manual_seed(0)
    batches = [
        data.get_batch("train", train_cfg.batch_size, model_cfg.block_size, gen, device)
        for _ in range(4)
    ]
    runs = {}
    for v in variants:
        torch.manual_seed(0)
        cfg = dataclasses.replace(model_cfg, attention=v.attention)
        model = GPTLanguageModel(cfg, tok.vocab_size).to(device).train()
        forward = torch.compile(model) if v.compile else model
        optimizer = configure_optimizer(model, train_cfg)
        time_steps(forward, optimizer, batches, device, v.dtype, args.warmup)  # warm up, compile
        runs[v.name] = (forward, optimizer, model, [])
    for _ in range(args.rounds):  # interleaved: every variant sees the same machine conditions
        for v in variants:
            forward, optimizer, _, times = runs[v.name]
            times.append(time_steps(forward, optimizer, batches, device, v.dtype, args.steps))
    tokens = train_cfg.batch_size * model_cfg.block_size
    rows = []
    for v in variants:
        _, _, model, times = runs[v.name]
        step = statistics.median(times)
        best = min(times)
        achieved = flops_per_token(model) * tokens / step
        rows.append(
            {
                "setting": preset,
                "variant": v.name,
                "attention": v.attention,
                "dtype": str(v.dtype).removeprefix("torch."),
                "compile": v.compile,
                "batch_size": train_cfg.batch_size,
                "block_size": model_cfg.block_size,
                "params": model.num_parameters(),
                "ms_per_step": 1000 * step,
                "best_ms_per_step": 1000 * best,
                "tokens_per_s": tokens / step,
                "mfu": achieved / peaks[v.dtype],
            }
        )
    base, base_best = rows[0]["ms_per_step"], rows[0]["best_ms_per_step"]
    for row in rows:
        row["speedup_vs_lab_way"] = base / row["ms_per_step"]
        row["best_round_speedup"] = base_best / row["best_ms_per_step"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="lab,cpu", help="comma-separated presets")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, help="override the presets' batch size")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: batch 2, one round of one step, a small matmul for the peak",
    )
    parser.add_argument("--compile", action="store_true", help="add torch.compile variants")
    parser.add_argument(
        "--bf16",
        choices=("auto", "always", "never"),
        default="auto",
        help="bf16 variants: auto = only where the hardware runs bf16 fast",
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.rounds, args.steps = args.batch_size or 2, 1, 1
    device = resolve_device(args.device)
    fast_bf16 = device.type == "cuda" or bf16_is_fast(device)
    use_bf16 = args.bf16 == "always" or (args.bf16 == "auto" and fast_bf16)
    variants = [
        Variant("lab way: reference fp32", "reference", torch.float32),
        Variant("fused fp32", "fused", torch.float32),
    ]
    if use_bf16:
        variants.append(Variant("fused bf16", "fused", torch.bfloat16))
    if args.compile:
        best = torch.bfloat16 if use_bf16 else torch.float32
        variants.append(
            Variant(f"fused {'bf16' if use_bf16 else 'fp32'} compiled", "fused", best, compile=True)
        )
    n = 512 if args.quick else 2048  # the peak's matmul size
    peaks = {torch.float32: matmul_peak(device, torch.float32, n)}
    if use_bf16:
        peaks[torch.bfloat16] = matmul_peak(device, torch.bfloat16, n)
    print(
        f"device {device}; matmul peak: "
        + ", ".join(
            f"{str(k).removeprefix('torch.')} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items()
        )
        + ("" if use_bf16 else "; bf16 skipped")
        + ("" if use_bf16 or fast_bf16 else " (no fast bf16 on this hardware)")
    )
    rows = []
    for preset in args.settings.split(","):
        rows += bench_setting(preset, variants, args, device, peaks)
    print(
        f"{'setting':8} {'variant':28} {'ms/step':>9} {'tokens/s':>10} {'MFU':>6} "
        f"{'speedup':>8} {'best round':>10}"
    )
    for r in rows:
        print(
            f"{r['setting']:8} {r['variant']:28} {r['ms_per_step']:9.0f} "
            f"{r['tokens_per_s']:10,.0f} {r['mfu']:6.1%} {r['speedup_vs_lab_way']:7.2f}x "
            f"{r['best_round_speedup']:9.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": str(device), "torch": torch.__version__, "rows": rows}, f, indent=2
            )


if __name__ == "__main__":
    main()
