import dataclasses
import math

import pytest
import torch
from model_support import gpt_pair

from chargpt.config import ModelConfig
from chargpt.model import BigramLanguageModel, GPTLanguageModel, build_model

VOCAB = 11


def test_shapes_and_initial_loss_near_uniform(tiny_config):
    model = GPTLanguageModel(tiny_config, VOCAB)
    idx = torch.randint(VOCAB, (3, tiny_config.block_size))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, tiny_config.block_size, VOCAB)
    assert loss.shape == ()
    # N(0, 0.02) init gives near-uniform predictions: loss close to ln(vocab_size)
    assert abs(loss.item() - math.log(VOCAB)) < 0.05
    assert model(idx)[1] is None


def test_lab_parameter_count():
    # the notebook prints 10.844297 million parameters for its settings and 137 characters
    assert GPTLanguageModel(ModelConfig(), 137).num_parameters() == 10_844_297


def test_init_is_normal_002_with_zero_biases(tiny_config):
    torch.manual_seed(0)
    model = GPTLanguageModel(dataclasses.replace(tiny_config, n_embd=256), VOCAB)
    w = model.blocks[0].ffwd.net[0].weight
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert torch.count_nonzero(model.blocks[0].ffwd.net[0].bias) == 0
    assert abs(model.token_embedding_table.weight.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("attention", ["fused", "reference"])
def test_causality_future_tokens_never_change_past_logits(tiny_config, attention):
    model = GPTLanguageModel(dataclasses.replace(tiny_config, attention=attention), VOCAB).eval()
    idx = torch.randint(VOCAB, (2, tiny_config.block_size))
    base = model(idx)[0]
    for t in range(tiny_config.block_size - 1):
        changed = idx.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % VOCAB  # change every later token
        out = model(changed)[0]
        assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6)
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :], atol=1e-6)


def test_reference_and_fused_compute_the_same_function(tiny_config):
    fused, reference = gpt_pair(tiny_config, VOCAB)
    idx = torch.randint(VOCAB, (4, tiny_config.block_size))
    assert torch.allclose(fused(idx)[0], reference(idx)[0], atol=1e-5, rtol=0)
    # and back: a reference model's weights load into the fused path
    torch.manual_seed(1)
    other = GPTLanguageModel(dataclasses.replace(tiny_config, attention="reference"), VOCAB)
    fused.load_state_dict(other.eval().state_dict())
    assert torch.allclose(fused(idx)[0], other(idx)[0], atol=1e-5, rtol=0)


def test_both_paths_share_one_state_dict_layout(tiny_config):
    fused, reference = gpt_pair(tiny_config, VOCAB)
    assert set(fused.state_dict()) == set(reference.state_dict())
    assert "blocks.0.sa.qkv.weight" in reference.state_dict()
    # head i's query weight is rows [i*hs, (i+1)*hs) of the fused matrix's query part
    hs = tiny_config.n_embd // tiny_config.n_head
    qkv = fused.blocks[0].sa.qkv.weight
    assert torch.equal(reference.blocks[0].sa.heads[2].query.weight, qkv[2 * hs : 3 * hs])
    key_rows = qkv[tiny_config.n_embd + hs : tiny_config.n_embd + 2 * hs]
    assert torch.equal(reference.blocks[0].sa.heads[1].key.weight, key_rows)


@pytest.mark.parametrize("T", [1, 2, 7, 16])
def test_any_length_up_to_block_size(tiny_config, T):
    fused, reference = gpt_pair(tiny_config, VOCAB)
    full = torch.randint(VOCAB, (2, 16))
    idx = full[:, :T]
    assert fused(idx)[0].shape == (2, T, VOCAB)
    assert torch.allclose(fused(idx)[0], reference(idx)[0], atol=1e-5, rtol=0)
    # a prefix gives the same logits as the full sequence at the same positions
    assert torch.allclose(fused(idx)[0], fused(full)[0][:, :T], atol=1e-5, rtol=0)


def test_longer_than_block_size_is_refused(tiny_config):
    model = GPTLanguageModel(tiny_config, VOCAB)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, tiny_config.block_size + 1, dtype=torch.long))


@pytest.mark.parametrize("kind", ["gpt", "bigram"])
def test_a_tiny_model_overfits_a_tiny_batch(tiny_config, kind):
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(tiny_config, model=kind), VOCAB)
    idx = torch.randint(VOCAB, (2, 9))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2 if kind == "gpt" else 1.0)
    for _ in range(200):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # a GPT memorises the batch; a bigram can only reach the batch's conditional entropy
    assert loss.item() < (0.05 if kind == "gpt" else 1.0)


def test_generate_appends_tokens_and_crops_context(tiny_config):
    model = GPTLanguageModel(tiny_config, VOCAB).eval()
    idx = torch.zeros(2, 1, dtype=torch.long)
    out = model.generate(idx, 40, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 41)  # runs past block_size = 16 by cropping the context
    assert torch.equal(out[:, :1], idx)
    assert int(out.max()) < VOCAB


def test_bigram_logits_are_its_table_rows():
    model = BigramLanguageModel(VOCAB)
    idx = torch.tensor([[3, 5, 3]])
    logits = model(idx)[0]
    assert torch.equal(logits[0, 0], model.token_embedding_table.weight[3])
    assert torch.equal(logits[0, 0], logits[0, 2])
    assert model.context_length == 1
