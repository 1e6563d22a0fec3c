"""The lab's data split (first 90% train, last 10% val), random `block_size` windows, and the
token arrays behind them (in memory, memory-mapped, two read as one, or read in the ids of
another vocabulary, such as a fine-tuned run's)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chargpt.data.corpus import load_text, text_sha256
from chargpt.data.tokenizer import (
    CharTokenizer,
    UnknownCharactersError,
    listed,
    smallest_uint_dtype,
)
from chargpt.errors import ChargptError

SPLITS = ("train", "val")
CHUNK = 1 << 22  # tokens remapped at a time when they are copied


@dataclass
class CharDataset:
    """Token ids of a corpus, split in two contiguous parts (numpy arrays or memmaps)."""

    train: np.ndarray
    val: np.ndarray

    @classmethod
    def from_text(
        cls, text: str, tokenizer: CharTokenizer, train_fraction: float = 0.9
    ) -> CharDataset:
        data = tokenizer.encode_array(text)
        n = int(train_fraction * len(data))  # first 90% train, the rest val
        return cls(train=data[:n], val=data[n:])

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return self.train if name == "train" else self.val

    def check_block_size(self, block_size: int) -> None:
        """Each split needs at least one window of `block_size` inputs plus its shifted target."""
        for name in SPLITS:
            if len(self.split(name)) < block_size + 1:
                raise ChargptError(
                    f"the {name} split has {len(self.split(name)):,} characters, fewer than "
                    f"block_size + 1 = {block_size + 1}: use a longer corpus or a smaller "
                    "--block-size"
                )

    def get_batch(
        self,
        split: str,
        batch_size: int,
        block_size: int,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows x of shape (B, T) and targets y = x shifted one character ahead."""
        data = self.split(split)
        # window starts, drawn so that start + block_size (the last target) stays inside the split
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()
        windows = data[ix[:, None] + np.arange(block_size + 1)]  # (B, T+1)
        windows = torch.from_numpy(windows.astype(np.int64))
        x, y = windows[:, :-1], windows[:, 1:]  # inputs and next-character targets, (B, T) each
        if torch.device(device).type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(
                device, non_blocking=True
            )
        return x.to(device), y.to(device)


@dataclass(frozen=True)
class JoinedTokens:
    """Two token arrays read as one sequence, copying neither: a slice reads only its own part,
    so memory-mapped splits stay on disk."""

    head: np.ndarray
    tail: np.ndarray

    def __len__(self) -> int:
        return len(self.head) + len(self.tail)

    def __getitem__(self, index: int | slice) -> np.ndarray:
        if isinstance(index, int):
            return self[index : index + 1 or None][0]
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("JoinedTokens reads contiguous slices only")
        n = len(self.head)
        head = self.head[min(start, n) : min(stop, n)]
        tail = self.tail[max(start - n, 0) : max(stop - n, 0)]
        return np.concatenate([head, tail])


def id_table(source: CharTokenizer, target: CharTokenizer) -> np.ndarray:
    """`table[source id]` is the same character's id in `target`, or len(target) if it has none."""
    ids = [target.stoi.get(ch, target.vocab_size) for ch in source.chars]
    return np.array(ids, dtype=smallest_uint_dtype(target.vocab_size + 1))


@dataclass(frozen=True)
class MappedTokens:
    """Token ids read through a lookup table, piece by piece as they are indexed: memory-mapped
    tokens stay on disk."""

    tokens: Tokens
    table: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int | slice | np.ndarray) -> np.ndarray:
        return self.table[self.tokens[index]]


Tokens = np.ndarray | JoinedTokens | MappedTokens  # anything with len() and contiguous slices


def kept_tokens(tokens: Tokens, table: np.ndarray, missing: int) -> np.ndarray:
    """`tokens` through `table`, without those it maps to `missing`: a copy, made a chunk at a
    time."""
    pieces = [table[np.asarray(tokens[i : i + CHUNK])] for i in range(0, len(tokens), CHUNK)]
    kept = [piece[piece != missing] for piece in pieces]
    return np.concatenate([np.empty(0, dtype=table.dtype), *kept])


def in_vocabulary(
    dataset: CharDataset, source: CharTokenizer, target: CharTokenizer, skip: bool = False
) -> CharDataset:
    """`dataset`, whose ids are `source`'s, in `target`'s ids. Characters `target` lacks are an
    error, or with `skip` dropped: then the splits are copied into memory. Otherwise memory-mapped
    splits stay on disk, read through the table."""
    if source == target:
        return dataset
    missing = [ch for ch in source.chars if ch not in target.stoi]
    if missing and not skip:
        raise UnknownCharactersError(
            f"the data has {len(missing)} character(s) not in the vocabulary: {listed(missing)}: "
            "pass data made of the run's characters, or fine-tune the run on this data "
            "(chargpt train --init-from RUN)"
        )
    table = id_table(source, target)
    splits = {}
    for name in SPLITS:
        tokens = dataset.split(name)
        if missing:
            splits[name] = kept_tokens(tokens, table, target.vocab_size).astype(target.dtype)
        elif isinstance(tokens, np.memmap):
            splits[name] = MappedTokens(tokens, table)
        else:
            splits[name] = table[np.asarray(tokens)].astype(target.dtype)
    return CharDataset(**splits)


def load_prepared(data_dir: Path) -> tuple[CharDataset, CharTokenizer]:
    """Memory-map the token arrays written by `chargpt prepare`: start-up time and memory do not
    grow with the corpus, since pages are read only when a batch touches them."""
    try:
        info = json.loads((data_dir / "vocab.json").read_text(encoding="utf-8"))
        tokenizer = CharTokenizer.from_dict(info["tokenizer"])
        dtype = np.dtype(info["dtype"])
        sizes = {"train": info["train_tokens"], "val": info["val_tokens"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ChargptError(
            f"{data_dir / 'vocab.json'} is unreadable ({err}): run `chargpt prepare` again"
        ) from None
    arrays = {}
    for split, expected in sizes.items():
        path = data_dir / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != expected * dtype.itemsize:
            raise ChargptError(
                f"{path} is missing or does not match vocab.json: run `chargpt prepare` again"
            )
        arrays[split] = np.memmap(path, dtype=dtype, mode="r") if expected else np.empty(0, dtype)
    return CharDataset(**arrays), tokenizer


def prepared_fingerprint(data_dir: Path) -> str:
    """The fingerprint of a prepared dataset: the SHA-256 of its vocabulary and token arrays,
    which `chargpt prepare` computes as it writes them (for directories prepared before it did,
    the SHA-256 of vocab.json)."""
    raw = (data_dir / "vocab.json").read_bytes()
    info = json.loads(raw)
    return info.get("sha256") or hashlib.sha256(raw).hexdigest()


def load_corpus(
    data: str | Path,
    encoding_errors: str = "strict",
    tokenizer: CharTokenizer | None = None,
    on_unknown: str = "error",
) -> tuple[CharDataset, CharTokenizer, str]:
    """`--data` as a split dataset, its tokenizer and a fingerprint (to check a resumed run trains
    on the same data). `data` is a bundled corpus name, a text file, or a `chargpt prepare`
    directory. With `tokenizer` (a trained run's), the data is read in that vocabulary's ids:
    characters it lacks are an error, or dropped with `on_unknown="skip"`."""
    path = Path(data)
    if path.is_dir() and (path / "vocab.json").is_file():
        dataset, own = load_prepared(path)
        digest = prepared_fingerprint(path)
    elif path.is_dir():
        raise ChargptError(
            f"{str(path)!r} is a directory without vocab.json: pass a text file, or run "
            f"`chargpt prepare --data {path} --out DATADIR` and pass DATADIR"
        )
    else:
        text = load_text(data, encoding_errors)
        own = CharTokenizer.from_text(text)
        dataset, digest = CharDataset.from_text(text, own), text_sha256(text)
    if tokenizer is None:
        return dataset, own, digest
    return in_vocabulary(dataset, own, tokenizer, skip=on_unknown == "skip"), tokenizer, digest
