"""The static-shape step that CUDA graphs capture, on the CPU: it runs the same math as the plain
step (same greedy ids, logits to fp32 rounding) through shapes that never change; without CUDA,
or when a capture fails, decoding falls back to the plain step with one line saying so; and the
seeded draws that it samples with on the device follow the filters and the distribution, row by
row reproducibly (sample i of a batch is a single sample with seed + i)."""

from __future__ import annotations

import logging

import pytest
import torch
from model_support import BLOCK, TOKENIZER, tiny_gpt

from chargpt.generation import graphs
from chargpt.generation.decoders import (
    GraphDecoder,
    Rows,
    SlotDecoder,
    graph_or_slot_decoder,
    make_decoder,
)
from chargpt.generation.generate import generate_ids
from chargpt.generation.graphs import spans_for
from chargpt.generation.sampling import (
    Controls,
    counter_uniforms,
    filter_logits,
    sample_next,
    sample_seeded,
)

pytestmark = pytest.mark.usefixtures("one_thread")
V = TOKENIZER.vocab_size


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_schedule(decoder: SlotDecoder, steps: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Three sequences at different positions, one joining late and one leaving early, run
    greedily past block_size: every slot's chosen ids and the busy slots' logits per step."""
    prompts = {0: random_ids(3, 0), 1: random_ids(BLOCK + 2, 1), 3: random_ids(9, 3)}
    chosen: list[list[int]] = []
    logits: list[torch.Tensor] = []
    busy = [0, 1]
    decoder.start(0, prompts[0])
    decoder.start(1, prompts[1])
    for step in range(steps):
        if step == 5:
            decoder.start(3, prompts[3])
            busy.append(3)
        if step == 2 * BLOCK:
            decoder.free(1)
            busy.remove(1)
        logits.append(decoder.logits(busy))
        ids = decoder.choose(busy, Controls(temperature=0), None)[:, 0].tolist()
        chosen.append(ids)
        decoder.append(dict(zip(busy, ids, strict=True)))
    return chosen, logits


@torch.inference_mode()
def test_the_static_step_gives_the_plain_steps_greedy_ids_and_logits():
    model = tiny_gpt()
    plain = greedy_schedule(SlotDecoder(model, slots=5), 3 * BLOCK)
    static = greedy_schedule(GraphDecoder(model, slots=5, capture=False), 3 * BLOCK)
    assert static[0] == plain[0]
    for a, b in zip(static[1], plain[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_the_static_step_runs_one_shape_per_span_whatever_the_positions(monkeypatch):
    """What a graph replays must not change shape: ids (span, 1) over all block_size keys."""
    model = tiny_gpt()
    decoder = GraphDecoder(model, slots=5, capture=False)
    shapes = set()
    step = model.step

    def recording(idx: torch.Tensor, caches) -> torch.Tensor:
        shapes.add(
            (tuple(idx.shape), caches[0].selected.keys, tuple(caches[0].selected.mask.shape))
        )
        return step(idx, caches)

    monkeypatch.setattr(model, "step", recording)
    addresses = decoder.static.inputs.data_ptr(), decoder.next_logits.data_ptr()
    greedy_schedule(decoder, 2 * BLOCK)
    assert (decoder.static.inputs.data_ptr(), decoder.next_logits.data_ptr()) == addresses
    spans = {idx[0] for idx, _, _ in shapes}
    assert spans <= set(spans_for(5, deterministic=False)) and len(spans) > 1
    assert shapes == {((span, 1), BLOCK, (span, 1, 1, BLOCK)) for span in spans}


def test_spans_are_powers_of_two_up_to_the_slots_or_all_slots_when_deterministic():
    assert spans_for(1, False) == [1]
    assert spans_for(5, False) == [1, 2, 4, 5]
    assert spans_for(16, False) == [1, 2, 4, 8, 16]
    assert spans_for(16, True) == [16]


def test_without_cuda_decoding_takes_the_plain_step_and_says_so_once(caplog):
    model = tiny_gpt()
    idx = torch.tensor([random_ids(4, 0)] * 2)
    with caplog.at_level(logging.WARNING, logger="chargpt.generation"):
        decoder = graph_or_slot_decoder(model, 2, cuda_graphs=True)
        asked = generate_ids(model, idx, 20, temperature=0, cuda_graphs=True)
    assert type(decoder) is SlotDecoder
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("need a CUDA device, not cpu" in line for line in lines)
    assert "\n" not in lines[0]
    assert asked.tolist() == generate_ids(model, idx, 20, temperature=0).tolist()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="chargpt.generation"):
        make_decoder(model, idx)  # on a CPU, by default: no graphs asked for, nothing said
    assert not caplog.records


def test_a_failing_capture_falls_back_to_the_plain_step_with_one_line(caplog, monkeypatch):
    def failing(run):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(graphs, "check_cuda", lambda device: None)
    monkeypatch.setattr(graphs, "capture_graph", failing)
    with caplog.at_level(logging.WARNING, logger="chargpt.generation"):
        decoder = graph_or_slot_decoder(tiny_gpt(), 4, cuda_graphs=True)
    assert type(decoder) is SlotDecoder
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == (
        "decoding without CUDA graphs (CUDA error: operation not permitted when stream is "
        "capturing): the plain step instead"
    )


# --- seeded draws (sample_seeded)


def test_seeded_uniforms_are_in_the_open_interval_and_depend_on_seed_count_and_token():
    seeds = torch.tensor([0, 1, 2**63 - 1, 2**40 + 7])
    u = counter_uniforms(seeds, torch.tensor([0, 0, 5, 2**33]), 1000)  # (4, 1000)
    assert u.shape == (4, 1000) and bool(((u > 0) & (u < 1)).all())
    assert len({tuple(row.tolist()) for row in u}) == 4
    assert abs(u.mean().item() - 0.5) < 0.02
    again = counter_uniforms(seeds[2:3], torch.tensor([5]), 1000)
    assert torch.equal(again[0], u[2])  # a row's numbers depend on its own seed and count
    assert not torch.equal(counter_uniforms(seeds[2:3], torch.tensor([6]), 1000)[0], u[2])


def test_seeded_draws_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    probs = logits.softmax(-1)[0]
    draws = 4000  # one seed's first 4,000 draws, as rows of one batch
    seeds, counts = torch.full((draws,), 3), torch.arange(draws)
    chosen = sample_seeded(logits.expand(draws, 5), 1.0, 0, 1.0, seeds, counts)[:, 0]
    frequencies = torch.bincount(chosen, minlength=5).float() / draws
    torch.testing.assert_close(frequencies, probs, atol=0.03, rtol=0)


@pytest.mark.parametrize("controls", [(1.0, 3, 1.0), (0.7, 0, 0.6), (1.3, 4, 0.8)])
def test_seeded_draws_stay_inside_the_filters(controls):
    temperature, top_k, top_p = controls
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(0))
    kept = filter_logits(logits / temperature, top_k, top_p).isfinite()  # (6, V)
    seeds = torch.arange(6)
    for count in range(50):
        ids = sample_seeded(logits, *controls, seeds, torch.full((6,), count))[:, 0]
        assert bool(kept[torch.arange(6), ids].all())


def test_greedy_seeded_draws_are_sample_nexts_greedy_ids():
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(1))
    greedy = sample_seeded(logits, 0.0, 0, 1.0, torch.arange(5), torch.zeros(5, dtype=torch.long))
    assert torch.equal(greedy, sample_next(logits, 0.0))


@torch.inference_mode()
def test_a_batch_of_seeded_samples_is_each_sample_alone_with_seed_plus_i():
    """On the graph path each slot draws with `sample_seeded`: its seed is its generator's, its
    count the ids it drew, so neither its neighbours nor the batch size change its text."""
    model = tiny_gpt()
    prompt = torch.tensor([random_ids(3, 5)])
    controls = Controls(temperature=1.2, top_k=6, top_p=0.95)

    def sample(batch: int, seed: int, steps: int = 2 * BLOCK) -> list[list[int]]:
        rows = Rows(GraphDecoder(model, slots=batch, capture=False), prompt.repeat(batch, 1))
        generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
        out = []
        for _ in range(steps):
            ids = rows.choose(controls, generators)
            out.append(ids[:, 0].tolist())
            rows.append(ids)
        return [list(row) for row in zip(*out, strict=True)]

    batch = sample(3, seed=10)
    assert batch == [sample(1, seed=10 + i)[0] for i in range(3)]
    assert len({tuple(row) for row in batch}) == 3
