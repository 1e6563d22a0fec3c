"""`chargpt prepare`: stream text files of any size into `train.bin` / `val.bin` token arrays.

Two passes over the files, each in fixed-size chunks, so memory stays bounded whatever the corpus
size: the first collects the vocabulary and counts characters, the second encodes. Both run at
disk speed: characters become ids through numpy over their code points (chargpt.data.codepoints),
never one by one in Python. The split is the lab's within each file: its first 90% trains, its
last 10% validates, so validation samples every file (one file is split exactly as the lab splits
it). With several files, a file that does not end in a newline gets one, so that its last line
does not run into the next file. `chargpt train --data DATADIR` then reads the arrays through
numpy memmaps.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from chargpt.data.codepoints import IdTable, Vocabulary, code_points
from chargpt.data.files import atomic_write_text
from chargpt.data.tokenizer import CharTokenizer, UnknownCharactersError
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


def read_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """A file's bytes, `chunk_bytes` at a time; a NUL byte (binary data) is an error."""
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            if b"\x00" in chunk:
                raise ChargptError(f"{str(path)!r} looks binary (it contains NUL bytes)")
            yield chunk


def iter_text(
    path: Path, encoding_errors: str, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[tuple[str | bytes, int]]:
    """Decode a file chunk by chunk, yielding (text, bytes read); a multi-byte character split
    across two chunks is decoded whole. A pure-ASCII chunk comes as its bytes, undecoded."""
    decoder = codecs.getincrementaldecoder("utf-8")(encoding_errors)
    offset = 0
    for chunk in read_chunks(path, chunk_bytes):
        if chunk.isascii() and not decoder.getstate()[0]:  # and nothing pending before it
            text: str | bytes = chunk
        else:
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


@dataclass
class Progress:
    """One progress bar over all the files' bytes for each pass (`show` None: when a terminal)."""

    total_bytes: int
    show: bool | None

    def bar(self, desc: str) -> tqdm:
        disable = None if self.show is None else not self.show
        return tqdm(total=self.total_bytes, unit="B", unit_scale=True, desc=desc, disable=disable)


def counted(chunks: Iterator[tuple[str | bytes, int]], bar: tqdm) -> Iterator[str | bytes]:
    for text, n_bytes in chunks:
        yield text
        bar.update(n_bytes)


def scan_file(
    path: Path, vocabulary: Vocabulary, encoding_errors: str, chunk_bytes: int, bar: tqdm
) -> tuple[int, bool]:
    """Pass 1 for one file: add its characters to `vocabulary`; returns (characters, whether it
    ends in a newline)."""
    if encoding_errors == "strict":
        # without decoding the ASCII characters; pass 2 decodes everything, and so validates
        chunks = ((chunk, len(chunk)) for chunk in read_chunks(path, chunk_bytes))
        try:
            n_chars, last_byte = vocabulary.add_utf8(counted(chunks, bar))
            return n_chars, last_byte == b"\n"
        except UnicodeDecodeError:
            pass  # not UTF-8: decoding it, below, raises the error that says where
    n_chars, last = 0, ""
    for text in counted(iter_text(path, encoding_errors, chunk_bytes), bar):
        vocabulary.add(text)
        n_chars += len(text)
        last = chr(text[-1]) if isinstance(text, bytes) else text[-1:] or last
    return n_chars, last == "\n"


def scan(
    files: list[Path], encoding_errors: str, chunk_bytes: int, progress: Progress
) -> tuple[CharTokenizer, list[Source]]:
    """Pass 1: the vocabulary and each file's length, never holding more than one chunk."""
    vocabulary, sources = Vocabulary(), []
    with progress.bar("vocabulary") as bar:
        for path in files:
            n_chars, ends_in_newline = scan_file(
                path, vocabulary, encoding_errors, chunk_bytes, bar
            )
            add_newline = len(files) > 1 and n_chars > 0 and not ends_in_newline
            sources.append(Source(path, n_chars + add_newline, add_newline))
    if not any(source.chars for source in sources):
        raise ChargptError("the corpus is empty: pass files with some text in them")
    if any(source.add_newline for source in sources):
        vocabulary.add("\n")
    return CharTokenizer(vocabulary.characters()), sources


class SplitWriter:
    """Appends token ids to `.train.bin.partial` / `.val.bin.partial`, hashing what it writes;
    `commit` renames them into place. Use it as a context manager: the partial files never stay.
    (A writer thread, measured on 2 busy cores, made it slower, not faster.)"""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.paths = {split: out_dir / f".{split}.bin.partial" for split in ("train", "val")}
        self.digests = {split: hashlib.sha256() for split in self.paths}
        self.sizes = dict.fromkeys(self.paths, 0)

    def __enter__(self) -> SplitWriter:
        self.files = {split: path.open("wb") for split, path in self.paths.items()}
        return self

    def write(self, split: str, ids: np.ndarray) -> None:
        self.files[split].write(ids)
        self.digests[split].update(ids)
        self.sizes[split] += len(ids)

    def commit(self) -> None:
        for split, f in self.files.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(self.paths[split], self.out_dir / f"{split}.bin")

    def __exit__(self, *exc: object) -> None:
        for split, path in self.paths.items():
            self.files[split].close()
            path.unlink(missing_ok=True)


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
    bars = Progress(sum(f.stat().st_size for f in files), progress)
    tokenizer, sources = scan(files, encoding_errors, chunk_bytes, bars)
    table = IdTable(tokenizer.chars)

    # pass 2: encode each file, its first 90% into train.bin and the rest into val.bin
    out_dir.mkdir(parents=True, exist_ok=True)
    with SplitWriter(out_dir) as out, bars.bar("encoding") as bar:
        for source in sources:
            cut, written = int(train_fraction * source.chars), 0
            for text in counted(iter_text(source.path, encoding_errors, chunk_bytes), bar):
                try:
                    ids = table.ids(code_points(text))
                except UnknownCharactersError as err:
                    raise ChargptError(f"{source.path} changed while being read: {err}") from None
                here = max(0, min(len(ids), cut - written))
                out.write("train", ids[:here])
                out.write("val", ids[here:])
                written += len(ids)
            if source.add_newline:  # the last character, so on the validation side
                out.write("val", table.ids(code_points("\n")))
        out.commit()
    info = {
        "tokenizer": tokenizer.to_dict(),
        "dtype": tokenizer.dtype.name,
        "train_tokens": out.sizes["train"],
        "val_tokens": out.sizes["val"],
        # the fingerprint a run records, to check that a resumed run trains on the same tokens
        "sha256": fingerprint(tokenizer, {k: d.hexdigest() for k, d in out.digests.items()}),
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
