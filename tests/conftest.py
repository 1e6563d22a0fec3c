from __future__ import annotations

import pytest

from chargpt.config import ModelConfig
from chargpt.data.corpus import load_text
from chargpt.data.tokenizer import CharTokenizer


@pytest.fixture(scope="session")
def shakespeare() -> str:
    return load_text("shakespeare")


@pytest.fixture(scope="session")
def shakespeare_tokenizer(shakespeare: str) -> CharTokenizer:
    return CharTokenizer.from_text(shakespeare)


@pytest.fixture
def tiny_config() -> ModelConfig:
    """A GPT small enough for fast tests, with several heads and layers."""
    return ModelConfig(block_size=16, n_embd=32, n_head=4, n_layer=2, dropout=0.0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a busy machine: one intra-op thread is many times faster than two that
    wait for each other (a module opts in with `pytestmark = usefixtures("one_thread")`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
