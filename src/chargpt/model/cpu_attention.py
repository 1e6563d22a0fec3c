"""Causal self-attention on a CPU: with dropout, computed in cache-sized blocks; without, the
fused kernel in the dtype training chose for it.

`scaled_dot_product_attention` has a fast fused CPU kernel, but not with dropout: then it builds
every (T, T) weight matrix of every head at once, far more than the caches hold, and draws the
dropout mask with `bernoulli_`, which on AMD CPUs runs on one core at about 6 ns per weight. This
path computes the same function a chunk of (batch, head) slices and a block of query rows at a
time, so that each block's weights stay in cache from the scores to the output (and back in the
backward pass); a block of rows meets only the keys it may see, which skips most of the weights
the causal mask zeroes; and the dropout mask comes from `torch.rand`, three times cheaper.

Without dropout the fused kernel is fast, except its bf16 backward pass on some CPUs with fast
bf16 matmuls (measured slower than fp32's at start-up): there training runs it in fp32.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

CHUNK_BYTES = 4 * 2**20  # fp32 weights of one block of rows for a whole chunk: stays in cache
QUERY_BLOCKS = 4  # causal: the i-th block of query rows needs only the first i blocks of keys


def dropout_mask(wei: torch.Tensor, p: float) -> torch.Tensor:
    """nn.Dropout's multiplier for `wei`: 0 with probability p, else 1/(1-p). The uniform draws
    are fp32 whatever wei's dtype, so p is exact to 2**-24."""
    keep = torch.rand(wei.shape, device=wei.device).ge_(p).mul_(1 / (1 - p))
    return keep.to(wei.dtype)  # same shape as wei


def rows_per_block(T: int) -> int:
    return -(-T // QUERY_BLOCKS)  # ceil(T / QUERY_BLOCKS)


def slices_per_chunk(T: int) -> int:
    """How many (batch, head) slices' fp32 weights for one block of rows fit in CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * rows_per_block(T) * T))


def blocks(N: int, T: int, chunk: int) -> Iterator[tuple[slice, slice, int]]:
    """(chunk of slices, block of query rows, keys those rows see) for every block, in order."""
    rows = rows_per_block(T)
    for first in range(0, N, chunk):
        for start in range(0, T, rows):
            end = min(start + rows, T)
            yield slice(first, first + chunk), slice(start, end), end


class ChunkedCausalAttention(torch.autograd.Function):
    """softmax(q k^T + causal mask) v with dropout on the weights, block by block; q comes scaled
    by 1/sqrt(hs). Each block's weights and dropout mask are kept for the backward pass, as
    autograd would keep them, but the gradients are summed in place: through autograd, the
    zero-filled slices and concatenations of the blocks took a third of the time."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float, chunk: int
    ) -> torch.Tensor:
        N, T, hs = q.shape
        # the causal mask as an additive bias: 0 on and below the diagonal, -inf above it
        bias = torch.full((T, T), float("-inf"), device=q.device, dtype=q.dtype).triu(1)
        y = torch.empty_like(q)  # (N, T, hs)
        saved = []
        for n, rows, end in blocks(N, T, chunk):  # c slices, r rows, `end` keys
            # affinities: (r, end) bias + (c, r, hs) @ (c, hs, end) -> (c, r, end)
            wei = torch.baddbmm(bias[rows, :end], q[n, rows], k[n, :end].transpose(1, 2))
            wei = wei.softmax(dim=-1)  # (c, r, end): each row sums to 1
            keep = dropout_mask(wei, p)  # (c, r, end): 0 or 1/(1-p)
            # weighted sum of values: (c, r, end) @ (c, end, hs) -> (c, r, hs)
            torch.bmm(wei * keep, v[n, :end], out=y[n, rows])
            saved += [wei, keep]
        ctx.save_for_backward(q, k, v, *saved)
        ctx.chunk = chunk
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, *saved = ctx.saved_tensors
        N, T, _ = q.shape
        dq, dk, dv = (torch.zeros_like(t) for t in (q, k, v))  # (N, T, hs) each
        weights = zip(saved[::2], saved[1::2], strict=True)
        for (n, rows, end), (wei, keep) in zip(blocks(N, T, ctx.chunk), weights, strict=True):
            dy_rows = dy[n, rows]  # (c, r, hs)
            dv[n, :end] += (wei * keep).transpose(1, 2) @ dy_rows  # (c, end, r) @ (c, r, hs)
            # back through the sum of values, then the dropout: (c, r, hs) @ (c, hs, end)
            d_wei = (dy_rows @ v[n, :end].transpose(1, 2)).mul_(keep)
            # through the softmax: wei * (d_wei - sum over the row of d_wei * wei)
            d_scores = torch._softmax_backward_data(d_wei, wei, -1, wei.dtype)  # (c, r, end)
            torch.bmm(d_scores, k[n, :end], out=dq[n, rows])  # (c, r, end) @ (c, end, hs)
            dk[n, :end] += d_scores.transpose(1, 2) @ q[n, rows]  # (c, end, r) @ (c, r, hs)
        return dq, dk, dv, None, None


def chunked_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, chunk: int | None = None
) -> torch.Tensor:
    """What `scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)` computes,
    `chunk` (batch, head) slices at a time (default: `slices_per_chunk(T)`), in q's dtype (under
    autocast, that of the projection that made q): (B, nh, T, hs) -> (B, nh, T, hs)."""
    B, nh, T, hs = q.shape
    # scale the queries rather than the (T, T) scores: same result, T / hs times less work
    q = q * hs**-0.5  # (B, nh, T, hs)
    q, k, v = (t.reshape(B * nh, T, hs) for t in (q, k, v))  # one (T, hs) slice per batch, head
    with torch.autocast(q.device.type, enabled=False):  # q, k and v already share a dtype
        y = ChunkedCausalAttention.apply(q, k, v, dropout_p, chunk or slices_per_chunk(T))
    return y.view(B, nh, T, hs)


def fused_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, dtype: torch.dtype | None
) -> torch.Tensor:
    """`scaled_dot_product_attention(q, k, v, is_causal=True)` in `dtype` (None: q's) whatever
    the autocast's: on CPUs where the bf16 kernel's backward pass is slow, training runs it in
    fp32 (chargpt.model.precision): (B, nh, T, hs) -> (B, nh, T, hs), in `dtype`."""
    if dtype is None or dtype == q.dtype:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    with torch.autocast(q.device.type, enabled=False):  # autocast would cast them back
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
