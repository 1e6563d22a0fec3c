"""`chargpt prepare`: stream text files of any size into `train.bin` / `val.bin` token arrays.

Two passes over the files, each in fixed-size chunks, so memory stays bounded whatever the corpus
size: the first collects the vocabulary and counts characters, the second encodes. The split is
the lab's: the first 90% of the concatenated text trains, the last 10% validates.
`chargpt train --data DATADIR` then reads the arrays through numpy memmaps.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from chargpt.checkpoint import atomic_write_text
from chargpt.errors import ChargptError
from chargpt.tokenizer import CharTokenizer

VOCAB_FILE = "vocab.json"
CHUNK_BYTES = 1 << 22  # 4 MiB of text per read: memory stays near 100 MiB whatever the corpus


def find_text_files(paths: list[Path], pattern: str) -> list[Path]:
    """The files named, plus those under each directory matching `pattern`, in sorted order."""
    files: list[Path] = []
    for path in paths:
        if not path.exists():
            raise ChargptError(f"{str(path)!r} does not exist: pass text files or directories")
        if path.is_dir():
            files += sorted(p for p in path.rglob(pattern) if p.is_file())
        else:
            files.append(path)
    if not files:
        raise ChargptError(f"no files match {pattern!r} under {', '.join(map(str, paths))}")
    return files


def iter_text(
    path: Path, encoding_errors: str, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[tuple[str, int]]:
    """Decode a file chunk by chunk, yielding (text, bytes read); a multi-byte character split
    across two chunks is decoded whole."""
    decoder = codecs.getincrementaldecoder("utf-8")(encoding_errors)
    offset = 0
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            if b"\x00" in chunk:
                raise ChargptError(f"{str(path)!r} looks binary (it contains NUL bytes)")
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise ChargptError(
                    f"{str(path)!r} is not valid UTF-8 (near byte {offset + err.start:,}): "
                    "convert it to UTF-8, or pass --encoding-errors replace"
                ) from None
            offset += len(chunk)
            yield text, len(chunk)
        try:
            tail = decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ChargptError(
                f"{str(path)!r} ends in the middle of a UTF-8 character: "
                "repair it, or pass --encoding-errors replace"
            ) from None
        if tail:
            yield tail, 0


def prepare(
    paths: list[Path],
    out_dir: Path,
    pattern: str = "*.txt",
    encoding_errors: str = "strict",
    train_fraction: float = 0.9,
    chunk_bytes: int = CHUNK_BYTES,
    progress: bool | None = None,
) -> dict:
    """Write `train.bin`, `val.bin` and `vocab.json` to `out_dir`; returns vocab.json's content."""
    files = find_text_files(paths, pattern)
    if (out_dir / VOCAB_FILE).exists():
        raise ChargptError(f"{out_dir} already holds prepared data: choose another --out")
    total_bytes = sum(f.stat().st_size for f in files)

    def chunks(desc: str) -> Iterator[str]:
        with tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc=desc,
            disable=None if progress is None else not progress,
        ) as bar:
            for path in files:
                for text, n_bytes in iter_text(path, encoding_errors, chunk_bytes):
                    yield text
                    bar.update(n_bytes)

    # pass 1: the vocabulary and the character count, never holding more than one chunk
    chars: set[str] = set()
    n_chars = 0
    for text in chunks("vocabulary"):
        chars.update(text)
        n_chars += len(text)
    if n_chars == 0:
        raise ChargptError("the corpus is empty: pass files with some text in them")
    tokenizer = CharTokenizer(tuple(sorted(chars)))
    n_train = int(train_fraction * n_chars)  # the lab's split over the concatenated text

    # pass 2: encode and append, switching from train.bin to val.bin at the split point
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    tmp = {split: out_dir / f".{split}.bin.partial" for split in ("train", "val")}
    try:
        with tmp["train"].open("wb") as train_f, tmp["val"].open("wb") as val_f:
            for text in chunks("encoding"):
                ids = tokenizer.encode_array(text)
                cut = max(0, min(len(ids), n_train - written))
                train_f.write(ids[:cut].tobytes())
                val_f.write(ids[cut:].tobytes())
                written += len(ids)
            for f in (train_f, val_f):
                f.flush()
                os.fsync(f.fileno())
        for split, path in tmp.items():
            os.replace(path, out_dir / f"{split}.bin")
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    info = {
        "tokenizer": tokenizer.to_dict(),
        "dtype": tokenizer.dtype.name,
        "train_tokens": n_train,
        "val_tokens": n_chars - n_train,
        "sources": [str(f) for f in files],
        "encoding_errors": encoding_errors,
    }
    # written last: its presence marks a complete, consistent data directory
    atomic_write_text(out_dir / VOCAB_FILE, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return info
