from __future__ import annotations

import os

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


# The suite runs in two processes (`-n 2`), often on two cores: tiny models on one intra-op
# thread each are many times faster than on threads that wait for each other. Commands the tests
# start inherit this; torch in this process reads it when it first computes.
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test computes on one intra-op thread (see OMP_NUM_THREADS above), also where torch
    was imported and computed before this file set the variable."""
    import torch

    torch.set_num_threads(1)
