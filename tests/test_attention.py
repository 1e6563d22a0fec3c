"""Chunked CPU attention: the fused path's function, checked against SDPA and the lab's heads."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from chargpt.model import CausalSelfAttention, MultiHeadAttention
from chargpt.model.cpu_attention import chunked_causal_attention, dropout_mask, slices_per_chunk

pytestmark = pytest.mark.usefixtures("one_thread")

B, NH, HS = 3, 5, 4  # 15 (batch, head) slices: not a multiple of chunks of 2, 4 or 6


def qkv(T: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, NH, T, HS, generator=gen, requires_grad=True) for _ in range(3)]


def output_and_grads(fn, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    for t in tensors:
        t.grad = None
    y = fn(*tensors)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return [y.detach()] + [t.grad for t in tensors]


@pytest.mark.parametrize("T", [1, 7, 16])
@pytest.mark.parametrize("chunk", [1, 4, 6, 15, None])
def test_equals_sdpa_forward_and_gradients(T, chunk):
    tensors = qkv(T)
    expected = output_and_grads(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), tensors
    )
    got = output_and_grads(lambda q, k, v: chunked_causal_attention(q, k, v, 0.0, chunk), tensors)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


@pytest.mark.parametrize("T", [1, 9])
def test_equals_the_lab_heads_with_copied_weights(T):
    C = NH * HS
    torch.manual_seed(0)
    fused = CausalSelfAttention(C, NH, dropout=0.0)
    reference = MultiHeadAttention(C, NH, block_size=16, dropout=0.0)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(B, T, C, requires_grad=True)

    def chunked(x: torch.Tensor) -> torch.Tensor:  # the fused module, chunked attention forced
        q, k, v = fused.qkv(x).view(B, T, 3, NH, HS).permute(2, 0, 3, 1, 4)
        y = chunked_causal_attention(q, k, v, 0.0, chunk=4)
        return fused.proj(y.transpose(1, 2).reshape(B, T, C))

    got = output_and_grads(chunked, [x])
    expected = output_and_grads(reference, [x])
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)
    # the qkv weight's gradient is the heads' query, key and value gradients, stacked
    stacked = [
        torch.cat([getattr(head, name).weight.grad for head in reference.heads])
        for name in ("query", "key", "value")
    ]
    torch.testing.assert_close(fused.qkv.weight.grad, torch.cat(stacked), atol=1e-5, rtol=0)


def test_gradients_with_dropout_match_finite_differences():
    """The hand-written backward, dropout included: reseeding draws the same masks every call."""

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)
        return chunked_causal_attention(q, k, v, 0.3, chunk=2)

    tensors = [t.detach()[:1, :3].double().requires_grad_() for t in qkv(6)]
    no_dropout = chunked_causal_attention(*tensors, 0.0)
    assert not torch.allclose(attention(*tensors), no_dropout)  # some weights were dropped
    assert torch.autograd.gradcheck(attention, tensors)


def test_dropout_keeps_or_scales_each_weight_by_hand():
    """q = k = 0 gives row t the uniform weights 1/(t+1); v = identity shows each weight, so
    every causal entry of row t must be 0 (dropped) or 1/(t+1) / (1 - p) (kept)."""
    T, p = 8, 0.25
    q = k = torch.zeros(1, 1, T, T)
    v = torch.eye(T).view(1, 1, T, T)
    torch.manual_seed(0)
    wei = chunked_causal_attention(q, k, v, p)[0, 0]  # row t: row t's weights after dropout
    t = torch.arange(T).view(T, 1)
    kept = torch.isclose(wei, 1 / (t + 1) / (1 - p))
    assert torch.all(kept | (wei == 0))
    assert torch.all(wei.triu(1) == 0)  # the future stays masked
    n_causal = T * (T + 1) // 2
    assert 0 < int(kept.sum()) < n_causal  # some weights dropped, some kept


def test_dropout_averages_to_the_no_dropout_output():
    q, k, v = (t.detach()[:1, :2] for t in qkv(6, seed=1))
    exact = chunked_causal_attention(q, k, v, 0.0)
    n = 50_000  # draws: the same slices repeated along the batch axis get independent masks
    torch.manual_seed(0)
    draws = chunked_causal_attention(*(t.expand(n, -1, -1, -1) for t in (q, k, v)), 0.3)
    assert not torch.allclose(draws[0], exact, atol=1e-3)
    standard_error = draws.std(0) / n**0.5  # of each output's mean over the draws
    assert torch.all((draws.mean(0) - exact[0]).abs() <= 5 * standard_error)


def test_drop_rate_is_p():
    torch.manual_seed(0)
    keep = dropout_mask(torch.ones(4, 64, 64), 0.2)
    assert set(keep.unique().tolist()) == {0.0, 1.25}
    dropped = (keep == 0).float().mean().item()
    assert abs(dropped - 0.2) < 0.015  # 16,384 draws: 4.8 standard deviations


def test_chunks_hold_at_least_one_slice():
    assert slices_per_chunk(256) == 64  # 4 MiB of fp32 weights for a block of 64 rows
    assert slices_per_chunk(4096) == 1


@pytest.mark.parametrize(
    ("training", "dropout", "device", "chunked"),
    [
        (True, 0.2, "cpu", True),
        (False, 0.2, "cpu", False),  # eval: no dropout, SDPA's fused kernel
        (True, 0.0, "cpu", False),
        (True, 0.2, "meta", False),  # another device (as a GPU would be): SDPA
    ],
)
def test_chunked_only_when_training_with_dropout_on_cpu(
    monkeypatch, training, dropout, device, chunked
):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return chunked_causal_attention(*args, **kwargs)

    monkeypatch.setattr("chargpt.model.gpt.chunked_causal_attention", spy)
    attn = CausalSelfAttention(8, 2, dropout).to(device).train(training)
    assert attn(torch.zeros(2, 5, 8, device=device)).shape == (2, 5, 8)
    assert bool(calls) == chunked
