"""Lab part a: a character vocabulary with `stoi`, `itos`, `encode` and `decode`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from chargpt.errors import ChargptError


class UnknownCharactersError(ChargptError):
    """A string holds characters that are not in the vocabulary."""


def smallest_uint_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every token id below `vocab_size`."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary of {vocab_size} characters is too large")


@dataclass(frozen=True)
class CharTokenizer:
    """One token per character; ids follow the sorted order of the characters (as in the lab)."""

    chars: tuple[str, ...]
    stoi: dict[str, int] = field(init=False, repr=False, compare=False)
    itos: dict[int, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if list(self.chars) != sorted(set(self.chars)) or any(len(c) != 1 for c in self.chars):
            raise ValueError("chars must be distinct single characters in sorted order")
        # character -> index and index -> character, as the lab defines them
        object.__setattr__(self, "stoi", {ch: i for i, ch in enumerate(self.chars)})
        object.__setattr__(self, "itos", dict(enumerate(self.chars)))

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The vocabulary is the sorted set of characters in `text`."""
        if not text:
            raise ChargptError("cannot build a vocabulary from empty text")
        return cls(tuple(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned dtype that holds every token id."""
        return smallest_uint_dtype(self.vocab_size)

    def unknown_characters(self, text: str) -> list[str]:
        """Characters of `text` that the vocabulary lacks, sorted."""
        return sorted(set(text) - self.stoi.keys())

    def check_known(self, text: str) -> None:
        unknown = self.unknown_characters(text)
        if unknown:
            raise UnknownCharactersError(
                f"{len(unknown)} character(s) not in the vocabulary: {listed(unknown)}"
            )

    def encode(self, text: str) -> list[int]:
        """String -> list of token ids; unknown characters raise an error that lists them."""
        self.check_known(text)
        return [self.stoi[ch] for ch in text]

    def decode(self, ids: list[int]) -> str:
        """List of token ids -> string."""
        return "".join(self.itos[int(i)] for i in ids)

    def encode_array(self, text: str) -> np.ndarray:
        """Vectorised `encode` for whole corpora: a numpy array of the smallest fitting dtype."""
        self.check_known(text)
        codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        vocab = np.array([ord(ch) for ch in self.chars], dtype=np.uint32)
        # chars are sorted by code point, so a character's id is its rank among the code points
        return np.searchsorted(vocab, codepoints).astype(self.dtype)

    def to_dict(self) -> dict:
        return {"type": "char", "chars": list(self.chars)}

    @classmethod
    def from_dict(cls, data: dict) -> CharTokenizer:
        if data.get("type") != "char" or not isinstance(data.get("chars"), list):
            raise ChargptError("the tokenizer entry is not a character vocabulary")
        return cls(tuple(data["chars"]))


def listed(chars: list[str], limit: int = 20) -> str:
    more = f" and {len(chars) - limit} more" if len(chars) > limit else ""
    return ", ".join(repr(ch) for ch in chars[:limit]) + more


def join_vocabularies(run: CharTokenizer, data: CharTokenizer, on_unknown: str) -> CharTokenizer:
    """The vocabulary of a run fine-tuned on `data`: the run's characters and, with
    `on_unknown="add"`, the data's new ones, all sorted as the lab's rule has it ("skip" leaves
    the new ones out, so the data drops them; "error" refuses them).

    Sorted, not appended after the run's ids: every part of chargpt relies on the sorted rule
    (this class checks it, `chargpt prepare` writes it, prepared data and runs are matched by it),
    so a fine-tuned run is an ordinary run. The run's characters may get new ids when new ones
    sort between them; the model's rows move with them (chargpt.model.resize)."""
    new = sorted(set(data.chars) - set(run.chars))
    if not new or on_unknown == "skip":
        return run
    if on_unknown == "error":
        raise UnknownCharactersError(
            f"the data has {len(new)} character(s) the run never saw: {listed(new)}: pass "
            "--on-unknown add to learn them, or --on-unknown skip to drop them"
        )
    return CharTokenizer(tuple(sorted(set(run.chars) | set(new))))
