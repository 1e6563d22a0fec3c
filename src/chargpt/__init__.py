"""chargpt: train, sample and evaluate character-level GPT language models on any text.

    from chargpt import Trainer, load_run, stream

The names below are the Python API; `chargpt.cli` is a thin shell over them.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("chargpt")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

# imported after __version__, which the run-directory modules record
from chargpt.config import ModelConfig, SampleConfig, TrainConfig
from chargpt.data import CharDataset, load_corpus
from chargpt.generate import generate, stream
from chargpt.models import BigramLanguageModel, GPTLanguageModel
from chargpt.resume import resume_run
from chargpt.run_dir import Run, load_run
from chargpt.tokenizer import CharTokenizer
from chargpt.train import Trainer

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
    "generate",
    "load_corpus",
    "load_run",
    "resume_run",
    "stream",
]
