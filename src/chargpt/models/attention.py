"""Causal self-attention with dropout on a CPU, computed in cache-sized chunks.

`scaled_dot_product_attention` has a fast fused CPU kernel, but not with dropout: then it builds
every (T, T) weight matrix of every head at once, far more than the caches hold, and draws the
dropout mask with `bernoulli_`, which on AMD CPUs runs on one core at about 6 ns per weight. This
path computes the same function a few (batch, head) slices at a time, so that each chunk's weights
stay in cache from the scores to the output (and back again in the backward pass), skips most of
the weights that the causal mask zeroes, and draws its dropout mask from `torch.rand`, about
three times cheaper per weight.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 2 * 2**20  # fp32 (T, T) weights per chunk: one core's L2 cache on a recent x86 CPU
QUERY_BLOCKS = 4  # causal: the i-th block of query rows needs only the first i key blocks


def slices_per_chunk(T: int) -> int:
    """How many (T, T) fp32 weight matrices fit in CHUNK_BYTES (at least one)."""
    return max(1, CHUNK_BYTES // (4 * T * T))


def attention_dropout(wei: torch.Tensor, p: float) -> torch.Tensor:
    """Zero each weight with probability p and scale the kept ones by 1/(1-p), as nn.Dropout does.
    The uniform draws are fp32 whatever wei's dtype, so p is exact to 2**-24."""
    keep = torch.rand(wei.shape, device=wei.device).ge_(p).mul_(1 / (1 - p))  # 0 or 1/(1-p)
    return wei * keep.to(wei.dtype)  # same shape as wei


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, p: float
) -> torch.Tensor:
    """One chunk of n (batch, head) slices, q already scaled by 1/sqrt(hs). The queries go in
    QUERY_BLOCKS blocks of rows, and rows start..end-1 only meet keys 0..end-1: the later keys
    are masked out anyway, so with 4 blocks 5/8 of the (T, T) work is done."""
    T = q.shape[1]
    rows = -(-T // QUERY_BLOCKS)  # ceil(T / QUERY_BLOCKS)
    out = []
    for start in range(0, T, rows):
        end = min(start + rows, T)
        q_rows, k_seen, v_seen = q[:, start:end], k[:, :end], v[:, :end]  # r = end - start rows
        # affinities, with -inf added above the diagonal so that the future gets no weight
        wei = torch.baddbmm(bias[start:end, :end], q_rows, k_seen.transpose(1, 2))  # (n, r, end)
        wei = wei.softmax(dim=-1)  # (n, r, end): each row sums to 1
        wei = attention_dropout(wei, p)  # (n, r, end)
        out.append(wei @ v_seen)  # weighted sum of values: (n, r, end) @ (n, end, hs) -> (n, r, hs)
    return torch.cat(out, dim=1)  # (n, T, hs)


def chunked_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, chunk: int | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs), causal) v with dropout p on the weights, as
    `scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)` computes it, `chunk`
    (batch, head) slices at a time (default: `slices_per_chunk(T)`). (B, nh, T, hs) -> same."""
    B, nh, T, hs = q.shape
    chunk = chunk or slices_per_chunk(T)
    # scale the queries rather than the (T, T) scores: same result, T / hs times less work
    q = q * hs**-0.5  # (B, nh, T, hs)
    # the causal mask as an additive bias: 0 on and below the diagonal, -inf above it
    bias = torch.full((T, T), float("-inf"), device=q.device, dtype=q.dtype).triu(1)  # (T, T)
    # (B, nh, T, hs) -> (B * nh, T, hs), cut into chunks of `chunk` slices along the first axis
    q, k, v = (t.reshape(B * nh, T, hs).split(chunk) for t in (q, k, v))
    out = [attend(*qkv, bias, dropout_p) for qkv in zip(q, k, v, strict=True)]
    return torch.cat(out).view(B, nh, T, hs)
