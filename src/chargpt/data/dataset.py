"""The lab's data split (first 90% train, last 10% val), random `block_size` windows, and the
token arrays behind them (in memory, memory-mapped, or two read as one)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chargpt.data.corpus import load_text, text_sha256
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError

SPLITS = ("train", "val")


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


Tokens = np.ndarray | JoinedTokens  # anything with len() and contiguous slices


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
    data: str | Path, encoding_errors: str = "strict", tokenizer: CharTokenizer | None = None
) -> tuple[CharDataset, CharTokenizer, str]:
    """`--data` as a split dataset, its tokenizer and a fingerprint (to check a resumed run trains
    on the same data). `data` is a bundled corpus name, a text file, or a `chargpt prepare`
    directory. With `tokenizer` (a trained run's), the data must fit that vocabulary."""
    path = Path(data)
    if path.is_dir() and (path / "vocab.json").is_file():
        dataset, own = load_prepared(path)
        if tokenizer is not None and own != tokenizer:
            raise ChargptError(
                f"{path} was prepared with another vocabulary than the run's: prepare the "
                "corpus the run was trained on, or train a new run on this one"
            )
        return dataset, own, prepared_fingerprint(path)
    if path.is_dir():
        raise ChargptError(
            f"{str(path)!r} is a directory without vocab.json: pass a text file, or run "
            f"`chargpt prepare --data {path} --out DATADIR` and pass DATADIR"
        )
    text = load_text(data, encoding_errors)
    tokenizer = tokenizer or CharTokenizer.from_text(text)
    return CharDataset.from_text(text, tokenizer), tokenizer, text_sha256(text)
