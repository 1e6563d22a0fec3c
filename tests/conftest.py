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


# The files that take longest, handed out first: with `--dist loadfile` (pyproject.toml) a file
# runs whole on one worker, and a long one handed out last would leave the other worker idle at
# the end. A scheduling hint only: the tests pass in any order.
SLOWEST_FILES = (
    "test_distributed.py",
    "test_export.py",
    "test_serve_process.py",
    "test_crash_safety.py",
    "test_export_browser.py",
    "test_cli.py",
    "test_playground_browser.py",
    "test_gpu_script.py",
    "test_recipe_training.py",
    "test_train.py",
    "test_notebook.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    first = {name: rank for rank, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the rest as found
