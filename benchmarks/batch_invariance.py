"""Does a row's result depend on the other rows when the shapes of a step change, on this CPU?

    python benchmarks/batch_invariance.py   # seconds, one thread

`chargpt serve` steps only the busy slots over the keys they need (`SlotDecoder`), so the number
of rows and of keys changes from step to step. This prints, at the lab model's sizes, which
shapes give row 0 the very same bits: a linear layer for 1 to 16 rows; attention of one query
over its own keys, padded (masked) to other key lengths and batched with other rows; and a whole
decode step, one slot alone against the same slot beside three busy ones, with lean and with
fixed (--deterministic) step shapes. Different classes mean that "alone == batched" holds only
with fixed shapes (docs/serving.md, "Step shapes").
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from chargpt.config import ModelConfig
from chargpt.generation.decoders import SlotDecoder
from chargpt.model import GPTLanguageModel

C, HEADS, HEAD_SIZE, BLOCK = 384, 6, 64, 256  # the lab's sizes


def classes(results: dict) -> str:
    """Results grouped by identical bits: `key, key | key` (one group per `|`)."""
    groups: list[tuple[torch.Tensor, list]] = []
    for key, value in results.items():
        for first, members in groups:
            if torch.equal(first, value):
                members.append(key)
                break
        else:
            groups.append((value, [key]))
    return " | ".join(", ".join(str(key) for key in members) for _, members in groups)


def linear_rows(dtype: torch.dtype) -> str:
    weight = torch.randn(3 * C, C, dtype=dtype) * 0.02
    x = torch.randn(16, C, dtype=dtype)
    return classes({rows: F.linear(x[:rows], weight)[:1] for rows in range(1, 17)})


def attention_keys(dtype: torch.dtype, own: int = 40) -> str:
    """Row 0 has `own` keys; as (keys read, rows in the batch)."""
    k = torch.randn(16, HEADS, BLOCK, HEAD_SIZE, dtype=dtype)
    v, q = torch.randn_like(k), torch.randn(16, HEADS, 1, HEAD_SIZE, dtype=dtype)
    results = {}
    for keys in (own, 64, 128, BLOCK):
        for rows in (1, 4, 16):
            mask = (torch.arange(keys) < own).expand(rows, 1, 1, keys)
            y = F.scaled_dot_product_attention(
                q[:rows], k[:rows, :, :keys], v[:rows, :, :keys], attn_mask=mask
            )
            results[(keys, rows)] = y[:1]
    return classes(results)


@torch.inference_mode()
def decode_alone_and_beside_others(deterministic: bool, steps: int = 40) -> tuple[bool, float]:
    """Slot 0's logits alone and beside three busy slots: (bit for bit equal, max difference)."""
    torch.manual_seed(0)
    model = GPTLanguageModel(ModelConfig(dropout=0.0), 65).eval()
    ids = torch.randint(65, (4, 60 + steps), generator=torch.Generator().manual_seed(1)).tolist()

    def run(slots: int) -> torch.Tensor:
        decoder = SlotDecoder(model, 16, deterministic=deterministic)
        for slot in range(slots):
            decoder.start(slot, ids[slot][: 10 + 15 * slot])
        rows = []
        for t in range(steps):
            decoder.append({slot: ids[slot][60 + t] for slot in range(slots)})
            rows.append(decoder.logits([0])[0])
        return torch.stack(rows)

    alone, beside = run(1), run(4)
    return torch.equal(alone, beside), (alone - beside).abs().max().item()


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"# PyTorch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, 1 thread")
    print("groups of shapes that give row 0 the same bits ('|' separates the groups)\n")
    for dtype in (torch.float32, torch.bfloat16):
        print(f"{dtype}: linear {C} -> {3 * C}, rows: {linear_rows(dtype)}")
        print(f"{dtype}: attention (keys, rows): {attention_keys(dtype)}")
    for deterministic in (False, True):
        equal, difference = decode_alone_and_beside_others(deterministic)
        shapes = "fixed (--deterministic)" if deterministic else "lean (default)"
        print(f"decode step, {shapes}: alone == beside 3 others: {equal} (max {difference:.1e})")


if __name__ == "__main__":
    main()
