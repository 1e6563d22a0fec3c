"""Characters to ids at disk speed, for `chargpt prepare`: numpy over the code points of UTF-8 text.

Decoded text becomes its code points through UTF-32 (one uint32 per character), and a lookup table
indexed by code point gives each character's id, so no Python code runs per character. A chunk of
pure ASCII skips decoding altogether: its bytes are its code points.

Finding the vocabulary needs no decoding in the common case (strict UTF-8): `bytes.translate`
drops the ASCII characters already seen, and what is left (new ASCII characters and the bytes of
multi-byte characters, a few percent of most text) is all that is examined. Torch-free.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

import numpy as np

from chargpt.data.tokenizer import UnknownCharactersError, listed, smallest_uint_dtype

CODE_POINTS = 0x110000  # U+0000 to U+10FFFF
ASCII = bytes(range(128))
NON_ASCII = bytes(range(128, 256))


def code_points(text: str | bytes) -> np.ndarray:
    """The code points of `text`: uint32, or uint8 for pure-ASCII bytes (their own code points).
    Lone surrogates (from --encoding-errors surrogateescape, say) pass through as they are."""
    if isinstance(text, bytes):
        return np.frombuffer(text, dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


class Vocabulary:
    """The set of characters seen so far, as one flag per code point."""

    def __init__(self) -> None:
        self.seen = np.zeros(CODE_POINTS, dtype=bool)
        self._seen_ascii = b""  # the same, for ASCII, as bytes that translate() can delete

    def add(self, text: str | bytes) -> None:
        self.seen[code_points(text)] = True
        self._seen_ascii = bytes(np.flatnonzero(self.seen[:128]).astype(np.uint8))

    def add_utf8(self, chunks: Iterable[bytes]) -> tuple[int, bytes]:
        """Add the characters of UTF-8 `chunks` without decoding the ASCII ones; returns the
        number of characters and the last byte. The input is NOT validated here (pass 2, which
        encodes it, decodes every chunk strictly): a multi-byte character cut short raises
        UnicodeDecodeError, other invalid input may add characters it does not hold."""
        decoder = codecs.getincrementaldecoder("utf-8")("strict")  # for multi-byte characters
        n_chars, last = 0, b""
        for chunk in chunks:
            unseen = chunk.translate(None, self._seen_ascii)
            new_ascii = unseen.translate(None, NON_ASCII)  # usually none: `unseen` is multi-byte
            if new_ascii:
                self.add(new_ascii)
            multibyte = unseen.translate(None, ASCII) if new_ascii else unseen
            # in valid UTF-8 no ASCII byte is inside a multi-byte character, so the bytes left
            # are whole characters (one may continue in the next chunk: the decoder keeps it)
            text = decoder.decode(multibyte)
            if text:
                self.add(text)
            n_chars += len(chunk) - len(multibyte) + len(text)
            last = chunk[-1:] or last
        decoder.decode(b"", final=True)
        return n_chars, last

    def characters(self) -> tuple[str, ...]:
        """The characters seen, sorted (by code point, as the lab's `sorted(set(text))`)."""
        return tuple(map(chr, np.flatnonzero(self.seen)))


class IdTable:
    """Character -> id as a table over all code points: `ids(code_points(text))` encodes text."""

    def __init__(self, chars: tuple[str, ...]) -> None:
        self.dtype = smallest_uint_dtype(len(chars))
        self.unknown = len(chars)  # the table's mark for characters not in the vocabulary
        self.table = np.full(CODE_POINTS, self.unknown, dtype=smallest_uint_dtype(len(chars) + 1))
        self.table[code_points("".join(chars))] = np.arange(len(chars))

    def ids(self, points: np.ndarray) -> np.ndarray:
        """Token ids of code points; a character outside the vocabulary raises an error."""
        ids = np.take(self.table, points)
        if len(ids) and ids.max() == self.unknown:
            unknown = [chr(c) for c in np.unique(points[ids == self.unknown])]
            raise UnknownCharactersError(
                f"{len(unknown)} character(s) not in the vocabulary: {listed(unknown)}"
            )
        return ids.astype(self.dtype, copy=False)
