import numpy as np
import pytest
import torch

from chargpt.data.dataset import CharDataset
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError


def test_split_is_first_90_percent_then_last_10(shakespeare, shakespeare_tokenizer):
    ds = CharDataset.from_text(shakespeare, shakespeare_tokenizer)
    n = int(0.9 * len(shakespeare))
    assert len(ds.train) == n == 1_003_854
    assert len(ds.val) == len(shakespeare) - n
    assert shakespeare_tokenizer.decode(ds.val[:20].tolist()) == shakespeare[n : n + 20]
    assert ds.train.dtype == np.uint8


def test_get_batch_targets_are_inputs_shifted_by_one():
    text = "".join(np.random.default_rng(0).choice(list("abcdefgh"), 1000))  # windows unique
    tok = CharTokenizer.from_text(text)
    ds = CharDataset.from_text(text, tok)
    x, y = ds.get_batch("val", 8, 10, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 10)
    assert x.dtype == torch.long
    val = ds.val.astype(np.int64)
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        start = next(i for i in range(len(val) - 10) if val[i : i + 10].tolist() == row_x)
        assert row_y == val[start + 1 : start + 11].tolist()


def test_get_batch_is_reproducible_with_a_seeded_generator(shakespeare, shakespeare_tokenizer):
    ds = CharDataset.from_text(shakespeare[:10_000], shakespeare_tokenizer)
    a = ds.get_batch("train", 4, 32, torch.Generator().manual_seed(7))
    b = ds.get_batch("train", 4, 32, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_split_shorter_than_block_size_plus_one_is_refused():
    text = "abcdefghij" * 10  # 100 characters: val has 10
    ds = CharDataset.from_text(text, CharTokenizer.from_text(text))
    ds.check_block_size(9)
    with pytest.raises(ChargptError, match=r"val split has 10 characters.*--block-size"):
        ds.check_block_size(10)
