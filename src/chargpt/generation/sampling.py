"""Turning next-character logits into a sampled character: temperature, top-k, top-p (nucleus).

The order is the usual one: divide by the temperature, keep the k likeliest characters, keep the
nucleus of those, renormalise, sample. Ties are broken towards the smaller token id, so a filter
always keeps exactly the same set for the same logits.

Two ways to draw: `sample_next`, with torch.Generators (one per row: a row's draw depends on its
own generator only), and `sample_seeded`, where a row's random numbers are a hash of its seed,
its draw count and the token id: no generator state, the same numbers on every device, a few
batched operations whatever the number of rows (what decoding on a GPU runs, see
`chargpt.generation.graphs`). Both draw each row from the same distribution; for the same seed
they draw different ids. Greedy (temperature 0) is the same argmax in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.nn import functional as F

Generators = torch.Generator | Sequence[torch.Generator] | None


class Controls(NamedTuple):
    """What shapes a draw (SampleConfig's fields of the same names)."""

    temperature: float = 1.0
    top_k: int | None = 0
    top_p: float = 1.0


# Below this temperature, logits / temperature overflow float32 (1e-40 turns a logit gap of 1
# into inf, and softmax into NaN), so sampling is greedy: the limit of a shrinking temperature.
GREEDY_BELOW = 1e-5


def filter_logits(logits: torch.Tensor, top_k: int | None = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) -> (B, V): -inf for every logit outside the top k (0 or None: no limit) and outside
    the nucleus (the fewest likeliest characters whose probability reaches `top_p`)."""
    if not top_k and top_p >= 1.0:
        return logits
    # likeliest first; stable, so equal logits keep token-id order and ties break the same way
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # (B, V)
    keep = torch.ones_like(sorted_logits, dtype=torch.bool)  # (B, V), in sorted order
    if top_k:
        keep[:, top_k:] = False  # exactly min(k, V) candidates, even among ties
    if top_p < 1.0:
        probs = F.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)  # (B, V)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the likelier characters
        keep &= mass_before < top_p  # the first character is always kept
    keep = torch.zeros_like(keep).scatter(-1, order, keep)  # back to token-id order: (B, V)
    return logits.masked_fill(~keep, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = 0,
    top_p: float = 1.0,
    generator: Generators = None,
) -> torch.Tensor:
    """Pick one token id per row of `logits` (B, V); a temperature below 1e-5 (0 included) is
    greedy. Returns (B, 1).

    `generator` is one torch.Generator for the whole batch, or a sequence of one per row: then
    row i's draw depends on its own generator only, so a batch reproduces one-at-a-time samples."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1, keepdim=True)  # greedy: the first of the likeliest characters
    logits = filter_logits(logits.float() / temperature, top_k, top_p)  # < 1 sharpens, > 1 flattens
    probs = F.softmax(logits, dim=-1)  # (B, V); zero outside the kept set
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
    # torch.multinomial(p, 1, generator=g) for each row is the race argmax p / E, E ~ Exp(1)
    # drawn from g: drawn so, with one division and one argmax for all rows, the ids are the
    # same without a multinomial call (and its checks) per row
    if bool(probs.isnan().any()):  # the softmax of NaN logits: what multinomial refuses
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    waits = [
        torch.empty_like(p).exponential_(1, generator=g)
        for p, g in zip(probs, generator, strict=True)
    ]
    return (probs / torch.stack(waits)).argmax(dim=-1, keepdim=True)  # (B, 1)


MASK32 = 0xFFFFFFFF


def mul32(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(x * factor) mod 2**32 for int64 tensors holding 32-bit values, without overflowing
    int64: the product is taken in two 16-bit halves of x."""
    low, high = x & 0xFFFF, x >> 16
    return (low * factor + (((high * factor) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with good avalanche (Wellons' lowbias32), on int64 tensors."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniforms(seeds: torch.Tensor, counts: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(R, V) numbers uniform in (0, 1), one per row and token id: a hash of the row's seed (any
    int64 >= 0), its count of draws so far and the token id. A row's numbers depend on those
    alone, so row i of a batch gets what a batch of one with its seed and count gets."""
    seed = mix32((seeds & MASK32) ^ mix32(seeds >> 32))  # (R,): 64 seed bits into 32
    key = mix32(seed ^ mix32(counts & MASK32))[:, None]  # (R, 1): this draw's stream
    tokens = torch.arange(vocab_size, device=seeds.device)  # (V,)
    bits = mix32(key ^ mix32(tokens + 0x9E3779B9))  # (R, V), 32 random bits each
    return ((bits >> 8).float() + 0.5) * 2.0**-24  # 24 bits: exact in fp32, never 0 or 1


def sample_seeded(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float,
    seeds: torch.Tensor,
    counts: torch.Tensor,
) -> torch.Tensor:
    """`sample_next`'s choice (same filters, same greedy rule) with `counter_uniforms`' random
    numbers for (R,) `seeds` and `counts`, on the logits' device: (R, V) -> (R, 1). The draw is
    an exponential race: the token with the largest p / E, E = -log(u) ~ Exp(1), is token i with
    probability p_i."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1, keepdim=True)
    probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    waits = -counter_uniforms(seeds, counts, logits.shape[-1]).log()  # (R, V), > 0
    return (probs / waits).argmax(dim=-1, keepdim=True)  # (R, 1); 0 outside the kept set
