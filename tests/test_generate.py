"""Generation: the KV cache computes what the full recompute computes, long contexts follow their
documented schedule, and the text API (seeds, batches, stop strings, streaming, prompts) keeps
its promises."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_support import BLOCK, TOKENIZER, tiny_gpt

from chargpt.cli.main import main
from chargpt.config import MAX_SEED, ModelConfig, TrainConfig
from chargpt.errors import ChargptError
from chargpt.generation.decoders import Rows, make_decoder
from chargpt.generation.generate import StopFilter, generate, generate_ids, stream
from chargpt.model import BigramLanguageModel, GPTLanguageModel
from chargpt.model.cache import KVCache
from chargpt.runs.directory import save_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> GPTLanguageModel:
    return tiny_gpt()


def prompts(length: int, batch: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(length)
    return torch.randint(TOKENIZER.vocab_size, (batch, length), generator=generator)


def test_the_labs_generate_samples_what_generate_ids_samples(model):
    """The lab's plain loop on the model and the cached sampler draw the same ids from the same
    generator: softmax at temperature 1, no filter, past block_size with the exact rule."""
    idx = prompts(3)
    lab = model.generate(idx, 2 * BLOCK, generator=torch.Generator().manual_seed(7))
    ours = generate_ids(
        model, idx, 2 * BLOCK, generator=torch.Generator().manual_seed(7), long_context="exact"
    )
    assert lab.tolist() == ours.tolist()


@pytest.mark.parametrize("length", range(1, BLOCK + 1))
def test_cached_greedy_equals_recompute_for_every_prompt_length(model, length):
    idx = prompts(length)
    new = BLOCK - length + 4  # runs past block_size too, in exact mode
    cached = generate_ids(model, idx, new, temperature=0, long_context="exact")
    recomputed = generate_ids(model, idx, new, temperature=0, kv_cache=False)
    assert cached.tolist() == recomputed.tolist()


@pytest.mark.parametrize("length", range(1, BLOCK))
def test_lean_step_equals_the_general_cached_forward(model, length):
    """`step` (generation's decode step) against `logits(idx, caches)` for one position, from
    every cache length; the decoder tests below run it past block_size in both modes."""
    seq = prompts(length + 1)
    lean, general = ([KVCache(BLOCK) for _ in model.blocks] for _ in range(2))
    with torch.no_grad():
        model.logits(seq[:, :-1], lean)
        model.logits(seq[:, :-1], general)
        stepped = model.step(seq[:, -1:], lean)
        expected = model.logits(seq[:, -1:], general)[:, -1, :]
    torch.testing.assert_close(stepped, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(lean, general, strict=True):
        assert a.length == b.length == length + 1
        torch.testing.assert_close(a.k[:, :, : a.length], b.k[:, :, : b.length])
        torch.testing.assert_close(a.v[:, :, : a.length], b.v[:, :, : b.length])


def test_fused_cache_equals_the_labs_reference_heads(model):
    reference = tiny_gpt("reference")
    reference.load_state_dict(model.state_dict())
    idx = prompts(3)
    labs = generate_ids(reference, idx, 3 * BLOCK, temperature=0)  # per-head attention, recompute
    ours = generate_ids(model, idx, 3 * BLOCK, temperature=0, long_context="exact")
    assert ours.tolist() == labs.tolist()


def teacher_forced_logits(decoder: Rows, continuation: torch.Tensor) -> list[torch.Tensor]:
    """The decoder's next-token logits before each id of `continuation` (B, N) and after all."""
    out = [decoder.logits]
    for t in range(continuation.size(1)):
        decoder.append(continuation[:, t : t + 1])
        out.append(decoder.logits)
    return out


def recompute_logits(model: GPTLanguageModel, seq: torch.Tensor, context: int) -> torch.Tensor:
    return model.logits(seq[:, -context:])[:, -1, :]


def test_exact_mode_logits_see_exactly_the_last_block_size_ids(model):
    seq = prompts(3 * BLOCK)
    decoder = make_decoder(model, seq[:, :5], long_context="exact")
    for n, logits in enumerate(teacher_forced_logits(decoder, seq[:, 5:]), start=5):
        expected = recompute_logits(model, seq[:, :n], min(n, BLOCK))
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window_keep", [0.25, 0.5, 0.9])
def test_window_mode_follows_its_documented_schedule(model, window_keep):
    keep = int(window_keep * BLOCK)
    period = BLOCK - keep + 1
    seq = prompts(4 * BLOCK)
    decoder = make_decoder(model, seq[:, :3], long_context="window", window_keep=window_keep)
    for n, logits in enumerate(teacher_forced_logits(decoder, seq[:, 3:]), start=3):
        # up to block_size: everything; then keep, keep + 1, ..., block_size, keep, ...
        context = n if n <= BLOCK else keep + (n - BLOCK - 1) % period
        expected = recompute_logits(model, seq[:, :n], context)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunks", [(5, 3, 8), (1, 7, 1, 7), (16,)])
def test_cache_appended_several_positions_at_a_time_equals_one_full_pass(model, chunks):
    seq = prompts(sum(chunks))
    caches = [KVCache(BLOCK) for _ in model.blocks]
    with torch.no_grad():
        pieces, start = [], 0
        for n in chunks:  # each chunk's queries see the cached keys and their own causal past
            pieces.append(model.logits(seq[:, start : start + n], caches))
            start += n
        torch.testing.assert_close(torch.cat(pieces, 1), model.logits(seq), atol=1e-5, rtol=1e-5)
    assert caches[0].length == sum(chunks)


def test_prefill_from_position_0_asks_sdpa_for_is_causal_not_a_mask(model, monkeypatch):
    """No mask tensor at the prefill, so that a GPU can pick its flash kernel."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        model.logits(prompts(5), [KVCache(BLOCK) for _ in model.blocks])
    assert calls == [(None, True)] * len(model.blocks)


def test_prompt_longer_than_block_size_is_cropped_to_its_end(model):
    long = prompts(BLOCK + 7)
    out = generate_ids(model, long, 5, temperature=0, long_context="exact")
    cropped = generate_ids(model, long[:, -BLOCK:], 5, temperature=0, long_context="exact")
    assert out[:, -5:].tolist() == cropped[:, -5:].tolist()


def test_bigram_reads_one_position_per_token():
    torch.manual_seed(0)
    bigram = BigramLanguageModel(7).eval()
    seen_lengths = []
    original = bigram.logits
    bigram.logits = lambda idx: seen_lengths.append(idx.size(1)) or original(idx)
    out = generate_ids(bigram, torch.tensor([[3, 1, 4, 1, 5]]), 20, temperature=0)[0].tolist()
    assert seen_lengths == [1] * 20  # the prompt's last id, then one id per token
    table = bigram.token_embedding_table.weight
    for prev, nxt in itertools.pairwise(out[4:]):
        assert nxt == table[prev].argmax().item()  # greedy bigram: the likeliest successor


# --- the text API ---


@pytest.mark.parametrize("temperature", [1e-40, 1e-6])
def test_vanishing_temperature_samples_greedily_without_error(model, temperature):
    tiny = generate(model, TOKENIZER, "abc", max_new_tokens=20, temperature=temperature, seed=1)
    assert tiny == generate(model, TOKENIZER, "abc", max_new_tokens=20, temperature=0)


def test_sampling_sets_eval_mode_itself_and_restores_the_callers_mode():
    config = ModelConfig(block_size=BLOCK, n_embd=32, n_head=4, n_layer=2, dropout=0.5)
    torch.manual_seed(0)
    dropout_model = GPTLanguageModel(config, TOKENIZER.vocab_size)
    expected = generate(dropout_model.eval(), TOKENIZER, "abc", max_new_tokens=30, seed=3)
    dropout_model.train()  # the caller forgot model.eval(): dropout must still be off
    assert generate(dropout_model, TOKENIZER, "abc", max_new_tokens=30, seed=3) == expected
    assert dropout_model.training
    pieces = stream(dropout_model, TOKENIZER, "abc", max_new_tokens=30, seed=3)
    next(pieces)
    assert not dropout_model.training  # while it streams...
    pieces.close()
    assert dropout_model.training  # ...and back once the caller closes the stream


def test_temperature_zero_ignores_the_seed(model):
    a = generate(model, TOKENIZER, "abc", max_new_tokens=30, temperature=0, seed=1)
    b = generate(model, TOKENIZER, "abc", max_new_tokens=30, temperature=0, seed=2)
    assert a == b


def test_same_seed_same_text_and_another_seed_other_text(model):
    def text(seed):
        return generate(model, TOKENIZER, "abc", max_new_tokens=40, seed=seed)[0]

    assert text(7) == text(7)
    assert text(7) != text(8)


def test_batched_samples_equal_one_at_a_time_with_seed_plus_index(model):
    controls = dict(max_new_tokens=40, temperature=1.2, top_k=6, top_p=0.95)
    batch = generate(model, TOKENIZER, "ab", num_samples=4, seed=10, **controls)
    alone = [generate(model, TOKENIZER, "ab", seed=10 + i, **controls)[0] for i in range(4)]
    assert batch == alone
    assert len(set(batch)) > 1


@pytest.mark.parametrize("stop", [(), ("a",), ("bc", "j\n"), ("zz",)])
def test_streaming_yields_the_token_level_samples_cut_at_the_first_stop(model, stop):
    pieces = list(
        stream(model, TOKENIZER, "hi", max_new_tokens=60, seed=3, num_samples=3, stop=stop)
    )
    streamed = ["".join(p.text for p in pieces if p.sample == i) for i in range(3)]
    # independent expectation: the model's token ids with the same per-sample seeds, decoded
    idx = torch.tensor([TOKENIZER.encode("hi")] * 3)
    generators = [torch.Generator().manual_seed(3 + i) for i in range(3)]
    ids = generate_ids(model, idx, 60, 1.0, 0, generators)[:, 2:]
    expected = [cut_at_first_stop(TOKENIZER.decode(row.tolist()), stop) for row in ids]
    assert streamed == expected
    assert streamed == generate(
        model, TOKENIZER, "hi", max_new_tokens=60, seed=3, num_samples=3, stop=stop
    )


def cut_at_first_stop(text: str, stops: tuple[str, ...]) -> str:
    """The text up to where the first stop string to be completed starts (the longest of those
    completed by the same character)."""
    for end in range(len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[: end - max(map(len, done))]
    return text


@settings(max_examples=300, deadline=None)
@given(st.text("abc", max_size=30), st.lists(st.text("abc", min_size=1, max_size=4), max_size=3))
def test_stop_filter_emits_everything_before_the_first_stop(text, stops):
    stop_filter = StopFilter(tuple(stops))
    emitted = ""
    for ch in text:
        emitted += stop_filter.feed(ch)
        if stop_filter.done:
            break
    else:
        emitted += stop_filter.flush()
    assert emitted == cut_at_first_stop(text, tuple(stops))


def test_bf16_runs_the_cached_path(model):
    (text,) = generate(model, TOKENIZER, "abc", max_new_tokens=2 * BLOCK, dtype="bf16", seed=0)
    assert len(text) == 2 * BLOCK and set(text) <= set(TOKENIZER.chars)


def test_unknown_prompt_characters_are_listed_or_skipped(model):
    with pytest.raises(ChargptError, match=r"'X', 'Z'.*--on-unknown skip"):
        generate(model, TOKENIZER, "aXbZ", max_new_tokens=5)
    skipped = generate(
        model, TOKENIZER, "aXbZ", max_new_tokens=20, temperature=0, on_unknown="skip"
    )
    assert skipped == generate(model, TOKENIZER, "ab", max_new_tokens=20, temperature=0)


@pytest.mark.parametrize(
    "controls, message",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(num_samples=0), "num_samples"),
        (dict(stop=("",)), "stop"),
        (dict(window_keep=1.0), "window_keep"),
        (dict(tempurature=1.0), "unknown SampleConfig option"),
        (dict(top_k="5"), "top_k must be of type int"),
        (dict(seed=-2), "seed must be an integer in 0..9223372036854775807"),
        (dict(seed=2**64 - 2, num_samples=2), "seed must be"),  # seed + 1 overflowed a 500
    ],
)
def test_invalid_controls_are_one_line_errors(model, controls, message):
    with pytest.raises(ChargptError, match=message) as err:
        generate(model, TOKENIZER, "a", **controls)
    assert "\n" not in str(err.value)


def test_the_largest_seed_samples_every_choice(model):
    """MAX_SEED + i of the later samples still fits torch's generators: the bound leaves room."""
    texts = generate(model, TOKENIZER, "a", max_new_tokens=5, seed=MAX_SEED, num_samples=3)
    assert len(texts) == 3
    assert texts[0] == generate(model, TOKENIZER, "a", max_new_tokens=5, seed=MAX_SEED)[0]


# --- the command ---


@pytest.fixture(scope="module")
def run_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    save_run(path, model, TOKENIZER, model.config, TrainConfig())
    return path


def test_sample_command_prints_prompt_and_continuation(model, run_dir, capsys):
    args = ["sample", "--run", str(run_dir), "--prompt", "ab", "--max-new-tokens", "25"]
    assert main([*args, "--seed", "5", "--top-k", "4", "--stop", "j"]) == 0
    out = capsys.readouterr().out
    expected = generate(model, TOKENIZER, "ab", max_new_tokens=25, seed=5, top_k=4, stop=("j",))
    assert out == "ab" + expected[0] + "\n"


def test_sample_command_batches_and_reports_a_random_seed(run_dir, capsys):
    args = ["sample", "--run", str(run_dir), "--max-new-tokens", "10", "--num-samples", "3"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.count("-" * 40) == 2
    assert captured.err.startswith("seed ")


@pytest.mark.parametrize(
    "flags",
    [
        ["--temperature", "-1"],
        ["--top-p", "2"],
        ["--prompt", "ABC"],
        ["--top-k", "-3"],
        ["--seed", str(2**64 - 1), "--num-samples", "2"],  # was a traceback from manual_seed
    ],
)
def test_sample_command_bad_input_is_one_line(run_dir, capsys, flags):
    assert main(["sample", "--run", str(run_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("chargpt sample: error:")
