"""`chargpt prepare`: stream text files of any size into `train.bin` / `val.bin` token arrays.

Two passes over the files, each in fixed-size chunks, so memory stays bounded whatever the corpus
size: the first collects the vocabulary and counts characters, the second encodes. The split is
the lab's within each file: its first 90% trains, its last 10% validates, so validation samples
every file (one file is split exactly as the lab splits it). With several files, a file that
does not end in a newline gets one, so that its last line does not run into the next file.
`chargpt train --data DATADIR` then reads the arrays through numpy memmaps.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from chargpt.data.files import atomic_write_text
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError

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


@dataclass
class Source:
    """One input file, as pass 1 found it."""

    path: Path
    chars: int  # characters, counting the newline added after it, if one is
    add_newline: bool


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

    def chunks(path: Path, bar: tqdm) -> Iterator[str]:
        for text, n_bytes in iter_text(path, encoding_errors, chunk_bytes):
            yield text
            bar.update(n_bytes)

    def progress_bar(desc: str) -> tqdm:
        disable = None if progress is None else not progress
        return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, disable=disable)

    # pass 1: the vocabulary and each file's length, never holding more than one chunk
    chars: set[str] = set()
    sources = []
    with progress_bar("vocabulary") as bar:
        for path in files:
            n_chars, last = 0, ""
            for text in chunks(path, bar):
                chars.update(text)
                n_chars, last = n_chars + len(text), text[-1] if text else last
            add_newline = len(files) > 1 and n_chars > 0 and last != "\n"
            sources.append(Source(path, n_chars + add_newline, add_newline))
    if not any(source.chars for source in sources):
        raise ChargptError("the corpus is empty: pass files with some text in them")
    if any(source.add_newline for source in sources):
        chars.add("\n")
    tokenizer = CharTokenizer(tuple(sorted(chars)))

    # pass 2: encode each file, its first 90% into train.bin and the rest into val.bin
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = {split: out_dir / f".{split}.bin.partial" for split in ("train", "val")}
    digests = {split: hashlib.sha256() for split in tmp}
    sizes = {split: 0 for split in tmp}
    try:
        with (
            tmp["train"].open("wb") as train_f,
            tmp["val"].open("wb") as val_f,
            progress_bar("encoding") as bar,
        ):
            outputs = {"train": train_f, "val": val_f}

            def write(split: str, data: bytes) -> None:
                outputs[split].write(data)
                digests[split].update(data)
                sizes[split] += len(data) // tokenizer.dtype.itemsize

            for source in sources:
                cut, written = int(train_fraction * source.chars), 0
                for ids in map(tokenizer.encode_array, chunks(source.path, bar)):
                    here = max(0, min(len(ids), cut - written))
                    write("train", ids[:here].tobytes())
                    write("val", ids[here:].tobytes())
                    written += len(ids)
                if source.add_newline:  # the last character, so on the validation side
                    write("val", tokenizer.encode_array("\n").tobytes())
            for f in outputs.values():
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
        "train_tokens": sizes["train"],
        "val_tokens": sizes["val"],
        # the fingerprint a run records, to check that a resumed run trains on the same tokens
        "sha256": fingerprint(tokenizer, {k: d.hexdigest() for k, d in digests.items()}),
        "sources": [str(f.resolve()) for f in files],
        "encoding_errors": encoding_errors,
    }
    # written last: its presence marks a complete, consistent data directory
    atomic_write_text(out_dir / VOCAB_FILE, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return info


def fingerprint(tokenizer: CharTokenizer, array_digests: dict[str, str]) -> str:
    """SHA-256 of the vocabulary and of the token arrays' SHA-256s."""
    content = {"tokenizer": tokenizer.to_dict(), "arrays": array_digests}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
