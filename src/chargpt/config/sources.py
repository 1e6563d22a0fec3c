"""Options from the outside world: command-line flags and TOML files, made from the config
dataclasses (chargpt.config.options), so that a new field is a new flag and a new TOML key at
once."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Literal

from chargpt.errors import ChargptError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def load_toml(path: str | Path) -> dict[str, Any]:
    """A TOML config: flat keys, or [model] and [train] tables, named like the CLI options."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ChargptError(f"config file {str(path)!r} does not exist: check --config") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ChargptError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    except OSError as err:
        raise ChargptError(f"cannot read config file {str(path)!r}: {err.strerror}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("model", "train") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def default_text(field: dataclasses.Field, presets: dict[str, dict[str, Any]]) -> str:
    """What a flag defaults to: the field's default, or each preset's value where they differ."""
    values = {name: preset.get(field.name, field.default) for name, preset in presets.items()}
    if len({repr(value) for value in values.values()}) <= 1:
        return f"default: {field.default}"
    shown = {name: "off" if value == "" else value for name, value in values.items()}
    return "default by --preset: " + ", ".join(f"{name} {v}" for name, v in shown.items())


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, presets: dict[str, dict[str, Any]] | None = None
) -> None:
    """One `--flag-name` per field; defaults stay None so only the flags given override. With
    `presets`, the help gives each preset's value where they differ."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        help_text = f"{f.metadata['help']} ({default_text(f, presets or {})})"
        if hint is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif typing.get_origin(hint) is Literal:
            group.add_argument(flag, choices=typing.get_args(hint), default=None, help=help_text)
        elif typing.get_origin(hint) is tuple:
            group.add_argument(flag, action="append", default=None, help=help_text, metavar="TEXT")
        else:
            group.add_argument(
                flag, type=hint, default=None, help=help_text, metavar=f.name.upper()
            )


def given_fields(args: argparse.Namespace, *classes: type) -> dict[str, Any]:
    """The dataclass options the user actually passed on the command line."""
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}
