"""The evaluator: the full pass scores each character once, the count references are exact."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import chargpt.eval.counts
from chargpt.cli.main import main
from chargpt.config import ModelConfig
from chargpt.data.dataset import CharDataset
from chargpt.data.tokenizer import CharTokenizer
from chargpt.eval.counts import count_cross_entropy, count_references
from chargpt.eval.evaluate import (
    Loss,
    evaluate,
    evaluate_run,
    full_pass_loss,
    full_pass_windows,
    validation_stream,
)
from chargpt.model import BigramLanguageModel, GPTLanguageModel
from chargpt.runs.directory import load_run
from chargpt.training.estimate import estimate_loss

TINY = ModelConfig(block_size=8, n_embd=16, n_head=2, n_layer=2, dropout=0.0)


def tiny_gpt(vocab_size: int) -> GPTLanguageModel:
    torch.manual_seed(0)
    model = GPTLanguageModel(TINY, vocab_size)
    with torch.no_grad():  # larger weights than the N(0, 0.02) init, so context matters
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def brute_force_loss(model, tokens: np.ndarray, start: int, context: int) -> float:
    """Each target i on its own, from tokens[max(0, i - context) : i]."""
    losses = []
    for i in range(start, len(tokens)):
        x = torch.tensor(tokens[max(0, i - context) : i], dtype=torch.long)[None]
        logits = model.logits(x)[0, -1]
        losses.append(-F.log_softmax(logits, dim=-1)[int(tokens[i])].item())
    return sum(losses) / len(losses)


@settings(max_examples=200, deadline=None)
@given(
    n_tokens=st.integers(2, 200),
    block_size=st.integers(1, 40),
    stride_fraction=st.floats(0.0, 1.0),
    start_fraction=st.floats(0.0, 1.0),
)
def test_full_pass_plan_scores_every_target_once_with_enough_context(
    n_tokens, block_size, stride_fraction, start_fraction
):
    T = min(block_size, n_tokens - 1)
    stride = 1 + int(stride_fraction * (T - 1))
    start = 1 + int(start_fraction * (n_tokens - 2))
    starts, first_scored = full_pass_windows(n_tokens, block_size, start, stride)
    times_scored = np.zeros(n_tokens, dtype=int)
    for a, j0 in zip(starts, first_scored, strict=True):
        assert 0 <= a and a + T <= n_tokens - 1  # the window and its targets lie in the text
        for j in range(j0, T):
            target = a + 1 + j
            times_scored[target] += 1
            context = j + 1
            # as much context as exists, up to T, and never less than T - stride + 1
            assert context >= min(target, T - stride + 1)
    assert (times_scored[start:] == 1).all()
    assert (times_scored[:start] == 0).all()


@pytest.mark.parametrize("start", [1, 12])
def test_full_pass_with_stride_1_equals_per_position_brute_force(start):
    tokens = np.random.default_rng(0).integers(0, 7, size=24).astype(np.uint8)
    model = tiny_gpt(7)
    loss, count = full_pass_loss(model, tokens, TINY.block_size, start, stride=1, batch_size=5)
    assert count == len(tokens) - start
    assert loss == pytest.approx(brute_force_loss(model, tokens, start, TINY.block_size), rel=1e-5)


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_bigram_full_pass_equals_mean_over_pairs_for_any_stride(stride):
    tokens = np.random.default_rng(1).integers(0, 6, size=57).astype(np.uint8)
    torch.manual_seed(0)
    model = BigramLanguageModel(6).eval()
    loss, count = full_pass_loss(model, tokens, 8, start=1, stride=stride, batch_size=3)
    log_probs = F.log_softmax(model.token_embedding_table.weight, dim=-1)
    pairs = -log_probs[torch.from_numpy(tokens[:-1]).long(), torch.from_numpy(tokens[1:]).long()]
    assert count == len(tokens) - 1
    assert loss == pytest.approx(pairs.mean().item(), rel=1e-6)


def test_evaluate_scores_every_validation_character():
    text = "abcabdabcadbca" * 12
    tokenizer = CharTokenizer.from_text(text)
    dataset = CharDataset.from_text(text, tokenizer)
    model = tiny_gpt(tokenizer.vocab_size)
    cpu = torch.device("cpu")
    result = evaluate(model, dataset, 8, 4, 3, cpu, torch.float32, seed=1, stride=1)
    assert result.characters == len(dataset.val)
    tokens, start = validation_stream(dataset, 8)
    assert start == 8 and (tokens[start:] == dataset.val).all()
    assert (tokens[:start] == dataset.train[-8:]).all()  # the text just before the split
    assert result.full_val.nats == pytest.approx(
        brute_force_loss(model, tokens, start, 8), rel=1e-5
    )


def test_loss_units():
    loss = Loss(math.log(4.0))
    assert loss.bits_per_char == pytest.approx(2.0)
    assert loss.perplexity == pytest.approx(4.0)


def test_count_bigram_cross_entropy_by_hand():
    # train "abab" (a=0, b=1): n(ab) = 2, n(ba) = 1. Add-one: p(b|a) = 3/4, p(a|a) = 1/4,
    # p(a|b) = 2/3, p(b|b) = 1/3. Scoring "abba": -(ln 3/4 + ln 1/3 + ln 2/3) / 3.
    train = np.array([0, 1, 0, 1])
    expected = -(math.log(3 / 4) + math.log(1 / 3) + math.log(2 / 3)) / 3
    assert count_cross_entropy(train, np.array([0, 1, 1, 0]), 2, order=2) == pytest.approx(expected)


def test_count_unigram_cross_entropy_by_hand():
    # train "aab" with 3 symbols, add-one: p = (3/6, 2/6, 1/6); scoring "abc"
    train = np.array([0, 0, 1])
    expected = -(math.log(3 / 6) + math.log(2 / 6) + math.log(1 / 6)) / 3
    assert count_cross_entropy(train, np.array([0, 1, 2]), 3, order=1) == pytest.approx(expected)
    # without smoothing, a unigram scored on its own text is that text's entropy
    entropy = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert count_cross_entropy(train, train, 3, 1, smoothing=0.0) == pytest.approx(entropy)


CORPUS = "the cat sat on the mat. " * 40


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run trained for 6 steps on CORPUS with the tiny preset."""
    root = tmp_path_factory.mktemp("eval")
    corpus, run = root / "corpus.txt", root / "run"
    corpus.write_text(CORPUS, encoding="utf-8")
    flags = "--preset tiny --max-iters 6 --eval-interval 2 --block-size 8 --sample-chars 0"
    assert main(["train", "--out", str(run), "--data", str(corpus), *flags.split()]) == 0
    return run


def test_eval_command_json(tiny_run, capsys):
    capsys.readouterr()
    assert main(["eval", "--run", str(tiny_run), "--json", "--stride", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["characters"] == len(CORPUS) - int(0.9 * len(CORPUS))  # the whole val split
    assert report["stride"] == 3
    full = report["full_val"]
    assert full["bits_per_char"] == pytest.approx(full["loss"] / math.log(2))
    assert full["perplexity"] == pytest.approx(math.exp(full["loss"]))


@pytest.mark.parametrize("flags", ["--stride 9", "--stride 0", "--eval-iters 0"])
def test_eval_command_rejects_bad_options(tiny_run, capsys, flags):
    assert main(["eval", "--run", str(tiny_run), *flags.split()]) == 2
    assert flags.split()[0] in capsys.readouterr().err


def test_eval_max_chars_scores_the_first_characters_only(tiny_run, capsys):
    capsys.readouterr()
    assert main(["eval", "--run", str(tiny_run), "--json", "--max-chars", "40"]) == 0
    assert json.loads(capsys.readouterr().out)["characters"] == 40
    assert main(["eval", "--run", str(tiny_run), "--max-chars", "0"]) == 2
    assert "--max-chars" in capsys.readouterr().err


class NoWholeCopies:
    """A token array (like a memmap of a huge split) that lets itself be read in bounded pieces
    only: converting it whole, as np.asarray would, fails."""

    def __init__(self, array: np.ndarray, limit: int):
        self.array, self.limit = array, limit
        self.dtype = array.dtype

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index):
        part = self.array[index]
        assert np.size(part) <= self.limit, f"read {np.size(part)} tokens at once"
        return part

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole split was copied into memory")


def test_eval_and_count_references_stream_the_splits(tiny_run, monkeypatch):
    """Scores and counts are the same when the splits can only be read a piece at a time."""
    monkeypatch.setattr(chargpt.eval.counts, "CHUNK", 100)
    run = load_run(tiny_run)
    tokenizer = CharTokenizer.from_text(CORPUS)
    whole = CharDataset.from_text(CORPUS, tokenizer)
    pieces = CharDataset(NoWholeCopies(whole.train, 500), NoWholeCopies(whole.val, 500))
    cpu = torch.device("cpu")
    assert evaluate_run(run, pieces, cpu, stride=3) == evaluate_run(run, whole, cpu, stride=3)
    streamed = count_references(pieces, tokenizer.vocab_size)
    for a, b in zip(streamed, count_references(whole, tokenizer.vocab_size), strict=True):
        assert a.train.nats == pytest.approx(b.train.nats, rel=1e-12)
        assert a.val.nats == pytest.approx(b.val.nats, rel=1e-12)
    # and the chunked counts are the closed form's, pairs across chunk boundaries included
    tokens = whole.train.astype(np.int64)
    counts = np.ones((tokenizer.vocab_size,) * 2)
    np.add.at(counts, (tokens[:-1], tokens[1:]), 1.0)
    probs = counts / counts.sum(axis=1, keepdims=True)
    expected = -np.log(probs[tokens[:-1], tokens[1:]]).mean()
    assert streamed[1].train.nats == pytest.approx(expected, rel=1e-12)


def fails_on_second_call(model: GPTLanguageModel, method: str) -> None:
    """Make `model.<method>` raise on its second call, as an out-of-memory error would."""
    original, calls = getattr(model, method), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return original(*args, **kwargs)

    setattr(model, method, failing)


@pytest.mark.parametrize("scorer", ["estimate_loss", "full_pass_loss"])
def test_a_model_that_fails_midway_gets_its_modes_back(scorer: str) -> None:
    """Scoring runs in eval mode; when the model raises, every module is left in the mode it
    was in (here: training, but for one block in eval mode), not in eval mode."""
    text = "to be or not to be, that is the question. " * 20
    tokenizer = CharTokenizer.from_text(text)
    model = tiny_gpt(tokenizer.vocab_size).train()
    model.blocks[0].eval()
    modes = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="out of memory"):
        if scorer == "estimate_loss":
            fails_on_second_call(model, "forward")
            dataset = CharDataset.from_text(text, tokenizer)
            cpu = torch.device("cpu")
            estimate_loss(model, dataset, 2, TINY.block_size, 3, cpu, torch.float32, seed=0)
        else:
            fails_on_second_call(model, "logits")
            tokens = np.array(tokenizer.encode(text))
            full_pass_loss(model, tokens, TINY.block_size, batch_size=2)
    assert [m.training for m in model.modules()] == modes
