"""The window rule past block_size, one for both cached decoders (`Window`): how many ids a full
cache restarts from, and a block of one position, where the newest id is all the context."""

from __future__ import annotations

import pytest
import torch
from model_support import TOKENIZER

from chargpt.config import ModelConfig
from chargpt.generation.decoders import SlotDecoder, Window, make_decoder, window_length
from chargpt.model.gpt import GPTLanguageModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("window_keep", [0.01, 0.5, 0.99])
def test_a_full_cache_restarts_from_at_least_one_id_and_leaves_room_for_one_more(window_keep):
    for block_size in range(2, 40):
        assert 1 <= window_length(block_size, window_keep) <= block_size - 1
    assert window_length(1, window_keep) == 1  # the newest id, which fills the one position


def test_a_window_that_keeps_no_id_or_the_whole_block_is_refused():
    for block_size, keep in ((1, 0), (8, 0), (8, 8)):
        with pytest.raises(ValueError, match="keep must be in"):
            Window(block_size, keep)


@torch.inference_mode()
def test_with_a_block_of_one_every_id_is_read_alone():
    """block_size 1: the model sees only the newest id, as a bigram does; the cached decoders,
    window and exact, and the batched slots (lean and fixed shapes) agree with that."""
    config = ModelConfig(block_size=1, n_embd=16, n_head=2, n_layer=1, dropout=0.0)
    torch.manual_seed(0)
    model = GPTLanguageModel(config, TOKENIZER.vocab_size).eval()
    ids = torch.randint(TOKENIZER.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    expected = model.logits(ids.view(-1, 1))[:, -1]  # (12, V): each id alone
    decoders = [make_decoder(model, ids[:, :1], long_context=mode) for mode in ("window", "exact")]
    slots = [SlotDecoder(model, slots=2, deterministic=d) for d in (False, True)]
    for slot_decoder in slots:
        slot_decoder.start(1, ids[0, :1].tolist())
    for n in range(ids.shape[1]):
        for decoder in decoders:
            torch.testing.assert_close(decoder.logits[0], expected[n], atol=1e-6, rtol=0)
            if n + 1 < ids.shape[1]:
                decoder.append(ids[:, n + 1 : n + 2])
        for slot_decoder in slots:
            torch.testing.assert_close(slot_decoder.logits([1])[0], expected[n], atol=1e-6, rtol=0)
            if n + 1 < ids.shape[1]:
                slot_decoder.append({1: ids[0, n + 1].item()})
