"""Int8 weights (`chargpt.model.quantize`): each layer within its rounding bound of fp32, a model's
predictions close to fp32's, the caller's model and the run untouched, clear errors where int8
cannot run, and `--quantize` reaching the model in sample, eval and serve."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from model_support import BLOCK, TOKENIZER, gpt_pair, tiny_gpt
from torch import nn
from torch.nn import functional as F

from chargpt.cli.main import main
from chargpt.config import ModelConfig, SampleConfig, TrainConfig
from chargpt.data.corpus import load_text
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.eval.evaluate import full_pass_loss
from chargpt.generation.decoders import SlotDecoder, make_decoder
from chargpt.generation.generate import generate, generate_ids
from chargpt.model import BigramLanguageModel, GPTLanguageModel, quantize
from chargpt.model.precision import forward_dtype
from chargpt.model.quantize import (
    KERNELS,
    ROW_INDEPENDENT,
    Int8Linear,
    fastest_kernel,
    is_quantized,
    kernel_seconds,
    probe_rows,
    quantized,
)
from chargpt.runs.directory import WEIGHTS, save_run

pytestmark = pytest.mark.usefixtures("one_thread")


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(TOKENIZER.vocab_size, (batch, length), generator=generator)


@pytest.fixture(autouse=True)
def fresh_kernel_choices():
    """Each test times the kernels afresh (or fakes the timing), whatever earlier tests chose."""
    fastest_kernel.cache_clear()
    yield
    fastest_kernel.cache_clear()


def with_kernel(model: GPTLanguageModel, kernel: str) -> GPTLanguageModel:
    return quantized(model, "int8", kernels=(kernel,))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(2, 1, 32), (3, 7, 32), (5, 32)])
def test_int8_linear_is_within_its_rounding_bound(shape, kernel):
    """Rounding moves each weight by at most half its row's step (max |w_row| / 127) and each
    input by dx; int32 sums are exact. So |y_int8 - y| is at most
    sum_i |x_i| dw + dx |w_i| + dx dw for every output, which this checks (plus float slack).
    int_mm's dx is half its row's step (max |x_row| / 127); fbgemm's 7-bit ints span
    [min(x, 0), max(x, 0)] over all rows in 127 steps, and its zero point is rounded too, which
    can clip the largest input by up to half a step more: dx is one whole step."""
    torch.manual_seed(0)
    linear = nn.Linear(32, 24)
    x = torch.randn(shape) * 3
    x.view(-1, 32)[0] = 0.0  # an all-zero row must come out as the bias
    dw = linear.weight.abs().amax(dim=1) / 127 / 2  # (out,)
    if kernel in ROW_INDEPENDENT:
        dx = x.abs().amax(dim=-1, keepdim=True) / 127 / 2  # (..., 1)
    else:
        dx = (x.max().clamp_min(0) - x.min().clamp_max(0)) / 127  # ()
    bound = x.abs().sum(-1, keepdim=True) * dw + dx * linear.weight.abs().sum(1) + 32 * dx * dw
    with torch.no_grad():
        error = (Int8Linear(linear, (kernel,))(x) - linear(x)).abs()
    assert error.shape == (*x.shape[:-1], 24)
    assert (error <= bound + 1e-5).all()
    assert (error > 0).any()  # it did round


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_int8_linear_turns_non_finite_inputs_into_nan(bad, kernel):
    """A row with inf or NaN is all NaN, whatever int8 value the CPU casts NaN to (undefined in
    C++: 0 on this test's machine, where the old code gave NaN too; -128 where the cast saturates,
    where an inf input came out as a row of ±inf), and whatever int fbgemm rounds it to (finite
    garbage for a NaN). Where rows are rounded each with its own scale, the other rows are
    untouched; fbgemm's rows share one range, which an inf spoils for all: there every output
    is NaN."""
    torch.manual_seed(0)
    int8 = Int8Linear(nn.Linear(8, 4), (kernel,))
    x = torch.randn(3, 8)
    x[1, 5] = bad
    with torch.no_grad():
        y = int8(x)
        assert y[1].isnan().all()
        if kernel in ROW_INDEPENDENT:
            torch.testing.assert_close(y[[0, 2]], int8(x[[0, 2]]))
        else:
            assert y.isnan().all()


# bounds on |int8 - fp32| / max |fp32| and on KL(fp32 || int8) in nats per character, for the
# logits of three seeds' tiny random GPTs at 8 x 16 positions: about twice what was measured
# (int_mm 0.028-0.037 and 3.5e-4 to 7e-4; fbgemm 0.064-0.089 and 2e-3 to 3e-3)
BOUNDS = {"int_mm": (0.06, 2e-3), "fbgemm": (0.15, 6e-3)}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("seed", range(3))
def test_int8_logits_stay_close_to_fp32(seed, kernel):
    """Each int8 product is off by about 1% of its scale for int_mm (two roundings of 1/254 of
    a row's maximum), about twice that for fbgemm (7-bit inputs, one range for all 128 rows),
    and nine of them in sequence (two blocks of four, and the head) leave the logits within a
    few percent. The two kernels are within the sum of their bounds of each other."""
    model = tiny_gpt(seed=seed)
    idx = random_ids(8, BLOCK, seed)
    worst, kl_bound = BOUNDS[kernel]
    with torch.no_grad():
        fp32, int8 = model.logits(idx), with_kernel(model, kernel).logits(idx)
        other = with_kernel(model, "int_mm" if kernel == "fbgemm" else "fbgemm").logits(idx)
    assert (int8 - fp32).abs().max() <= worst * fp32.abs().max()
    kl = F.kl_div(int8.log_softmax(-1), fp32.log_softmax(-1), log_target=True, reduction="none")
    assert kl.sum(-1).mean() < kl_bound
    both = BOUNDS["int_mm"][0] + BOUNDS["fbgemm"][0]
    assert (int8 - other).abs().max() <= both * fp32.abs().max()


@pytest.fixture(scope="module")
def trained() -> tuple[GPTLanguageModel, np.ndarray]:
    """A tiny GPT trained for a few seconds on Shakespeare (val loss about 2.6 against 3.7 for
    uniform guesses: activations shaped by training, not by the init), and held-out text."""
    text = load_text("shakespeare")[:40_000]
    tokenizer = CharTokenizer.from_text(text)
    data = torch.tensor(tokenizer.encode(text))
    train, val = data[:36_000], data[36_000:]
    torch.manual_seed(0)
    model = GPTLanguageModel(tiny_gpt().config, tokenizer.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        starts = torch.randint(len(train) - BLOCK - 1, (32,), generator=generator)
        x = torch.stack([train[i : i + BLOCK] for i in starts])
        y = torch.stack([train[i + 1 : i + BLOCK + 1] for i in starts])
        loss = F.cross_entropy(model.logits(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), val.numpy()


@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_full_pass_val_loss_is_within_a_hundredth_of_a_nat_of_fp32(trained, kernel):
    """`chargpt eval`'s full pass: batches of 64 windows, 1,024 rows a product (fbgemm's one
    range spans them all). Measured +0.0002 (int_mm) and +0.0003 (fbgemm)."""
    model, val = trained
    fp32, _ = full_pass_loss(model, val, BLOCK, stride=BLOCK)
    int8, _ = full_pass_loss(with_kernel(model, kernel), val, BLOCK, stride=BLOCK)
    assert fp32 < 2.9  # it learned something
    assert abs(int8 - fp32) < 0.01


@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_covers_every_recipe_option(kernel):
    """Rotary positions, RMSNorm, QK-norm, ReLU² and tied embeddings (the head's int8 copy of
    the shared matrix leaves the embedding in fp32), decoded through the lean step."""
    config = ModelConfig(block_size=BLOCK, n_embd=32, n_head=4, n_layer=2, dropout=0.0)
    options = dict(pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=True)
    torch.manual_seed(0)
    model = GPTLanguageModel(dataclasses.replace(config, **options), TOKENIZER.vocab_size)
    int8 = with_kernel(model.eval(), kernel)
    assert torch.equal(int8.token_embedding_table.weight, model.token_embedding_table.weight)
    idx = random_ids(2, BLOCK, 2)
    decoder = make_decoder(int8, idx[:, :3])
    for t in range(3, BLOCK):
        decoder.append(idx[:, t : t + 1])
    with torch.no_grad():
        fp32 = model.logits(idx)[:, -1]
    assert (decoder.logits - fp32).abs().max() <= BOUNDS[kernel][0] * fp32.abs().max()


@pytest.mark.parametrize("kernel", KERNELS)
def test_greedy_choices_mostly_equal_fp32(kernel):
    """Teacher-forced, so that one near-tie does not make all later text differ: the likeliest
    next character agrees at 97-100% of 128 positions for int_mm, 94-98% for fbgemm (measured
    over three seeds; this one's: 100% and 95%)."""
    model = tiny_gpt()
    idx = random_ids(8, BLOCK, 1)
    with torch.no_grad():
        fp32, int8 = model.logits(idx), with_kernel(model, kernel).logits(idx)
    agreement = {"int_mm": 0.95, "fbgemm": 0.9}[kernel]
    assert (fp32.argmax(-1) == int8.argmax(-1)).float().mean() >= agreement


@pytest.mark.parametrize("kernel", KERNELS)
def test_greedy_text_through_the_cached_decoder_starts_the_same(kernel):
    model = tiny_gpt(seed=1)  # whose greedy texts measured identical for 200 characters
    idx = random_ids(4, 3, 3)
    fp32 = generate_ids(model, idx, 3 * BLOCK, temperature=0)
    int8 = generate_ids(with_kernel(model, kernel), idx, 3 * BLOCK, temperature=0)
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
    int8 rows those of the fused matrix: both paths give one state dict, and it loads into each,
    fbgemm's packed copy of the weights following (it is made again from the loaded ones)."""
    fused, reference = gpt_pair(tiny_gpt().config)
    int8_fused, int8_reference = with_kernel(fused, "fbgemm"), with_kernel(reference, "fbgemm")
    state = int8_reference.state_dict()
    assert state.keys() == int8_fused.state_dict().keys()
    assert all(torch.equal(v, int8_fused.state_dict()[k]) for k, v in state.items())
    assert state["blocks.0.sa.qkv.weight_int8"].dtype == torch.int8
    other = with_kernel(tiny_gpt("reference", seed=1), "fbgemm")
    idx = random_ids(2, BLOCK, 0)
    with torch.no_grad():
        assert not torch.allclose(other.logits(idx), int8_fused.logits(idx))  # packs its own
        other.load_state_dict(int8_fused.state_dict())
        torch.testing.assert_close(other.logits(idx), int8_fused.logits(idx))


def test_fbgemm_multiplies_the_very_int8_weights_and_scales():
    layer = Int8Linear(nn.Linear(32, 24))
    weight, bias = torch.ops.quantized.linear_unpack(layer.packed_weights())
    assert torch.equal(weight.int_repr(), layer.weight_int8)
    torch.testing.assert_close(weight.q_per_channel_scales().float(), layer.weight_scale)
    assert torch.equal(bias, layer.bias)


def kernels_run(monkeypatch, model: GPTLanguageModel) -> list[str]:
    """The kernels that `model`'s layers run, one entry a product (they still compute)."""
    layers = {m for m in model.modules() if isinstance(m, Int8Linear)}
    ran: list[str] = []
    for name, kernel in list(KERNELS.items()):

        def counted(layer: Int8Linear, rows: torch.Tensor, name=name, kernel=kernel):
            if layer in layers:  # not the layers that probe a kernel
                ran.append(name)
            return kernel(layer, rows)

        monkeypatch.setitem(KERNELS, name, counted)
    return ran


@pytest.mark.parametrize("faster", KERNELS)
def test_every_layer_runs_the_kernel_timed_fastest_once_per_process(monkeypatch, faster):
    timed = []

    def seconds(in_features: int, out_features: int, rows: int, kernels: list[str]) -> dict:
        timed.append((in_features, out_features, rows))
        return {kernel: 1.0 if kernel == faster else 2.0 for kernel in kernels}

    monkeypatch.setattr(quantize, "kernel_seconds", seconds)
    model = quantized(tiny_gpt(), "int8")
    ran = kernels_run(monkeypatch, model)
    with torch.no_grad():
        model.logits(random_ids(1, 1, 0))
        quantized(tiny_gpt(seed=1), "int8").logits(random_ids(2, 1, 1))
    assert ran == [faster] * (4 * 2 + 1)  # four products a block and the head
    C = model.config.n_embd
    assert timed == [(C, 4 * C, 1)]  # the largest layer's shape, once for every layer and model


def test_few_rows_and_many_rows_choose_apart(monkeypatch):
    """A one-row decode step and a 64-row prompt may each run another kernel."""

    def seconds(in_features: int, out_features: int, rows: int, kernels: list[str]) -> dict:
        return {"int_mm": 1.0 if rows == 1 else 3.0, "fbgemm": 2.0}

    monkeypatch.setattr(quantize, "kernel_seconds", seconds)
    model = quantized(tiny_gpt(), "int8")
    ran = kernels_run(monkeypatch, model)
    with torch.no_grad():
        model.logits(random_ids(1, 1, 0))
        assert set(ran) == {"int_mm"}
        ran.clear()
        model.logits(random_ids(4, BLOCK, 0))
        assert set(ran) == {"fbgemm"}
    assert [probe_rows(n) for n in (1, 3, 4, 31, 32, 4096)] == [1, 1, 16, 16, 64, 64]


def test_a_real_timing_gives_each_kernel_seconds(monkeypatch):
    """Not a speed test: the probe runs every kernel and returns what the choice compares."""
    seconds = kernel_seconds(32, 24, 16, list(KERNELS))
    assert seconds.keys() == KERNELS.keys()
    assert all(0 < s < 60 for s in seconds.values())
    assert fastest_kernel(32, 24, 16, tuple(KERNELS)) in KERNELS


def test_an_int8_model_runs_in_fp32_whatever_the_dtype_setting():
    model = tiny_gpt()
    cpu = torch.device("cpu")
    assert forward_dtype(quantized(model, "int8"), "bf16", cpu) == torch.float32
    assert forward_dtype(model, "bf16", cpu) == torch.bfloat16
    assert forward_dtype(model, "auto", cpu) == torch.float32  # whatever bf16 support it has
    with pytest.raises(ChargptError, match="drop --dtype bf16"):
        SampleConfig(quantize="int8", dtype="bf16").validate()


def test_bigram_other_devices_and_missing_kernels_are_one_line_errors(monkeypatch):
    """A kernel this PyTorch lacks is never chosen; without any, int8 is a one-line error."""
    with pytest.raises(ChargptError, match=r"bigram.*drop --quantize"):
        quantized(BigramLanguageModel(5), "int8")
    with pytest.raises(ChargptError, match="CPU only, not on meta"):
        quantized(tiny_gpt().to("meta"), "int8")

    def missing(*_args: object) -> None:
        raise RuntimeError("not implemented\nfor this build")

    monkeypatch.setattr(torch, "_int_mm", missing)
    int8 = quantized(tiny_gpt(), "int8")
    with torch.no_grad():
        int8.logits(random_ids(2, BLOCK, 0))  # through fbgemm
    monkeypatch.setattr(torch.ops.quantized, "linear_prepack", missing)
    with pytest.raises(ChargptError, match="no int8 matrix product") as err:
        quantized(tiny_gpt(), "int8")
    assert "\n" not in str(err.value) and "int_mm: not implemented" in str(err.value)


@pytest.mark.parametrize("kernel", KERNELS)
@torch.inference_mode()
def test_the_serving_decoder_runs_an_int8_model_close_to_fp32(kernel):
    model = tiny_gpt()
    int8 = with_kernel(model, kernel)
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
    assert (rows[1] - rows[0]).abs().max() <= BOUNDS[kernel][0] * rows[0].abs().max()
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
    """With --deterministic, on ROW_INDEPENDENT kernels only."""
    pytest.importorskip("fastapi")
    import chargpt.serve.server as server

    class Served(Exception):
        pass

    def create_app(run, *_args):
        layers = [m for m in run.model.modules() if isinstance(m, Int8Linear)]
        raise Served(is_quantized(run.model), {layer.kernels for layer in layers})

    monkeypatch.setattr(server, "create_app", create_app)
    command = ["serve", "--run", str(run_dir), "--quantize", "int8", "--port", "0"]
    for flags, kernels in (([], tuple(KERNELS)), (["--deterministic"], ROW_INDEPENDENT)):
        with pytest.raises(Served) as served:
            main([*command, *flags])
        assert served.value.args == (True, {kernels})


@pytest.mark.parametrize("int8_ms", [3.0, 1.0])
def test_sample_and_eval_say_when_int8_is_slower_than_fp32_here(
    run_dir, capsys, monkeypatch, tmp_path, int8_ms
):
    """One line with both start-up timings (faked here) where int8 is the slower, none where
    it is faster; and none without --quantize, which times nothing."""
    import chargpt.generation.speed as speed

    timed: list[set] = []

    def seconds(jobs: dict, **_options: object) -> dict[str, float]:
        timed.append(set(jobs))
        return {"--quantize int8": int8_ms / 1000, "fp32": 0.002}

    monkeypatch.setattr(speed, "fastest_seconds", seconds)
    text = tmp_path / "text.txt"
    text.write_text(TOKENIZER.decode(random_ids(1, 500, 5)[0].tolist()), encoding="utf-8")
    sample = ["sample", "--run", str(run_dir), "--max-new-tokens", "5"]
    evaluate = ["eval", "--run", str(run_dir), "--data", str(text), "--eval-iters", "1"]
    for command, unit in ((sample, "character"), (evaluate, "window")):
        assert main([*command, "--quantize", "int8"]) == 0
        notes = [line for line in capsys.readouterr().err.splitlines() if "slower" in line]
        note = (
            f"note: --quantize int8 is slower than fp32 PyTorch on this machine (3.0 vs 2.0 ms "
            f"a {unit}, timed at start-up)"
        )
        assert notes == ([note] if int8_ms > 2 else [])
        assert main(command) == 0
        assert "slower" not in capsys.readouterr().err
    assert timed == [{"--quantize int8", "fp32"}] * 2


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
