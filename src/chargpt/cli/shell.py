"""What the command line needs without PyTorch: every command's error reporting (`run_command`)
and the `prepare` command, which `python -m chargpt prepare` runs without importing PyTorch (it
only reads and writes files, and importing PyTorch takes seconds)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable

from chargpt.cli.parser import DESCRIPTION, OneLineErrorParser, add_prepare_parser
from chargpt.data.corpus import BUNDLED, resolve_corpus_path
from chargpt.data.prepare import prepare
from chargpt.errors import ChargptError


def run_command(args: argparse.Namespace, handler: Callable[[argparse.Namespace], int]) -> int:
    """Run a command's handler; user mistakes print one line, not a traceback."""
    try:
        return handler(args)
    except ChargptError as err:
        print(f"chargpt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away, as in `chargpt sample | head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second one at exit
        return 128 + signal.SIGPIPE
    except OSError as err:  # e.g. the disk filled up while saving: the previous files are intact
        where = f" ({err.filename})" if err.filename else ""
        print(f"chargpt {args.command}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"chargpt {args.command}: interrupted", file=sys.stderr)
        return 130


def cmd_prepare(args: argparse.Namespace) -> int:
    paths = [resolve_corpus_path(p) if str(p) in BUNDLED else p for p in args.data]
    info = prepare(paths, args.out, args.glob, args.encoding_errors)
    print(
        f"wrote {args.out}: {info['train_tokens']:,} train / {info['val_tokens']:,} val "
        f"characters from {len(info['sources'])} file(s), vocabulary "
        f"{len(info['tokenizer']['chars'])} ({info['dtype']})\n"
        f"next: chargpt train --data {args.out} --out RUN_DIR"
    )
    return 0


def main_prepare(argv: list[str]) -> int:
    """`chargpt prepare ...` (argv starts with "prepare") through a parser of that command alone."""
    parser = OneLineErrorParser(prog="chargpt", description=DESCRIPTION)
    add_prepare_parser(parser.add_subparsers(dest="command", required=True))
    return run_command(parser.parse_args(argv), cmd_prepare)
