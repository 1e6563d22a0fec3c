"""Sampling controls: top-k and top-p keep exactly their sets, temperature 0 is greedy, and
per-row generators make a batch reproduce one-at-a-time draws."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chargpt.generation.sampling import filter_logits, sample_next

DRAWS = 4000


def draws(logits: list[float], **controls) -> set[int]:
    """The set of ids drawn from one fixed distribution, DRAWS times in one batch."""
    batch = torch.tensor([logits]).repeat(DRAWS, 1)
    generator = torch.Generator().manual_seed(0)
    return set(sample_next(batch, generator=generator, **controls)[:, 0].tolist())


def test_top_k_draws_exactly_the_k_likeliest_with_ties_broken_by_id():
    # ids 1, 2, 4 tie for first place; k=2 keeps the two smaller ids of the tie
    logits = [0.0, 2.0, 2.0, -1.0, 2.0, 1.0]
    assert draws(logits, top_k=2) == {1, 2}
    assert draws(logits, top_k=4) == {1, 2, 4, 5}
    assert draws(logits, top_k=100) == set(range(6))  # k above the vocabulary: no limit


def test_top_p_draws_only_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15])  # sorted: 1 (.5), 3 (.2), 4 (.15), 2, 0
    logits = probs.log().tolist()
    assert draws(logits, top_p=0.3) == {1}  # 0.5 alone reaches 0.3
    assert draws(logits, top_p=0.6) == {1, 3}  # 0.5 + 0.2 = 0.7 >= 0.6
    assert draws(logits, top_p=0.8) == {1, 3, 4}  # 0.85 >= 0.8
    assert draws(logits, top_p=1.0) == set(range(5))
    # top_p applies to the distribution that top_k leaves: {1, 3} renormalised is (5/7, 2/7)
    assert draws(logits, top_k=2, top_p=0.9) == {1, 3}
    assert draws(logits, top_k=3, top_p=0.8) == {1, 3}  # .5/.85 + .2/.85 = 0.82 >= 0.8


def test_temperature_zero_is_argmax_and_first_on_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0], [5.0, 1.0, 5.0]])
    assert sample_next(logits, temperature=0).tolist() == [[1], [0]]


def test_low_temperature_concentrates_and_high_flattens():
    logits = [0.0, 1.0]
    batch = torch.tensor([logits]).repeat(DRAWS, 1)
    cold = sample_next(batch, 0.1, generator=torch.Generator().manual_seed(1)).float().mean()
    hot = sample_next(batch, 10.0, generator=torch.Generator().manual_seed(1)).float().mean()
    # P(id 1) = sigmoid(1 / T): 0.99995 at T=0.1, 0.525 at T=10
    assert cold > 0.99
    assert 0.45 < hot < 0.6


def test_per_row_generators_reproduce_one_row_at_a_time():
    logits = torch.randn(5, 20, generator=torch.Generator().manual_seed(3))
    batch = sample_next(logits, 1.0, 5, 0.9, [torch.Generator().manual_seed(s) for s in range(5)])
    alone = [
        sample_next(logits[i : i + 1], 1.0, 5, 0.9, [torch.Generator().manual_seed(i)])
        for i in range(5)
    ]
    assert batch.tolist() == torch.cat(alone).tolist()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.integers(0, 5), st.sampled_from([(1.0, 0, 1.0), (0.8, 4, 0.9)]))
def test_per_row_generators_draw_what_a_multinomial_per_row_draws(seed, skip, controls):
    """The batched draw of per-row generators gives the ids, and leaves the generators in the
    states, that a `torch.multinomial` call per row gives (what `chargpt sample` drew before)."""
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(seed))
    ours, theirs = ([torch.Generator().manual_seed(seed + i) for i in range(6)] for _ in range(2))
    for _ in range(skip):  # generators part-way through their streams
        sample_next(logits, *controls, ours)
        sample_next(logits, *controls, theirs)
    probs = filter_logits(logits / controls[0], controls[1], controls[2]).softmax(-1)
    expected = [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, theirs, strict=True)]
    assert sample_next(logits, *controls, ours).tolist() == torch.stack(expected).tolist()
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(ours, theirs, strict=True))


def test_a_distribution_that_is_not_one_is_refused_as_multinomial_refuses_it():
    generators = [torch.Generator() for _ in range(2)]
    with pytest.raises(RuntimeError, match=r"inf.*nan.*< 0"):
        sample_next(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), 1.0, 0, 1.0, generators)


logit_rows = st.lists(
    st.floats(-5, 5, allow_nan=False).map(lambda x: round(x, 1)), min_size=1, max_size=12
)


@settings(max_examples=60, deadline=None)
@given(logit_rows, st.integers(1, 15))
def test_top_k_keeps_exactly_min_k_v_of_the_largest(row, k):
    logits = torch.tensor([row])
    kept = filter_logits(logits, top_k=k)[0] > float("-inf")
    assert kept.sum().item() == min(k, len(row))
    # every kept logit is at least every dropped one
    if (~kept).any():
        assert logits[0][kept].min() >= logits[0][~kept].max()


@settings(max_examples=60, deadline=None)
@given(logit_rows, st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_set_that_reaches_p(row, p):
    logits = torch.tensor([row])
    probs = torch.softmax(logits[0], dim=0)
    kept = filter_logits(logits, top_p=p)[0] > float("-inf")
    if (~kept).any():
        assert logits[0][kept].min() >= logits[0][~kept].max()  # the likeliest characters
    assert probs[kept].sum() >= p - 1e-5  # reaches p...
    smallest_kept = probs[kept].min()
    assert probs[kept].sum() - smallest_kept < p + 1e-5  # ...and not without its last member
