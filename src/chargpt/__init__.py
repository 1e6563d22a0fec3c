"""chargpt: train, sample and evaluate character-level GPT language models on any text.

    from chargpt import Trainer, load_run, stream

The names below are the Python API; `chargpt.cli` is a thin shell over them. They are loaded on
first use (PEP 562), so `import chargpt` is cheap and loads no PyTorch.

The package is laid out by the lab's stages, each a folder that imports only those below it:
cli -> serve -> eval -> training -> viz -> generation -> runs -> model -> data -> config -> errors.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("chargpt")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

# public name -> the module that defines it
_API = {
    "ModelConfig": "chargpt.config",
    "SampleConfig": "chargpt.config",
    "TrainConfig": "chargpt.config",
    "CharTokenizer": "chargpt.data.tokenizer",
    "CharDataset": "chargpt.data.dataset",
    "load_corpus": "chargpt.data.dataset",
    "BigramLanguageModel": "chargpt.model.bigram",
    "GPTLanguageModel": "chargpt.model.gpt",
    "Run": "chargpt.runs.directory",
    "load_run": "chargpt.runs.directory",
    "generate": "chargpt.generation.generate",
    "stream": "chargpt.generation.generate",
    "Trainer": "chargpt.training.trainer",
    "resume_run": "chargpt.training.resume",
    "finetune_run": "chargpt.training.finetune",
}

__all__ = [
    "BigramLanguageModel",
    "CharDataset",
    "CharTokenizer",
    "GPTLanguageModel",
    "ModelConfig",
    "Run",
    "SampleConfig",
    "TrainConfig",
    "Trainer",
    "__version__",
    "finetune_run",
    "generate",
    "load_corpus",
    "load_run",
    "resume_run",
    "stream",
]

if TYPE_CHECKING:
    from chargpt.config import ModelConfig, SampleConfig, TrainConfig
    from chargpt.data.dataset import CharDataset, load_corpus
    from chargpt.data.tokenizer import CharTokenizer
    from chargpt.generation.generate import generate, stream
    from chargpt.model.bigram import BigramLanguageModel
    from chargpt.model.gpt import GPTLanguageModel
    from chargpt.runs.directory import Run, load_run
    from chargpt.training.finetune import finetune_run
    from chargpt.training.resume import resume_run
    from chargpt.training.trainer import Trainer


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'chargpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
