"""Turning next-character logits into a sampled character: temperature, top-k, top-p (nucleus).

The order is the usual one: divide by the temperature, keep the k likeliest characters, keep the
nucleus of those, renormalise, sample. Ties are broken towards the smaller token id, so a filter
always keeps exactly the same set for the same logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

Generators = torch.Generator | Sequence[torch.Generator] | None

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
    rows = [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator, strict=True)]
    return torch.stack(rows)  # (B, 1)
