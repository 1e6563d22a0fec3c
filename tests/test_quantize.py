"""Int8 weights (`chargpt.model.quantize`): each layer within its rounding bound of fp32, a model's
predictions close to fp32's, the caller's model and the run untouched, clear errors where int8
cannot run, and `--quantize` reaching the model in sample, eval and serve."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from model_support import BLOCK, TOKENIZER, gpt_pair, tiny_gpt
from torch import nn
from torch.nn import functional as F

from chargpt.cli.main import main
from chargpt.config import ModelConfig, SampleConfig, TrainConfig
from chargpt.errors import ChargptError
from chargpt.generation.decoders import SlotDecoder, make_decoder
from chargpt.generation.generate import generate, generate_ids
from chargpt.model import BigramLanguageModel, GPTLanguageModel
from chargpt.model.precision import forward_dtype
from chargpt.model.quantize import Int8Linear, is_quantized, quantized
from chargpt.runs.directory import WEIGHTS, save_run

pytestmark = pytest.mark.usefixtures("one_thread")


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(TOKENIZER.vocab_size, (batch, length), generator=generator)


@pytest.mark.parametrize("shape", [(2, 1, 32), (3, 7, 32), (5, 32)])
def test_int8_linear_is_within_its_rounding_bound(shape):
    """Rounding moves each weight by at most half its row's step (max |w_row| / 127) and each
    input by half its row's step; int32 sums are exact. So |y_int8 - y| is at most
    sum_i |x_i| dw + dx |w_i| + dx dw for every output, which this checks (plus float slack)."""
    torch.manual_seed(0)
    linear = nn.Linear(32, 24)
    x = torch.randn(shape) * 3
    x.view(-1, 32)[0] = 0.0  # an all-zero row must come out as the bias
    dw = linear.weight.abs().amax(dim=1) / 127 / 2  # (out,)
    dx = x.abs().amax(dim=-1, keepdim=True) / 127 / 2  # (..., 1)
    bound = x.abs().sum(-1, keepdim=True) * dw + dx * linear.weight.abs().sum(1) + 32 * dx * dw
    with torch.no_grad():
        error = (Int8Linear(linear)(x) - linear(x)).abs()
    assert error.shape == bound.shape
    assert (error <= bound + 1e-5).all()
    assert (error > 0).any()  # it did round


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_int8_linear_turns_non_finite_inputs_into_nan(bad):
    """A row with inf or NaN is all NaN, whatever int8 value the CPU casts NaN to (undefined in
    C++: 0 on this test's machine, where the old code gave NaN too; -128 where the cast saturates,
    where an inf input came out as a row of ±inf). The other rows are untouched."""
    torch.manual_seed(0)
    int8 = Int8Linear(nn.Linear(8, 4))
    x = torch.randn(3, 8)
    x[1, 5] = bad
    with torch.no_grad():
        y = int8(x)
        assert y[1].isnan().all()
        torch.testing.assert_close(y[[0, 2]], int8(x[[0, 2]]))


@pytest.mark.parametrize("seed", range(3))
def test_int8_logits_stay_close_to_fp32(seed):
    """Bounds with a margin of about 2x over what three seeds measured: each int8 product is
    off by about 1% of its scale (two roundings of 1/254 of a row's maximum), and nine of them
    in sequence (two blocks of four, and the head) leave the logits within a few percent."""
    model = tiny_gpt(seed=seed)
    idx = random_ids(8, BLOCK, seed)
    with torch.no_grad():
        fp32, int8 = model.logits(idx), quantized(model, "int8").logits(idx)
    assert (int8 - fp32).abs().max() <= 0.06 * fp32.abs().max()  # measured 0.028-0.034
    kl = F.kl_div(int8.log_softmax(-1), fp32.log_softmax(-1), log_target=True, reduction="none")
    assert kl.sum(-1).mean() < 2e-3  # nats per character; measured 3.5e-4 to 5.7e-4


def test_int8_covers_every_recipe_option():
    """Rotary positions, RMSNorm, QK-norm, ReLU² and tied embeddings (the head's int8 copy of
    the shared matrix leaves the embedding in fp32), decoded through the lean step."""
    config = ModelConfig(block_size=BLOCK, n_embd=32, n_head=4, n_layer=2, dropout=0.0)
    options = dict(pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=True)
    torch.manual_seed(0)
    model = GPTLanguageModel(dataclasses.replace(config, **options), TOKENIZER.vocab_size)
    int8 = quantized(model.eval(), "int8")
    assert torch.equal(int8.token_embedding_table.weight, model.token_embedding_table.weight)
    idx = random_ids(2, BLOCK, 2)
    decoder = make_decoder(int8, idx[:, :3])
    for t in range(3, BLOCK):
        decoder.append(idx[:, t : t + 1])
    with torch.no_grad():
        fp32 = model.logits(idx)[:, -1]
    assert (decoder.logits - fp32).abs().max() <= 0.06 * fp32.abs().max()


def test_greedy_choices_mostly_equal_fp32():
    """Teacher-forced, so that one near-tie does not make all later text differ: the likeliest
    next character agrees at 98-100% of 128 positions (measured over three seeds)."""
    model = tiny_gpt()
    idx = random_ids(8, BLOCK, 1)
    with torch.no_grad():
        fp32, int8 = model.logits(idx), quantized(model, "int8").logits(idx)
    assert (fp32.argmax(-1) == int8.argmax(-1)).float().mean() >= 0.95


def test_greedy_text_through_the_cached_decoder_starts_the_same():
    model = tiny_gpt(seed=1)  # whose greedy texts measured identical for 200 characters
    idx = random_ids(4, 3, 3)
    fp32 = generate_ids(model, idx, 3 * BLOCK, temperature=0)
    int8 = generate_ids(quantized(model, "int8"), idx, 3 * BLOCK, temperature=0)
    assert (fp32 == int8).float().mean() >= 0.9


def test_quantized_copies_and_leaves_the_callers_model_alone():
    model = tiny_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    int8 = quantized(model, "int8")
    assert int8 is not model and is_quantized(int8) and not is_quantized(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert quantized(int8, "int8") is int8  # already int8: itself
    assert quantized(model, "none") is model
    assert not any(isinstance(m, nn.Linear) for m in int8.modules())


@pytest.mark.parametrize("tie", [False, True])
def test_an_int8_model_counts_all_its_parameters(tie):
    """Int8Linear kept its weights in buffers: num_parameters (and /v1/models) saw ~1%. Every
    weight and bias counts, scales do not; a tied LM head's int8 copy is a matrix of its own."""
    config = dataclasses.replace(tiny_gpt().config, tie_embeddings=tie)
    model = GPTLanguageModel(config, TOKENIZER.vocab_size)
    C, V, L = config.n_embd, TOKENIZER.vocab_size, config.n_layer
    block = 3 * C * C + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C) + 2 * 2 * C
    fp32 = V * C + BLOCK * C + L * block + 2 * C + (0 if tie else V * C) + V
    assert model.num_parameters() == fp32
    assert quantized(model, "int8").num_parameters() == fp32 + (V * C if tie else 0)


def test_int8_state_dicts_of_both_attention_paths_agree_and_load():
    """state_dict() of an int8 `reference` model raised KeyError. Per-row scales make the heads'
    int8 rows those of the fused matrix: both paths give one state dict, and it loads into each."""
    fused, reference = gpt_pair(tiny_gpt().config)
    int8_fused, int8_reference = quantized(fused, "int8"), quantized(reference, "int8")
    state = int8_reference.state_dict()
    assert state.keys() == int8_fused.state_dict().keys()
    assert all(torch.equal(v, int8_fused.state_dict()[k]) for k, v in state.items())
    assert state["blocks.0.sa.qkv.weight_int8"].dtype == torch.int8
    other = quantized(tiny_gpt("reference", seed=1), "int8")
    other.load_state_dict(int8_fused.state_dict())
    idx = random_ids(2, BLOCK, 0)
    with torch.no_grad():
        torch.testing.assert_close(other.logits(idx), int8_fused.logits(idx))


def test_an_int8_model_runs_in_fp32_whatever_the_dtype_setting():
    model = tiny_gpt()
    cpu = torch.device("cpu")
    assert forward_dtype(quantized(model, "int8"), "bf16", cpu) == torch.float32
    assert forward_dtype(model, "bf16", cpu) == torch.bfloat16
    assert forward_dtype(model, "auto", cpu) == torch.float32  # whatever bf16 support it has
    with pytest.raises(ChargptError, match="drop --dtype bf16"):
        SampleConfig(quantize="int8", dtype="bf16").validate()


def test_bigram_other_devices_and_a_missing_kernel_are_one_line_errors(monkeypatch):
    with pytest.raises(ChargptError, match=r"bigram.*drop --quantize"):
        quantized(BigramLanguageModel(5), "int8")
    with pytest.raises(ChargptError, match="CPU only, not on meta"):
        quantized(tiny_gpt().to("meta"), "int8")

    def missing(*_args: object) -> None:
        raise RuntimeError("_int_mm: not implemented\nfor this build")

    monkeypatch.setattr(torch, "_int_mm", missing)
    with pytest.raises(ChargptError, match="no int8 matrix product") as err:
        quantized(tiny_gpt(), "int8")
    assert "\n" not in str(err.value)


@torch.inference_mode()
def test_the_serving_decoder_runs_an_int8_model_close_to_fp32():
    model = tiny_gpt()
    int8 = quantized(model, "int8")
    ids = random_ids(1, 2 * BLOCK, 4)[0].tolist()
    rows = []
    for m in (model, int8):
        decoder = SlotDecoder(m, slots=2)
        decoder.start(1, ids[:5])
        for token in ids[5:]:  # past block_size: window restarts too
            decoder.append({1: token})
        rows.append(decoder.logits([1])[0])
    single = make_decoder(int8, torch.tensor([ids[:5]]))
    for token in ids[5:]:
        single.append(torch.tensor([[token]]))
    assert (rows[1] - rows[0]).abs().max() <= 0.06 * rows[0].abs().max()
    torch.testing.assert_close(rows[1], single.logits[0], atol=1e-4, rtol=1e-4)


# --- the flags ---


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    model = tiny_gpt()
    save_run(path, model, TOKENIZER, model.config, TrainConfig(dtype="fp32"))
    return path


@pytest.fixture
def int8_calls(monkeypatch) -> list[int]:
    """Counts Int8Linear forward passes: proof that a command ran the int8 model."""
    calls: list[int] = []
    forward = Int8Linear.forward

    def counted(self: Int8Linear, x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return forward(self, x)

    monkeypatch.setattr(Int8Linear, "forward", counted)
    return calls


def test_sample_quantize_int8_samples_from_the_int8_model(run_dir, capsys, int8_calls):
    args = ["sample", "--run", str(run_dir), "--prompt", "ab", "--max-new-tokens", "20"]
    assert main([*args, "--seed", "3", "--quantize", "int8"]) == 0
    assert int8_calls
    expected = generate(tiny_gpt(), TOKENIZER, "ab", max_new_tokens=20, seed=3, quantize="int8")
    assert capsys.readouterr().out == "ab" + expected[0] + "\n"
    weights = run_dir / WEIGHTS
    assert weights.stat().st_size > 4 * tiny_gpt().num_parameters()  # still fp32


def test_eval_quantize_int8_scores_the_int8_model(run_dir, capsys, int8_calls, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TOKENIZER.decode(random_ids(1, 3000, 5)[0].tolist()), encoding="utf-8")
    base = ["eval", "--run", str(run_dir), "--data", str(text), "--eval-iters", "1", "--json"]
    assert main(base) == 0
    assert not int8_calls
    fp32 = json.loads(capsys.readouterr().out)["val_loss"]
    assert main([*base, "--quantize", "int8"]) == 0
    assert int8_calls
    int8 = json.loads(capsys.readouterr().out)["val_loss"]
    assert int8 != fp32 and abs(int8 - fp32) < 0.05


def test_serve_quantize_int8_serves_the_int8_model(run_dir, monkeypatch):
    pytest.importorskip("fastapi")
    import chargpt.serve.server as server

    class Served(Exception):
        pass

    def create_app(run, *_args):
        raise Served(is_quantized(run.model))

    monkeypatch.setattr(server, "create_app", create_app)
    with pytest.raises(Served) as served:
        main(["serve", "--run", str(run_dir), "--quantize", "int8", "--port", "0"])
    assert served.value.args == (True,)


def test_quantize_flag_errors_are_one_line(run_dir, capsys, tmp_path):
    bigram = tmp_path / "bigram"
    config = ModelConfig(model="bigram")
    save_run(bigram, BigramLanguageModel(TOKENIZER.vocab_size), TOKENIZER, config, TrainConfig())
    for command in (["sample", "--run", str(bigram)], ["eval", "--run", str(bigram)]):
        assert main([*command, "--quantize", "int8"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "drop --quantize" in err
    assert main(["sample", "--run", str(run_dir), "--quantize", "int8", "--dtype", "bf16"]) == 2
    assert "drop --dtype bf16" in capsys.readouterr().err
