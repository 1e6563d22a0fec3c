"""Fine-tuning a run on text with new characters: the joined vocabulary, the model's rows moved to
it (the run's characters keep their meaning), and data read in the joined ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chargpt.config import ModelConfig
from chargpt.data.dataset import CharDataset, MappedTokens, in_vocabulary, load_corpus
from chargpt.data.prepare import prepare
from chargpt.data.tokenizer import CharTokenizer, UnknownCharactersError, join_vocabularies
from chargpt.model import build_model
from chargpt.model.resize import resize_vocabulary

RUN = CharTokenizer(tuple("\n !,.ehlmortw"))
NEW_TEXT = "él tomó el té; ¿qué más?\n"  # new: é, ó, ;, ¿, q, u, á, s, ?


def test_the_joined_vocabulary_keeps_every_run_character_and_stays_sorted():
    data = CharTokenizer.from_text(NEW_TEXT)
    joined = join_vocabularies(RUN, data, "add")
    assert set(RUN.chars) <= set(joined.chars) and set(data.chars) <= set(joined.chars)
    assert list(joined.chars) == sorted(joined.chars)
    assert join_vocabularies(RUN, data, "skip") == RUN
    assert join_vocabularies(RUN, CharTokenizer.from_text("hello\n"), "error") == RUN
    with pytest.raises(UnknownCharactersError, match=r"9 character\(s\) the run never saw.*skip"):
        join_vocabularies(RUN, data, "error")


SHAPES = {
    "gpt, learned positions": dict(pos_emb="learned"),
    "gpt, rope, rmsnorm, tied": dict(pos_emb="rope", norm="rmsnorm", tie_embeddings=True),
    "gpt, reference heads": dict(attention="reference"),
    "bigram": dict(model="bigram"),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_run_characters_keep_their_logits_and_new_ones_start_unlikely(shape):
    config = ModelConfig(block_size=16, n_embd=16, n_head=2, n_layer=1, dropout=0.0, **shape)
    torch.manual_seed(0)
    model = build_model(config, RUN.vocab_size).eval()
    with torch.no_grad():  # spread weights and biases, as training would
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    joined = join_vocabularies(RUN, CharTokenizer.from_text(NEW_TEXT), "add")
    new_ids = [joined.stoi[ch] for ch in RUN.chars]
    resized = resize_vocabulary(model, config, new_ids, joined.vocab_size).eval()

    text = "hello, tom. we m"
    before = model.logits(torch.tensor([RUN.encode(text)]))  # (1, T, V_run)
    after = resized.logits(torch.tensor([joined.encode(text)]))  # (1, T, V_joined)
    torch.testing.assert_close(after[..., new_ids], before, rtol=0, atol=1e-5)
    # a new character's logit is the mean of the old ones: at most 1 / V_joined likely
    new = [joined.stoi[ch] for ch in joined.chars if ch not in RUN.stoi]
    assert after.softmax(-1)[..., new].max() <= 1 / joined.vocab_size + 1e-6
    # the new characters are inputs like an average one: the model runs on them
    assert torch.isfinite(resized.logits(torch.tensor([joined.encode(NEW_TEXT[:16])]))).all()


def test_resize_refuses_ids_that_do_not_fit():
    config = ModelConfig(block_size=8, n_embd=8, n_head=1, n_layer=1)
    model = build_model(config, 3)
    with pytest.raises(ValueError, match="distinct ids below 4"):
        resize_vocabulary(model, config, [0, 0, 1], 4)


def test_data_is_read_in_the_joined_ids_from_text_and_prepared_directories(tmp_path):
    corpus = tmp_path / "new.txt"
    corpus.write_text(NEW_TEXT * 20, encoding="utf-8")
    joined = join_vocabularies(RUN, CharTokenizer.from_text(NEW_TEXT), "add")
    expected = CharDataset.from_text(NEW_TEXT * 20, joined)
    prepare([corpus], tmp_path / "prepared", progress=False)
    for data in (corpus, tmp_path / "prepared"):
        dataset, tokenizer, _ = load_corpus(data, tokenizer=joined)
        assert tokenizer == joined
        assert np.array_equal(dataset.train[:], expected.train)
        assert np.array_equal(dataset.val[:], expected.val)
    # memory-mapped splits stay on disk, read through the table
    assert isinstance(load_corpus(tmp_path / "prepared", tokenizer=joined)[0].train, MappedTokens)


def test_skip_drops_the_characters_the_run_lacks_and_error_lists_them(tmp_path):
    corpus = tmp_path / "new.txt"
    corpus.write_text(NEW_TEXT * 20, encoding="utf-8")
    prepare([corpus], tmp_path / "prepared", progress=False)
    for data in (corpus, tmp_path / "prepared"):
        dataset, _, _ = load_corpus(data, tokenizer=RUN, on_unknown="skip")
        kept = RUN.decode(dataset.train.tolist()) + RUN.decode(dataset.val.tolist())
        assert kept == "".join(ch for ch in NEW_TEXT * 20 if ch in RUN.stoi)
        with pytest.raises(UnknownCharactersError, match=r"9 character\(s\) not in the vocab"):
            load_corpus(data, tokenizer=RUN)


def test_in_vocabulary_is_the_identity_for_the_same_vocabulary():
    dataset = CharDataset.from_text("hello, low tower\n" * 3, RUN)
    assert in_vocabulary(dataset, RUN, RUN) is dataset
