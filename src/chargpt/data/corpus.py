"""Reading a training corpus: a bundled one or any UTF-8 text file. Bundled: tiny Shakespeare,
and `cartas`, ten letters in Spanish written for chargpt (11 KB, with 11 characters Shakespeare
lacks, such as á, ñ and ¿), a small text of one's own to fine-tune on."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from chargpt.errors import ChargptError

BUNDLED = {"shakespeare": "shakespeare.txt", "cartas": "cartas.txt"}


def resolve_corpus_path(data: str | Path) -> Path:
    """Map a `--data` value to a file: a bundled corpus name, or a path that must be a file."""
    if str(data) in BUNDLED:
        return Path(str(resources.files("chargpt") / "data" / BUNDLED[str(data)]))
    path = Path(data)
    if not path.exists():
        raise ChargptError(
            f"corpus {str(path)!r} does not exist: pass a text file with --data "
            f"(or one of the bundled corpora: {', '.join(BUNDLED)})"
        )
    if path.is_dir():
        raise ChargptError(f"corpus {str(path)!r} is a directory: pass a text file with --data")
    return path


def corpus_name(data: str | Path) -> str:
    """How a run records its `--data`: a bundled corpus by its name, an existing path made
    absolute (so that resume, eval and compare find it from any directory), anything else as
    given."""
    if str(data) in BUNDLED:
        return str(data)
    path = Path(data)
    return str(path.resolve()) if path.exists() else str(data)


def load_text(data: str | Path, encoding_errors: str = "strict") -> str:
    """Read a corpus as text; undecodable bytes are reported with their offset unless replaced."""
    path = resolve_corpus_path(data)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ChargptError(
            f"cannot read corpus {str(path)!r} ({err.strerror}): check its permissions"
        ) from None
    if not raw:
        raise ChargptError(f"corpus {str(path)!r} is empty: pass a file with some text in it")
    if b"\x00" in raw[:8192]:
        raise ChargptError(
            f"corpus {str(path)!r} looks binary (it contains NUL bytes): pass a text file "
            "(a UTF-16 text must be converted to UTF-8 first)"
        )
    try:
        return raw.decode("utf-8", errors=encoding_errors)
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ChargptError(
            f"corpus {str(path)!r} is not valid UTF-8 (byte {err.start:,} on line {line:,} is "
            f"{raw[err.start]:#04x}): convert it to UTF-8, or pass --encoding-errors replace"
        ) from None


def text_sha256(text: str) -> str:
    """A fingerprint of a corpus, so that a resumed run can check it trains on the same text."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
