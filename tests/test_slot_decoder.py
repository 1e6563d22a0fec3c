"""Batched decoding with per-sequence positions (`SlotDecoder`, what `chargpt serve` runs): each
slot computes what a single-sequence `CachedDecoder` computes, and its numbers do not depend on
what the other slots hold."""

from __future__ import annotations

import pytest
import torch
from model_support import BLOCK, TOKENIZER, tiny_gpt

from chargpt.generation.decoders import SlotDecoder, make_decoder

pytestmark = pytest.mark.usefixtures("one_thread")


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(
        TOKENIZER.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


def single_sequence_logits(model, prompt: list[int], continuation: list[int]) -> list[torch.Tensor]:
    """The next-token logits a batch-of-one CachedDecoder (`chargpt sample`) gives before each id
    of `continuation` and after the last, in window mode with window_keep 0.5."""
    decoder = make_decoder(model, torch.tensor([prompt]), long_context="window", window_keep=0.5)
    out = [decoder.logits[0]]
    for token in continuation:
        decoder.append(torch.tensor([[token]]))
        out.append(decoder.logits[0])
    return out


@torch.inference_mode()
def test_every_slot_equals_its_own_single_sequence_decode():
    """Four sequences at different positions share the steps; one joins late, one leaves early,
    all run past block_size (window restarts), and each row matches decoding it alone."""
    model = tiny_gpt()
    prompt_lengths = {0: 1, 1: 5, 2: 11, 3: BLOCK + 3}  # slot 3's prompt is cropped to its end
    joins = {0: 0, 1: 0, 2: 7, 3: 0}  # step at which each slot starts
    steps = 3 * BLOCK
    leaves = {1: 20}  # slot 1 is freed after 20 ids
    prompts = {s: random_ids(n, seed=s) for s, n in prompt_lengths.items()}
    continuations = {s: random_ids(steps, seed=10 + s) for s in prompts}
    decoder = SlotDecoder(model, slots=5)  # slot 4 stays idle
    seen: dict[int, list[torch.Tensor]] = {s: [] for s in prompts}
    for step in range(steps + 1):
        for slot, join in joins.items():
            if step == join:
                decoder.start(slot, prompts[slot])
                seen[slot].append(decoder.logits[slot].clone())
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
            seen[slot].append(decoder.logits[slot].clone())
    for slot, logits in seen.items():
        n = len(logits) - 1
        expected = single_sequence_logits(model, prompts[slot], continuations[slot][:n])
        assert n > BLOCK  # every slot ran past block_size
        torch.testing.assert_close(torch.stack(logits), torch.stack(expected), atol=1e-5, rtol=0)


@torch.inference_mode()
def test_a_slots_logits_do_not_depend_on_the_other_slots_bit_for_bit():
    model = tiny_gpt()
    prompt, continuation = random_ids(4, seed=1), random_ids(2 * BLOCK, seed=2)

    def run(neighbours: dict[int, list[int]]) -> torch.Tensor:
        decoder = SlotDecoder(model, slots=4)
        for slot, ids in neighbours.items():
            decoder.start(slot, ids)
        decoder.start(0, prompt)
        rows = [decoder.logits[0].clone()]
        for step, token in enumerate(continuation):
            others = {slot: (step * slot) % TOKENIZER.vocab_size for slot in neighbours}
            decoder.append({0: token, **others})
            rows.append(decoder.logits[0].clone())
        return torch.stack(rows)

    alone = run({})
    crowded = run({1: random_ids(9, seed=3), 2: random_ids(BLOCK, seed=4), 3: [5]})
    assert torch.equal(alone, crowded)


def test_the_lab_reference_heads_have_no_slot_decoder():
    with pytest.raises(ValueError, match="fused attention"):
        SlotDecoder(tiny_gpt("reference"), slots=2)
