"""Properties over arbitrary inputs (hypothesis): the tokenizer and the batch windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chargpt.data.dataset import CharDataset
from chargpt.data.tokenizer import CharTokenizer, UnknownCharactersError

# any Unicode text: every plane, combining marks, controls, NUL, newlines
unicode_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=200)


@given(unicode_text)
def test_round_trip_on_arbitrary_unicode(text: str) -> None:
    tokenizer = CharTokenizer.from_text(text)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) == len(text)  # one token per character (code point)
    assert ids == tokenizer.encode_array(text).tolist()  # the vectorised path agrees
    assert tokenizer.vocab_size == len(set(text))


@given(vocabulary=unicode_text, query=st.text(st.characters(exclude_categories=("Cs",))))
def test_encode_rejects_exactly_the_strings_with_unseen_characters(
    vocabulary: str, query: str
) -> None:
    tokenizer = CharTokenizer.from_text(vocabulary)
    unseen = set(query) - set(vocabulary)
    if unseen:
        with pytest.raises(UnknownCharactersError) as error:
            tokenizer.encode(query)
        assert f"{len(unseen)} character(s) not in the vocabulary" in str(error.value)
        shown = sorted(unseen)[:20]
        assert all(repr(ch) in str(error.value) for ch in shown)
    else:
        assert tokenizer.decode(tokenizer.encode(query)) == query


@settings(max_examples=60, deadline=None)
@given(
    n_train=st.integers(2, 300),
    n_val=st.integers(2, 60),
    block_size=st.integers(1, 64),
    batch_size=st.integers(1, 16),
    seed=st.integers(0, 2**32 - 1),
    split=st.sampled_from(["train", "val"]),
)
def test_get_batch_windows_lie_inside_their_split(
    n_train: int, n_val: int, block_size: int, batch_size: int, seed: int, split: str
) -> None:
    """Every token id is its position in the corpus, so a window shows where it was cut."""
    length = n_train if split == "train" else n_val
    if length < block_size + 1:
        return  # check_block_size refuses such a split before any batch is drawn
    positions = np.arange(n_train + n_val)
    dataset = CharDataset(train=positions[:n_train], val=positions[n_train:])
    generator = torch.Generator().manual_seed(seed)
    x, y = dataset.get_batch(split, batch_size, block_size, generator)
    assert x.shape == y.shape == (batch_size, block_size)
    first, last = (0, n_train) if split == "train" else (n_train, n_train + n_val)
    starts = x[:, :1]
    assert torch.equal(x, starts + torch.arange(block_size))  # contiguous windows
    assert torch.equal(y, x + 1)  # targets: the next character of each input
    assert (starts >= first).all() and (y[:, -1] < last).all()  # inside the split, targets too
