"""The recipe's model options: off by default, each one correct alone, checkpoints round-trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from model_support import gpt_pair

from chargpt.config import ModelConfig, TrainConfig
from chargpt.config.presets import PRESETS, build_configs
from chargpt.data.dataset import CharDataset
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.generation.decoders import SlotDecoder, make_decoder
from chargpt.generation.inspection import logits_and_attention
from chargpt.model import GPTLanguageModel
from chargpt.model.layers import Rotary, rotate
from chargpt.runs.directory import WEIGHTS, load_run, read_safetensors
from chargpt.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 11
OPTIONS = {
    "rope": dict(pos_emb="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(mlp="relu2"),
    "gelu": dict(mlp="gelu"),
    "tied": dict(tie_embeddings=True),
    "all": dict(pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=True),
}


def lab_parameter_names(config: ModelConfig) -> list[str]:
    return [name for name, _ in GPTLanguageModel(config, VOCAB).named_parameters()]


def test_options_are_off_by_default_and_the_lab_model_is_unchanged():
    config = ModelConfig()
    assert (config.pos_emb, config.norm, config.qk_norm, config.mlp) == (
        "learned",
        "layernorm",
        False,
        "relu",
    )
    assert not config.tie_embeddings
    assert PRESETS["lab"] == {}
    train = TrainConfig()
    assert (train.optimizer, train.ema_decay, train.max_time) == ("adamw", 0.0, "")
    # the lab model's parameters, by name and count (one block shown; the others alike)
    names = lab_parameter_names(ModelConfig(n_layer=1))
    assert names == [
        "token_embedding_table.weight",
        "position_embedding_table.weight",
        "blocks.0.sa.qkv.weight",
        "blocks.0.sa.proj.weight",
        "blocks.0.sa.proj.bias",
        "blocks.0.ffwd.net.0.weight",
        "blocks.0.ffwd.net.0.bias",
        "blocks.0.ffwd.net.2.weight",
        "blocks.0.ffwd.net.2.bias",
        "blocks.0.ln1.weight",
        "blocks.0.ln1.bias",
        "blocks.0.ln2.weight",
        "blocks.0.ln2.bias",
        "ln_f.weight",
        "ln_f.bias",
        "lm_head.weight",
        "lm_head.bias",
    ]
    assert GPTLanguageModel(ModelConfig(), 137).num_parameters() == 10_844_297


def test_the_cpu_and_modern_presets_turn_the_ablations_winners_on():
    for preset in ("cpu", "modern"):
        model, train = build_configs(preset, False, {})
        assert (model.pos_emb, model.norm, train.optimizer) == ("rope", "rmsnorm", "muon")
        assert train.ema_decay > 0
        assert (model.qk_norm, model.mlp, model.tie_embeddings) == (False, "relu", False)
    model, _ = build_configs("modern", False, {})
    assert (model.n_embd, model.n_layer, model.block_size) == (384, 6, 256)  # the lab's sizes


def test_rope_scores_depend_only_on_the_distance():
    rotary = Rotary(head_size=8, block_size=32)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i: int, j: int) -> torch.Tensor:
        qi = rotate(q, rotary(torch.tensor([i])))
        kj = rotate(k, rotary(torch.tensor([j])))
        return (qi * kj).sum()

    assert torch.allclose(score(3, 1), score(20, 18), atol=1e-5)
    assert torch.allclose(score(7, 7), score(0, 0), atol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 0), atol=1e-3)


def test_rope_model_has_no_position_table_and_needs_even_head_size(tiny_config):
    model = GPTLanguageModel(dataclasses.replace(tiny_config, pos_emb="rope"), VOCAB)
    assert not any("position" in name for name in model.state_dict())
    with pytest.raises(ChargptError, match="even head size"):
        dataclasses.replace(tiny_config, n_embd=12, n_head=4, pos_emb="rope").validate()


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_keeps_shapes_causality_and_fused_equals_reference(tiny_config, option):
    config = dataclasses.replace(tiny_config, **OPTIONS[option])
    fused, reference = gpt_pair(config, VOCAB)
    assert reference.state_dict().keys() == fused.state_dict().keys()
    idx = torch.randint(VOCAB, (2, config.block_size))
    logits = fused(idx)[0]
    assert logits.shape == (2, config.block_size, VOCAB)
    assert torch.allclose(reference(idx)[0], logits, atol=1e-5)
    changed = idx.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % VOCAB
    assert torch.allclose(fused(changed)[0][:, :5], logits[:, :5], atol=1e-6)


@pytest.mark.parametrize("option", ["rope", "all"])
def test_cached_and_slot_decoding_equal_full_recompute(tiny_config, option):
    torch.manual_seed(0)
    model = GPTLanguageModel(dataclasses.replace(tiny_config, **OPTIONS[option]), VOCAB).eval()
    idx = torch.randint(VOCAB, (2, 12))
    with torch.inference_mode():
        full = model(idx)[0][:, -1]
        decoder = make_decoder(model, idx[:, :5], kv_cache=True)
        for t in range(5, 12):
            decoder.append(idx[:, t : t + 1])
        assert torch.allclose(decoder.logits, full, atol=1e-5)
        # the slot decoder: rows at different lengths, each rotated at its own positions
        slots = SlotDecoder(model, slots=2)
        slots.start(0, idx[0, :4].tolist())
        slots.start(1, idx[1, :9].tolist())
        slots.append({0: int(idx[0, 4]), 1: int(idx[1, 9])})
        assert torch.allclose(slots.logits([0])[0], model(idx[:1, :5])[0][0, -1], atol=1e-5)
        assert torch.allclose(slots.logits([1])[0], model(idx[1:, :10])[0][0, -1], atol=1e-5)


def test_tied_embeddings_share_storage(tiny_config):
    model = GPTLanguageModel(dataclasses.replace(tiny_config, tie_embeddings=True), VOCAB)
    assert model.lm_head.weight is model.token_embedding_table.weight
    untied = GPTLanguageModel(tiny_config, VOCAB)
    assert untied.num_parameters() - model.num_parameters() == VOCAB * tiny_config.n_embd


@pytest.mark.parametrize("option", ["tied", "all"])
def test_a_run_with_options_round_trips_through_load_run(tmp_path, shakespeare, option):
    text = shakespeare[:5_000]
    tokenizer = CharTokenizer.from_text(text)
    dataset = CharDataset.from_text(text, tokenizer)
    config = ModelConfig(block_size=8, n_embd=16, n_head=2, n_layer=1, dropout=0.0)
    config = dataclasses.replace(config, **OPTIONS[option])
    train = TrainConfig(batch_size=4, max_iters=3, eval_interval=3, eval_iters=1, sample_chars=0)
    train = dataclasses.replace(train, device="cpu", dtype="fp32")
    trained = Trainer(config, train, dataset, tokenizer, tmp_path).run().model.eval()
    run = load_run(tmp_path)
    assert run.model_config == config
    if option == "tied":
        assert run.model.lm_head.weight is run.model.token_embedding_table.weight
        tensors, _ = read_safetensors(tmp_path / WEIGHTS)
        assert torch.equal(tensors["lm_head.weight"], tensors["token_embedding_table.weight"])
    idx = torch.randint(tokenizer.vocab_size, (2, 8))
    assert torch.equal(run.model(idx)[0], trained(idx)[0])


@pytest.mark.parametrize("attention", ["fused", "reference"])
def test_inspection_follows_the_options(tiny_config, attention):
    """inspect (and serve's /v1/inspect) rebuilds the logits and each head's weights with rope
    and QK-norm, as the model computes them."""
    config = dataclasses.replace(tiny_config, attention=attention, **OPTIONS["all"])
    model = GPTLanguageModel(config, VOCAB).eval()
    idx = torch.randint(VOCAB, (1, 10))
    logits, weights = logits_and_attention(model, idx)
    assert torch.allclose(logits, model(idx)[0], atol=1e-5)
    # the last block's output rebuilt from the weights of its heads
    with torch.no_grad():  # the weights are inference tensors
        x, rope = model.embed(idx, torch.arange(10))
        for block in model.blocks[:-1]:
            x = block(x, rope=rope)
        block = model.blocks[-1]
        h = block.ln1(x)
        if attention == "fused":  # each head's values: (n_head, B, T, hs)
            v = (
                block.sa.qkv(h)
                .chunk(3, dim=-1)[2]
                .view(1, 10, config.n_head, -1)
                .permute(2, 0, 1, 3)
            )
        else:
            v = torch.stack([head.value(h) for head in block.sa.heads])
        mixed = (weights[-1] @ v).permute(1, 2, 0, 3).reshape(1, 10, -1)  # heads side by side
        assert torch.allclose(block.sa.proj(mixed), block.sa(h, rope=rope), atol=1e-5)
