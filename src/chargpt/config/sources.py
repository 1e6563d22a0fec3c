"""Options from the outside world: command-line flags and TOML files, made from the config
dataclasses (chargpt.config.options), so that a new field is a new flag and a new TOML key at
once; and `from_dict`, which checks plain values (from TOML, JSON or flags) against them."""

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
        add_field_argument(group, f, hints[f.name], None, default_text(f, presets or {}))


def add_plain_options(parser: argparse.ArgumentParser, cls: type, *names: str) -> None:
    """The flags of some of `cls`'s fields, for options that no preset or file layers over: a
    flag not given takes the field's default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in names:
            add_field_argument(parser, f, hints[f.name], f.default, f"default: {f.default}")


def add_field_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    f: dataclasses.Field,
    hint: Any,
    default: Any,
    default_help: str,
) -> None:
    """`--flag-name` for the field `f`, typed (and with choices) by its type hint."""
    flag = "--" + f.name.replace("_", "-")
    help_text = f"{f.metadata['help']} ({default_help})".replace("%", "%%")  # argparse formats %
    if hint is bool:
        parser.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
        )
    elif typing.get_origin(hint) is Literal:
        parser.add_argument(flag, choices=typing.get_args(hint), default=default, help=help_text)
    elif typing.get_origin(hint) is tuple:
        parser.add_argument(flag, action="append", default=default, help=help_text, metavar="TEXT")
    else:
        parser.add_argument(
            flag, type=hint, default=default, help=help_text, metavar=f.name.upper()
        )


def given_fields(args: argparse.Namespace, *classes: type) -> dict[str, Any]:
    """The dataclass options the user actually passed on the command line."""
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


T = typing.TypeVar("T")


INT64_MAX = 2**63 - 1


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build a config dataclass from plain values, checking each value's type and choices."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ChargptError(f"unknown {cls.__name__} option(s): {', '.join(unknown)}")
    return cls(**{name: coerce(name, hints[name], value) for name, value in values.items()})


def coerce(name: str, hint: Any, value: Any) -> Any:
    """Check one value against its field's type (ints are accepted where floats are expected)."""
    if typing.get_origin(hint) is Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(map(str, typing.get_args(hint)))
            raise ChargptError(f"{name} must be one of {choices}, got {value!r}")
        return value
    if typing.get_origin(hint) is tuple:  # tuple[str, ...]: a repeatable text option
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ChargptError(f"{name} must be a list of strings, got {value!r}")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ChargptError(f"{name} must be true or false, got {value!r}")
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ChargptError(f"{name} must be of type {hint.__name__}, got {value!r}")
    if hint is int and value > INT64_MAX:  # torch takes no larger size, count or seed
        raise ChargptError(f"{name} must be at most {INT64_MAX}, got {value}")
    return value
