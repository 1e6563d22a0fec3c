import hashlib

import numpy as np
import pytest

from chargpt.data.corpus import resolve_corpus_path
from chargpt.data.tokenizer import CharTokenizer, UnknownCharactersError, smallest_uint_dtype


def test_bundled_corpus_is_tiny_shakespeare(shakespeare):
    assert len(shakespeare) == 1_115_394
    digest = hashlib.sha256(resolve_corpus_path("shakespeare").read_bytes()).hexdigest()
    assert digest == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_lab_encode_assert(shakespeare_tokenizer):
    tok = shakespeare_tokenizer
    # the notebook's own asserts (part a)
    assert tok.encode("hola, que tal?") == [46, 53, 50, 39, 6, 1, 55, 59, 43, 1, 58, 39, 50, 12]
    assert tok.decode(tok.encode("hola, que tal?")) == "hola, que tal?"
    assert tok.vocab_size == 65


def test_stoi_and_itos_are_inverse_over_sorted_characters():
    tok = CharTokenizer.from_text("banana!")
    assert tok.chars == ("!", "a", "b", "n")
    assert tok.stoi == {"!": 0, "a": 1, "b": 2, "n": 3}
    assert tok.itos == {0: "!", 1: "a", 2: "b", 3: "n"}


def test_unknown_characters_are_listed():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UnknownCharactersError, match=r"2 character\(s\).*'x', 'z'"):
        tok.encode("abxcz")


def test_encode_array_matches_encode_and_uses_smallest_dtype(shakespeare, shakespeare_tokenizer):
    tok = shakespeare_tokenizer
    text = shakespeare[:5000]
    arr = tok.encode_array(text)
    assert arr.dtype == np.uint8
    assert arr.tolist() == tok.encode(text)
    wide = CharTokenizer.from_text("aé€😀")  # code points of 1 to 4 UTF-8 bytes
    assert wide.encode_array("😀€a").tolist() == wide.encode("😀€a") == [3, 2, 0]


@pytest.mark.parametrize(
    ("vocab_size", "dtype"),
    [(1, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32)],
)
def test_smallest_uint_dtype(vocab_size, dtype):
    assert smallest_uint_dtype(vocab_size) == np.dtype(dtype)


def test_json_form_round_trips():
    tok = CharTokenizer.from_text('hello, wörld\n\t"')
    again = CharTokenizer.from_dict(tok.to_dict())
    assert again == tok
    assert again.encode("wörld") == tok.encode("wörld")
