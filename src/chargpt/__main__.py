"""`python -m chargpt` and the `chargpt` script run the command line (also what torchrun
launches). `prepare` runs without importing PyTorch, which takes seconds and which preparing
text never needs."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:
        from chargpt.cli.shell import main_prepare

        return main_prepare(argv)
    from chargpt.cli.main import main as main_with_torch

    return main_with_torch(argv)


if __name__ == "__main__":
    raise SystemExit(main())
