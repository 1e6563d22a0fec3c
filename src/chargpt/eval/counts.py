"""Closed-form references from character counts: the unigram and the count-based bigram.

The trained bigram should land near the count-based bigram, the best any bigram can do (up to
smoothing); a GPT lands below it as far as it uses its context. Counts are read a chunk at a
time, so memory does not grow with the corpus (memory-mapped splits stay on disk).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from chargpt.data.dataset import CharDataset, JoinedTokens, Tokens
from chargpt.eval.evaluate import Loss

CHUNK = 1 << 22  # tokens read at a time


def chunks(tokens: Tokens, overlap: int = 0) -> Iterator[np.ndarray]:
    """`tokens` as int64 pieces of CHUNK tokens, each also holding the `overlap` tokens after it
    (so that pairs across two pieces are seen once)."""
    for start in range(0, len(tokens) - overlap, CHUNK):
        yield np.asarray(tokens[start : start + CHUNK + overlap], dtype=np.int64)


def count_cross_entropy(
    train: Tokens, tokens: Tokens, vocab_size: int, order: int, smoothing: float = 1.0
) -> float:
    """Closed-form references from character counts on `train`, scored on `tokens`, in nats.

    order 1 (unigram): p(c) = (n(c) + s) / (N + s V), scored on every token.
    order 2 (bigram): p(c | a) = (n(a c) + s) / (n(a .) + s V), scored on tokens[1:] given the
    token before; this is the model the trained bigram approximates (add-`s` smoothing).
    Both read their inputs a chunk at a time, so memory does not grow with the corpus.
    """
    V = vocab_size
    if order == 1:
        counts = np.full(V, smoothing, dtype=np.float64)
        for piece in chunks(train):
            counts += np.bincount(piece, minlength=V)
        probs = counts / counts.sum()
        total = sum(-np.log(probs[piece]).sum() for piece in chunks(tokens))
        return float(total / len(tokens))
    if order == 2:
        counts = np.full(V * V, smoothing, dtype=np.float64)  # counts[a * V + c] = n(a c) + s
        for piece in chunks(train, overlap=1):
            counts += np.bincount(piece[:-1] * V + piece[1:], minlength=V * V)
        probs = (counts.reshape(V, V) / counts.reshape(V, V).sum(axis=1, keepdims=True)).ravel()
        pairs = chunks(tokens, overlap=1)
        total = sum(-np.log(probs[piece[:-1] * V + piece[1:]]).sum() for piece in pairs)
        return float(total / (len(tokens) - 1))
    raise ValueError(f"order must be 1 or 2, got {order}")


@dataclass
class CountReference:
    """A closed-form model from character counts on the training split, add-one smoothed."""

    label: str
    table_size: int
    train: Loss  # cross-entropy on the training split
    val: Loss  # cross-entropy on every validation character


def count_references(data: CharDataset, vocab_size: int) -> list[CountReference]:
    """The unigram and count-based bigram, scored on the same characters as the full pass (the
    bigram predicts the first validation character from the last training character)."""
    V = vocab_size
    val_with_context = JoinedTokens(np.asarray(data.train[-1:]), data.val)
    return [
        CountReference(
            "unigram counts",
            V,
            Loss(count_cross_entropy(data.train, data.train, V, order=1)),
            Loss(count_cross_entropy(data.train, data.val, V, order=1)),
        ),
        CountReference(
            "bigram counts",
            V * V,
            Loss(count_cross_entropy(data.train, data.train, V, order=2)),
            Loss(count_cross_entropy(data.train, val_with_context, V, order=2)),
        ),
    ]
