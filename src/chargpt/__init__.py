"""chargpt: train, sample and evaluate character-level GPT language models on any text."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("chargpt")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"
