import base64
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.generation.generate import encode_prompt
from chargpt.generation.inspection import NO_ATTENTION, inspect_text
from chargpt.model import BigramLanguageModel, GPTLanguageModel
from chargpt.model.cache import KVCache

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = CharTokenizer.from_text("abcdefgh ,.\nROMEO:")
TEXT = "ROMEO: a cab, a bed.\nMe"[:16]


def gpt(config, attention: str) -> GPTLanguageModel:
    """A GPT whose weights are large enough for peaked, far-from-uniform attention."""
    torch.manual_seed(0)
    model = GPTLanguageModel(dataclasses.replace(config, attention=attention), TOKENIZER.vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.4)
    return model.eval()


@pytest.fixture
def models(tiny_config):
    """The same weights on both attention paths: fused and the lab's reference heads."""
    fused = gpt(tiny_config, "fused")
    reference = gpt(tiny_config, "reference")
    reference.load_state_dict(fused.state_dict())
    return {"fused": fused, "reference": reference}


def lab_wei(reference: GPTLanguageModel, text: str) -> torch.Tensor:
    """Every lab `Head`'s `wei` as its own forward pass computes it: the input of its dropout
    (the identity in eval mode), caught by hooks. (n_layer, n_head, T, T)."""
    caught = []
    hooks = [
        head.dropout.register_forward_hook(lambda _m, args, _out: caught.append(args[0][0]))
        for block in reference.blocks
        for head in block.sa.heads
    ]
    try:
        reference(torch.tensor([TOKENIZER.encode(text)]))
    finally:
        for hook in hooks:
            hook.remove()
    n_head = len(reference.blocks[0].sa.heads)
    return torch.stack(caught).unflatten(0, (len(reference.blocks), n_head))


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_attention_is_the_lab_heads_wei(models, tiny_config, path):
    seen = inspect_text(models[path], TOKENIZER, TEXT)
    T = len(TEXT)
    assert seen.attention.shape == (tiny_config.n_layer, tiny_config.n_head, T, T)
    assert torch.allclose(seen.attention, lab_wei(models["reference"], TEXT), atol=1e-5, rtol=0)
    assert seen.attention.max() > 0.9  # peaked weights: the comparison is not between uniforms


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_rows_sum_to_one_and_never_look_ahead(models, path):
    attention = inspect_text(models[path], TOKENIZER, TEXT).attention
    T = len(TEXT)
    assert torch.allclose(attention.sum(-1), torch.ones(attention.shape[:-1]), atol=1e-6)
    future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    assert torch.all(attention[..., future] == 0)
    assert torch.all(attention[..., 0, 0] == 1)  # the first character can only see itself


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_probs_are_the_softmax_of_the_models_logits(models, path):
    seen = inspect_text(models[path], TOKENIZER, TEXT)
    logits = models[path](torch.tensor([TOKENIZER.encode(TEXT)]))[0][0]
    assert torch.allclose(seen.probs, F.softmax(logits, dim=-1), atol=1e-6, rtol=0)
    assert seen.chars == list(TEXT)


def test_top_lists_the_likeliest_next_characters_in_order(models):
    seen = inspect_text(models["fused"], TOKENIZER, TEXT, top_k=4)
    top = seen.top(5)
    assert len(top) == 4 and seen.top(5, k=100) == seen.top(5, k=TOKENIZER.vocab_size)
    probs = [p for _, p in top]
    assert probs == sorted(probs, reverse=True)
    by_hand = sorted(zip(seen.probs[5].tolist(), TOKENIZER.chars, strict=True), reverse=True)[:4]
    assert [(c, pytest.approx(p)) for p, c in by_hand] == top


def test_inspection_leaves_the_models_mode_alone(models):
    model = models["fused"].train()
    seen = inspect_text(model, TOKENIZER, TEXT)
    assert model.training
    again = inspect_text(model.eval(), TOKENIZER, TEXT)
    assert torch.equal(seen.attention, again.attention)  # no dropout while inspecting


def unpacked(head: str, T: int) -> np.ndarray:
    """A packed head (base64 of the float16 lower triangle, row-major) back to (T, T), written
    with numpy alone: the zeros above the diagonal filled in."""
    triangle = np.frombuffer(base64.b64decode(head), dtype="<f2")
    assert triangle.size == T * (T + 1) // 2
    weights = np.zeros((T, T), dtype=np.float32)
    weights[np.tril_indices(T)] = triangle  # numpy's order is row-major too
    return weights


def test_to_dict_is_json_with_packed_triangles_and_rounded_numbers(models, tiny_config):
    seen = inspect_text(models["fused"], TOKENIZER, "ROMEO:", top_k=3)
    data = json.loads(json.dumps(seen.to_dict(decimals=3)))
    assert data["chars"] == list("ROMEO:") and data["vocab"] == list(TOKENIZER.chars)
    assert (data["n_layer"], data["n_head"], data["note"]) == (2, 4, None)
    assert [len(layer) for layer in data["attention"]] == [4, 4]
    for layer in range(2):
        for head in range(4):
            weights = torch.from_numpy(unpacked(data["attention"][layer][head], 6))
            expected = seen.attention[layer, head]  # float16 keeps 11 bits: within 2**-12
            assert torch.allclose(weights, expected, atol=2**-12, rtol=0)
            assert torch.equal(weights, expected.half().float())  # round to nearest, exactly
    assert [c["char"] for c in data["top"][2]] == [c for c, _ in seen.top(2)]
    assert data["logprobs"][4][0] == pytest.approx(seen.probs[4, 0].log().item(), abs=5e-4)


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_reporting_the_weights_leaves_the_output_alone(models, tiny_config, path):
    """The weights a block reports are the ones its output is made of; asking for them changes
    nothing else, and a cache (decoding) cannot be combined with them."""
    x = torch.randn(2, 10, tiny_config.n_embd)
    for block in models[path].blocks:
        with torch.no_grad():
            y, wei = block(x, return_weights=True)
            assert torch.allclose(y, block(x), atol=1e-5, rtol=0)
            assert wei.shape == (2, tiny_config.n_head, 10, 10)
    if path == "fused":
        with pytest.raises(ValueError, match="pass no cache"):
            models[path].blocks[0](x, KVCache(tiny_config.block_size), return_weights=True)


def test_bigram_has_no_attention_and_says_so():
    model = BigramLanguageModel(TOKENIZER.vocab_size).eval()
    seen = inspect_text(model, TOKENIZER, TEXT * 4)  # a bigram reads any length
    assert seen.attention.shape == (0, 0, 64, 64) and seen.note == NO_ATTENTION
    data = seen.to_dict()
    assert data["n_layer"] == 0 and data["attention"] == [] and data["note"] == NO_ATTENTION
    row = model.token_embedding_table.weight[TOKENIZER.stoi["R"]]
    assert torch.allclose(seen.probs[0], F.softmax(row, dim=-1), atol=1e-6)


def test_unknown_characters_get_the_sampling_error(models):
    with pytest.raises(ChargptError) as sampling:
        encode_prompt(TOKENIZER, "ROMEO: ¡zé!")
    with pytest.raises(ChargptError) as inspecting:
        inspect_text(models["fused"], TOKENIZER, "ROMEO: ¡zé!")
    assert str(inspecting.value) == str(sampling.value)
    assert "'é'" in str(inspecting.value) and "\n" not in str(inspecting.value)
    skipped = inspect_text(models["fused"], TOKENIZER, "ROMEO: ¡zé!", on_unknown="skip")
    assert skipped.chars == list("ROMEO: ")


def test_text_longer_than_the_context_is_refused(models, tiny_config):
    with pytest.raises(ChargptError, match=r"has 17 characters .* at most 16: pass the last 16"):
        inspect_text(models["fused"], TOKENIZER, "a" * 17)
    assert len(inspect_text(models["fused"], TOKENIZER, "").chars) == 1  # a newline, as sampling


def test_top_k_must_be_positive(models):
    with pytest.raises(ChargptError, match="top_k must be at least 1"):
        inspect_text(models["fused"], TOKENIZER, TEXT, top_k=0)
