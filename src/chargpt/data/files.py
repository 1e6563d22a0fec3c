"""Writing files so that a crash never leaves one half-written: atomic replace, durable append.

Torch-free, so that `chargpt prepare` can use it without loading PyTorch.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

TEMPORARY = ".{name}.{tag}.tmp"  # beside the file it replaces; see remove_stale_temporaries


def fsync_directory(directory: Path) -> None:
    """Make renames and new names in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_temporary(path: Path) -> tuple[Path, int]:
    """Create an empty temporary file beside `path`. Returns it and the permissions it was given,
    those of an ordinary new file: 0o666 less the umask, which the kernel applies (the process
    umask is neither read nor changed, so other threads never see it altered)."""
    while True:
        tmp = path.parent / TEMPORARY.format(name=path.name, tag=secrets.token_hex(4))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename it over `path`."""
    tmp, mode = new_temporary(path)
    try:
        write(tmp)
        with tmp.open("rb+") as f:
            os.fchmod(f.fileno(), mode)  # a writer may have replaced the file with a 0600 one
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def append_line(path: Path, line: str) -> None:
    """Append one line and fsync it. A crash can tear only this line; a line torn earlier is
    ended first, so that it never joins the new one (readers skip the torn line)."""
    with path.open("ab+") as f:
        torn = False
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        f.write((b"\n" if torn else b"") + line.encode("utf-8") + b"\n")
        f.flush()
        os.fsync(f.fileno())


def remove_stale_temporaries(directory: Path) -> None:
    """Delete the temporary files that killed atomic writes left in `directory`. Only safe while
    no other process writes there (under torchrun: the main process, before the others start)."""
    for tmp in Path(directory).glob(TEMPORARY.format(name="*", tag="*")):
        tmp.unlink(missing_ok=True)
