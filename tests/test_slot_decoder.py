"""Batched decoding with per-sequence positions (`SlotDecoder`, what `chargpt serve` runs): each
slot computes what a single-sequence decoder (`chargpt sample`'s) computes; the masked step (busy
slots, keys in buckets) computes what the fixed-shape step computes, through few shapes; rows at
one position take `chargpt sample`'s lean step, bit for bit; and with fixed shapes
(`deterministic`) a slot's numbers do not depend on what the other slots hold."""

from __future__ import annotations

import pytest
import torch
from model_support import BLOCK, TOKENIZER, tiny_gpt

from chargpt.config import ModelConfig
from chargpt.generation.decoders import KEY_BUCKET, SlotDecoder, make_decoder
from chargpt.model.cache import KVCache
from chargpt.model.gpt import GPTLanguageModel
from chargpt.model.quantize import ROW_INDEPENDENT, quantized

pytestmark = pytest.mark.usefixtures("one_thread")


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(
        TOKENIZER.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


def single_sequence_logits(model, prompt: list[int], continuation: list[int]) -> list[torch.Tensor]:
    """The next-token logits a batch of one (`chargpt sample`) gives before each id
    of `continuation` and after the last, in window mode with window_keep 0.5."""
    decoder = make_decoder(model, torch.tensor([prompt]), long_context="window", window_keep=0.5)
    out = [decoder.logits[0]]
    for token in continuation:
        decoder.append(torch.tensor([[token]]))
        out.append(decoder.logits[0])
    return out


def mixed_schedule(model, block: int, deterministic: bool) -> dict[int, list[torch.Tensor]]:
    """Four sequences at different positions share the steps; one joins late, one leaves early
    (a hole in the span of busy slots), all run past block_size (window restarts). Each slot's
    logits before each of its ids and after the last."""
    prompt_lengths = {0: 1, 1: 5, 2: 11, 3: block + 3}  # slot 3's prompt is cropped to its end
    joins = {0: 0, 1: 0, 2: 7, 3: 0}  # step at which each slot starts
    steps = 3 * block
    leaves = {1: 20}  # slot 1 is freed after 20 ids
    prompts = {s: random_ids(n, seed=s) for s, n in prompt_lengths.items()}
    continuations = {s: random_ids(steps, seed=10 + s) for s in prompts}
    decoder = SlotDecoder(model, slots=5, deterministic=deterministic)  # slot 4 stays idle
    seen: dict[int, list[torch.Tensor]] = {s: [] for s in prompts}
    for step in range(steps + 1):
        for slot, join in joins.items():
            if step == join:
                decoder.start(slot, prompts[slot])
                seen[slot].append(decoder.logits([slot])[0])
        next_ids = {
            slot: continuations[slot][step - join]
            for slot, join in joins.items()
            if join <= step < min(steps, leaves.get(slot, steps) + join)
        }
        for slot in leaves:
            if step == leaves[slot] + joins[slot]:
                decoder.free(slot)
        decoder.append(next_ids)
        for slot in next_ids:
            seen[slot].append(decoder.logits([slot])[0])
    return {slot: (prompts[slot], continuations[slot], logits) for slot, logits in seen.items()}


@pytest.mark.parametrize("deterministic", [False, True])
@torch.inference_mode()
def test_every_slot_equals_its_own_single_sequence_decode(deterministic):
    model = tiny_gpt()
    for prompt, continuation, logits in mixed_schedule(model, BLOCK, deterministic).values():
        n = len(logits) - 1
        expected = single_sequence_logits(model, prompt, continuation[:n])
        assert n > BLOCK  # every slot ran past block_size
        torch.testing.assert_close(torch.stack(logits), torch.stack(expected), atol=1e-5, rtol=0)


def gpt_of_block(block: int) -> GPTLanguageModel:
    """A small GPT whose block holds several key buckets."""
    config = ModelConfig(block_size=block, n_embd=32, n_head=4, n_layer=2, dropout=0.0)
    torch.manual_seed(0)
    return GPTLanguageModel(config, TOKENIZER.vocab_size).eval()


@torch.inference_mode()
def test_the_lean_step_gives_the_fixed_shape_steps_logits():
    """Busy slots only, over keys in buckets: the same numbers as all slots over all keys."""
    block = 3 * KEY_BUCKET
    model = gpt_of_block(block)
    lean, fixed = (mixed_schedule(model, block, deterministic=d) for d in (False, True))
    for slot, (_, _, logits) in lean.items():
        torch.testing.assert_close(
            torch.stack(logits), torch.stack(fixed[slot][2]), atol=1e-5, rtol=0
        )


@torch.inference_mode()
def test_masked_steps_run_few_shapes_that_cover_every_stepping_key():
    block, slots = 4 * KEY_BUCKET, 4
    decoder = SlotDecoder(gpt_of_block(block), slots=slots)
    shapes = set()
    step_shape = decoder.step_shape

    def checked_step_shape(next_ids: dict[int, int]) -> tuple[slice, int]:
        rows, keys = step_shape(next_ids)
        busy = range(min(next_ids), max(next_ids) + 1)
        assert (rows.start, rows.stop) == (busy.start, busy.stop)  # no slot outside runs
        longest = max(decoder.lengths[slot] for slot in next_ids)  # the last new position
        assert longest < keys <= longest + KEY_BUCKET and keys % KEY_BUCKET == 0
        shapes.add((len(busy), keys))
        return rows, keys

    decoder.step_shape = checked_step_shape  # type: ignore[method-assign]
    decoder.start(0, random_ids(1, seed=0))
    for slot in range(1, slots):  # two sequences, then three, four, at different lengths
        decoder.start(slot, random_ids(1 + 9 * slot, seed=slot))
        for step in range(block + KEY_BUCKET):
            decoder.append({s: (step + s) % TOKENIZER.vocab_size for s in range(slot + 1)})
    assert {keys for _, keys in shapes} == set(range(KEY_BUCKET, block + 1, KEY_BUCKET))
    assert len(shapes) <= slots * block // KEY_BUCKET  # at most a bucket per number of rows


@pytest.mark.parametrize("batch", [1, 3])
@torch.inference_mode()
def test_rows_at_one_position_take_the_lean_step_of_a_kv_cache_bit_for_bit(batch):
    """A batch of samples (or one sequence) in slots 0..B-1: the prefill of all rows at once
    and `GPTLanguageModel.step` on one `KVCache` per block, as a hand-written loop runs them
    (what `chargpt sample` computed before the decoder interface), bit for bit."""
    model = tiny_gpt()
    ids = torch.randint(
        TOKENIZER.vocab_size, (batch, BLOCK), generator=torch.Generator().manual_seed(batch)
    )
    caches = [KVCache(BLOCK) for _ in model.blocks]
    expected = [model.logits(ids[:, :3], caches)[:, -1]]
    expected += [model.step(ids[:, t : t + 1], caches) for t in range(3, BLOCK)]
    decoder = make_decoder(model, ids[:, :3])
    got = [decoder.logits]
    for t in range(3, BLOCK):
        decoder.append(ids[:, t : t + 1])
        got.append(decoder.logits)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("kernels", [None, ROW_INDEPENDENT])
@torch.inference_mode()
def test_deterministic_slots_logits_do_not_depend_on_the_other_slots_bit_for_bit(kernels):
    """In fp32, and in int8 on the kernels that `chargpt serve --deterministic` keeps to (with
    fbgemm's one input range for all rows of a product, a slot would depend on the others)."""
    model = tiny_gpt() if kernels is None else quantized(tiny_gpt(), "int8", kernels)
    prompt, continuation = random_ids(4, seed=1), random_ids(2 * BLOCK, seed=2)

    def run(neighbours: dict[int, list[int]]) -> torch.Tensor:
        decoder = SlotDecoder(model, slots=4, deterministic=True)
        for slot, ids in neighbours.items():
            decoder.start(slot, ids)
        decoder.start(0, prompt)
        rows = [decoder.logits([0])[0]]
        for step, token in enumerate(continuation):
            others = {slot: (step * slot) % TOKENIZER.vocab_size for slot in neighbours}
            decoder.append({0: token, **others})
            rows.append(decoder.logits([0])[0])
        return torch.stack(rows)

    alone = run({})
    crowded = run({1: random_ids(9, seed=3), 2: random_ids(BLOCK, seed=4), 3: [5]})
    assert torch.equal(alone, crowded)


def test_the_lab_reference_heads_have_no_slot_decoder():
    with pytest.raises(ValueError, match="fused attention"):
        SlotDecoder(tiny_gpt("reference"), slots=2)
