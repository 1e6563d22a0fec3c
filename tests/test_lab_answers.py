"""Every measurable claim in docs/lab_answers.md, checked (parts b, c, f and the toy aggregation).

The attention tests run the package's own `Head`, `MultiHeadAttention` and `CausalSelfAttention`.
Tests marked `docs` check PyTorch or arithmetic alone (the lab's answers rest on them): they run
with the suite as documentation, but they test nothing of chargpt (`pytest -m "not docs"`
leaves them out).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from chargpt.config import ModelConfig
from chargpt.errors import ChargptError
from chargpt.model import CausalSelfAttention, Head, MultiHeadAttention

# --- the toy aggregation: tril-normalised weights are running means --------------------------


@pytest.mark.docs
def test_lab_toy_example_by_hand():
    """The notebook's own numbers: a = normalised tril(ones(3, 3)), b as printed, c = a @ b."""
    a = torch.tril(torch.ones(3, 3))
    a = a / a.sum(1, keepdim=True)
    b = torch.tensor([[2.0, 7.0], [6.0, 4.0], [6.0, 5.0]])
    expected = torch.tensor([[2.0, 7.0], [4.0, 5.5], [14 / 3, 16 / 3]])  # means of rows 0..t
    torch.testing.assert_close(a @ b, expected)


@pytest.mark.docs
@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 12), C=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_tril_weights_and_masked_softmax_both_give_running_means(T, C, seed):
    x = torch.randn(T, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    running_means = x.cumsum(0) / torch.arange(1, T + 1, dtype=torch.float64)[:, None]
    tril = torch.tril(torch.ones(T, T, dtype=torch.float64))
    normalised = tril / tril.sum(1, keepdim=True)
    # the lab's softmax version: zeros where allowed, -inf in the future, softmax per row
    masked = torch.zeros(T, T, dtype=torch.float64).masked_fill(tril == 0, float("-inf"))
    torch.testing.assert_close(normalised @ x, running_means)
    torch.testing.assert_close(F.softmax(masked, dim=-1) @ x, running_means)


# --- (b) learned Q and K instead of X X^T ---------------------------------------------------


def head_with(query: torch.Tensor, key: torch.Tensor) -> Head:
    """A real `Head` (C = head_size = 4) with given query/key maps and value = identity, so that
    its output at position t is sum_j w_tj x_j and orthonormal inputs reveal the weights w."""
    head = Head(n_embd=4, head_size=4, block_size=4, dropout=0.0).eval()
    with torch.no_grad():
        head.query.weight.copy_(query)
        head.key.weight.copy_(key)
        head.value.weight.copy_(torch.eye(4))
    return head


def attention_weights(head: Head, x: torch.Tensor) -> torch.Tensor:
    """(T, T) weights of a head whose value map is the identity, for orthonormal rows x."""
    with torch.no_grad():
        return head(x[None])[0] @ x.T


E = torch.eye(4)  # four orthonormal "embeddings"; a = E[0], b = E[1]


@pytest.mark.docs
def test_x_xt_scores_are_symmetric():
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    scores = x @ x.T
    torch.testing.assert_close(scores, scores.T)  # score(a, b) = score(b, a), always


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), T=st.integers(2, 4))
def test_x_xt_attention_prefers_self_when_norms_are_equal(seed, T):
    """X X^T through a real Head (Q = K = identity): with equal-norm embeddings, Cauchy-Schwarz
    makes every token's largest score the one with itself, so it cannot look mainly elsewhere."""
    x = torch.randn(T, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = (x / x.norm(dim=1, keepdim=True)).float()
    head = head_with(torch.eye(4), torch.eye(4))
    with torch.no_grad():
        weights = head(x[None])[0] @ torch.linalg.pinv(x)  # out = W x, and x has full row rank
    for t in range(T):
        assert weights[t, : t + 1].argmax() == t


def test_learned_q_k_express_b_attends_to_a_but_not_a_to_b():
    a, b = E[0], E[1]
    xxt = head_with(torch.eye(4), torch.eye(4))
    # learned maps: b's query and a's key point along the same direction u = E[2], strongly
    query = 10.0 * torch.outer(E[2], b)  # q(b) = 10 u, q(a) = 0
    key = torch.outer(E[2], a)  # k(a) = u, k(b) = 0
    learned = head_with(query, key)

    b_to_a = attention_weights(learned, torch.stack([a, b]))[1, 0]  # in "a b", b looks at a
    a_to_b = attention_weights(learned, torch.stack([b, a]))[1, 0]  # in "b a", a looks at b
    assert b_to_a > 0.99 and a_to_b == pytest.approx(0.5)  # b attends to a; a has no preference

    # X X^T: the two directions are the same number, whatever the embeddings
    sym_b_to_a = attention_weights(xxt, torch.stack([a, b]))[1, 0]
    sym_a_to_b = attention_weights(xxt, torch.stack([b, a]))[1, 0]
    assert sym_b_to_a == pytest.approx(sym_a_to_b)
    assert sym_b_to_a < 0.5  # and each prefers itself


# --- (c) scaling by 1/sqrt(d_k) --------------------------------------------------------------


def dot_products(d_k: int, n: int = 20000, seed: int = 0) -> torch.Tensor:
    """(n,) scores q . k for independent q, k with independent unit-variance entries."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d_k, generator=g) * torch.randn(n, d_k, generator=g)).sum(-1)


def score_rows(d_k: int, scaled: bool, queries: int = 2000, keys: int = 64) -> torch.Tensor:
    """(queries, keys) attention scores of random unit-variance queries against 64 keys."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(queries, d_k, generator=g) @ torch.randn(keys, d_k, generator=g).T
    return scores / math.sqrt(d_k) if scaled else scores


def mean_entropy(scores: torch.Tensor) -> float:
    p = F.softmax(scores, dim=-1)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean().item()


@pytest.mark.docs
@pytest.mark.parametrize("d_k", [4, 16, 64, 256])
def test_unscaled_variance_grows_like_d_k_scaled_stays_one(d_k):
    scores = dot_products(d_k)
    assert scores.var().item() / d_k == pytest.approx(1.0, rel=0.05)
    assert (scores / math.sqrt(d_k)).var().item() == pytest.approx(1.0, rel=0.05)


WIDTHS = (16, 64, 256, 1024)


@pytest.mark.docs
def test_softmax_entropy_collapses_without_scaling():
    unscaled = [mean_entropy(score_rows(d, scaled=False)) for d in WIDTHS]
    scaled = [mean_entropy(score_rows(d, scaled=True)) for d in WIDTHS]
    # scaled: the same spread-out distribution at every width (uniform over 64 keys: 4.16 nats)
    assert max(scaled) - min(scaled) < 0.1 and min(scaled) > 3.5
    # unscaled: ever more peaked as d_k grows, close to one-hot at d_k = 1024
    assert unscaled == sorted(unscaled, reverse=True)
    assert unscaled[-1] < 0.25
    peak = F.softmax(score_rows(1024, scaled=False), dim=-1).max(-1).values.mean()
    assert peak > 0.9  # one key takes nearly all the weight


def softmax_jacobian_norms(scores: torch.Tensor) -> torch.Tensor:
    """Frobenius norm, per row, of d softmax / d scores = diag(p) - p p^T."""
    p = F.softmax(scores, dim=-1)
    jacobian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.linalg.matrix_norm(jacobian)


@pytest.mark.docs
def test_saturated_softmax_passes_almost_no_gradient():
    unscaled = softmax_jacobian_norms(score_rows(256, scaled=False))
    scaled = softmax_jacobian_norms(score_rows(256, scaled=True))
    # without scaling a large share of queries have a softmax so saturated that almost no
    # gradient reaches their scores; with scaling none do
    assert (unscaled < 0.01).float().mean() > 0.3
    assert (scaled < 0.01).sum() == 0 and scaled.median() > 0.1


def test_head_scales_scores_by_inverse_sqrt_head_size():
    """The package's Head computes softmax(q k^T / sqrt(head_size)) v, masked causally."""
    torch.manual_seed(0)
    head = Head(n_embd=8, head_size=4, block_size=5, dropout=0.0).eval()
    x = torch.randn(2, 5, 8)
    q, k, v = head.query(x), head.key(x), head.value(x)
    causal = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    scores = (q @ k.transpose(-2, -1) / math.sqrt(4)).masked_fill(~causal, float("-inf"))
    with torch.no_grad():
        torch.testing.assert_close(head(x), F.softmax(scores, dim=-1) @ v)


# --- (f) n_head and head_size ------------------------------------------------------------------


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("n_embd", [48, 96, 384])
def test_attention_parameters_do_not_depend_on_n_head(n_embd):
    """With head_size = n_embd // n_head: 3 C^2 (Q, K, V) + C^2 + C (output projection)."""
    expected = 4 * n_embd**2 + n_embd
    for n_head in (1, 2, 3, 4, 6, 12):
        reference = MultiHeadAttention(n_embd, n_head, block_size=8, dropout=0.0)
        fused = CausalSelfAttention(n_embd, n_head, dropout=0.0)
        assert num_parameters(reference) == num_parameters(fused) == expected
        assert all(h.head_size * n_head == n_embd for h in reference.heads)


def test_each_head_scores_are_at_most_head_size_rank():
    """What n_head buys and what it costs: n_head separate attention patterns, each computed
    from head_size-dimensional queries and keys, so each score matrix has rank <= head_size."""
    torch.manual_seed(0)
    C, T = 16, 12
    x = torch.randn(1, T, C)
    for n_head in (1, 4, 8, 16):
        mha = MultiHeadAttention(C, n_head, block_size=T, dropout=0.0)
        with torch.no_grad():
            ranks = [
                torch.linalg.matrix_rank(h.query(x)[0] @ h.key(x)[0].T).item() for h in mha.heads
            ]
        assert len(ranks) == n_head
        assert max(ranks) == min(T, C // n_head)


def test_n_embd_must_split_evenly_into_heads():
    with pytest.raises(ChargptError, match="divisible"):
        ModelConfig(n_embd=30, n_head=4).validate()


def test_every_test_the_answers_cite_exists():
    """docs/lab_answers.md cites its evidence by test name; a renamed test must not go stale."""
    root = Path(__file__).resolve().parents[1]
    cited = set(re.findall(r"`(test_\w+)", (root / "docs" / "lab_answers.md").read_text("utf-8")))
    defined = set(re.findall(r"^def (test_\w+)", Path(__file__).read_text("utf-8"), re.M))
    assert len(cited) >= 10
    assert cited <= defined
