"""Text generation from a trained model: prompts, sampling controls, stop strings, streaming.

    run = load_run("runs/shakespeare")
    for piece in stream(run.model, run.tokenizer, "ROMEO:", max_new_tokens=200, seed=1):
        print(piece.text, end="", flush=True)

    texts = generate(run.model, run.tokenizer, "ROMEO:", num_samples=4, temperature=0.8)

The controls are the fields of `SampleConfig` (one source of truth with `chargpt sample`). The
samples of a batch are generated together, each from its own random generator seeded with
`seed + i`, so sample i of a batch is the text a single sample with seed `seed + i` gives.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple

import torch

from chargpt.config import SampleConfig, from_dict
from chargpt.data.tokenizer import CharTokenizer, UnknownCharactersError
from chargpt.errors import ChargptError
from chargpt.generation.decoders import Rows, make_decoder
from chargpt.generation.sampling import Controls, Generators
from chargpt.model import LanguageModel, eval_mode
from chargpt.model.precision import autocast, forward_dtype
from chargpt.model.quantize import quantized


class TextPiece(NamedTuple):
    """New text of one sample, as it is produced."""

    sample: int  # which of the num_samples
    text: str


@torch.inference_mode()
def generate_steps(
    model: LanguageModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = 0,
    generator: Generators = None,
    top_p: float = 1.0,
    **decoding: Any,
) -> Iterator[torch.Tensor]:
    """Yield `max_new_tokens` sampled (B, 1) ids, on the CPU, that continue the (B, T) ids
    `idx`. `decoding` (kv_cache, long_context, window_keep, cuda_graphs) goes to
    `chargpt.generation.decoders.make_decoder`."""
    if max_new_tokens == 0:
        return
    rows = make_decoder(model, idx, **decoding)  # reads the prompts once
    yield from decode_steps(rows, max_new_tokens, Controls(temperature, top_k, top_p), generator)


def decode_steps(
    rows: Rows, max_new_tokens: int, controls: Controls, generator: Generators
) -> Iterator[torch.Tensor]:
    """Yield `max_new_tokens` (B, 1) ids drawn from `rows`, each copied to the CPU once (the
    text needs them there, and so does the decoder's window rule)."""
    for step in range(max_new_tokens):
        idx_next = rows.choose(controls, generator).cpu()  # (B, 1)
        yield idx_next
        if step + 1 < max_new_tokens:  # no forward pass for a token nobody will read
            rows.append(idx_next)


def generate_ids(
    model: LanguageModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = 0,
    generator: Generators = None,
    **options: Any,
) -> torch.Tensor:
    """The lab's `generate` with a KV cache and the sampling controls: extend (B, T) `idx` by
    `max_new_tokens` sampled ids; `options` are those of `generate_steps`. Returns
    (B, T + max_new_tokens), on idx's device."""
    steps = generate_steps(model, idx, max_new_tokens, temperature, top_k, generator, **options)
    return torch.cat([idx, *(ids.to(idx.device) for ids in steps)], dim=1)


def sample_config(config: SampleConfig | None = None, **controls: Any) -> SampleConfig:
    """`config` (default: SampleConfig()) with `controls` replaced, type- and range-checked.
    A single stop string may be given as a plain string."""
    if isinstance(controls.get("stop"), str):
        controls["stop"] = (controls["stop"],)
    values = {**dataclasses.asdict(config or SampleConfig()), **controls}
    config = from_dict(SampleConfig, values)
    config.validate()
    return config


def resolve_seed(seed: int) -> int:
    """The seed itself, or a fresh random one for -1 (so that it can be reported and reused)."""
    return secrets.randbelow(2**31) if seed == -1 else seed


def encode_prompt(tokenizer: CharTokenizer, prompt: str, on_unknown: str = "error") -> list[int]:
    """Prompt ids; unknown characters are an error listing them, or dropped with 'skip'. An empty
    prompt starts from a newline (the start of a line, the most neutral context)."""
    if on_unknown == "skip":
        prompt = "".join(ch for ch in prompt if ch in tokenizer.stoi)
    try:
        ids = tokenizer.encode(prompt)
    except UnknownCharactersError as err:
        raise ChargptError(
            f"the prompt has {err}: remove them, or drop them with --on-unknown skip"
        ) from None
    return ids or [tokenizer.stoi.get("\n", 0)]


class StopFilter:
    """Cuts one sample's text before the first stop string. It holds back any ending that might
    still grow into a stop string, so that no part of a stop string is ever emitted."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""  # received, not yet emitted
        self.done = False

    def feed(self, text: str) -> str:
        """Take new text; return what is now safe to emit."""
        self.pending += text
        hits = [self.pending.find(stop) for stop in self.stops if stop in self.pending]
        if hits:
            self.done = True
            emit, self.pending = self.pending[: min(hits)], ""
            return emit
        cut = len(self.pending) - self.partial_stop_length()
        emit, self.pending = self.pending[:cut], self.pending[cut:]
        return emit

    def partial_stop_length(self) -> int:
        """Length of the longest ending of `pending` that begins some stop string."""
        for n in range(len(self.pending), 0, -1):
            if any(stop.startswith(self.pending[-n:]) for stop in self.stops):
                return n
        return 0

    def flush(self) -> str:
        emit, self.pending = self.pending, ""
        return emit


def stream(
    model: LanguageModel,
    tokenizer: CharTokenizer,
    prompt: str = "",
    config: SampleConfig | None = None,
    **controls: Any,
) -> Iterator[TextPiece]:
    """Generate from `prompt`, yielding each sample's new text as soon as it is known. Controls
    are SampleConfig fields, as a `config`, keywords, or both. The model samples in eval mode (no
    dropout); a model in training mode is put back in it when the stream ends or is closed.
    `quantize="int8"` samples from an int8 copy of the model, made for this call (quantize once
    with `chargpt.model.quantize.quantized` to sample from it many times)."""
    config = sample_config(config, **controls)
    model = quantized(model, config.quantize)  # the caller's model itself unless quantize asks
    with eval_mode(model):
        yield from sample_pieces(model, tokenizer, prompt, config)


def sample_pieces(
    model: LanguageModel, tokenizer: CharTokenizer, prompt: str, config: SampleConfig
) -> Iterator[TextPiece]:
    """`stream`'s work, on a model already in eval mode."""
    device = next(model.parameters()).device
    ids = encode_prompt(tokenizer, prompt, config.on_unknown)
    idx = torch.tensor([ids] * config.num_samples, device=device)  # (num_samples, T)
    seed = resolve_seed(config.seed)
    generators = [
        torch.Generator(device=device).manual_seed(seed + i) for i in range(config.num_samples)
    ]
    steps = generate_steps(
        model,
        idx,
        config.max_new_tokens,
        config.temperature,
        config.top_k,
        generators,
        config.top_p,
        kv_cache=config.kv_cache,
        long_context=config.long_context,
        window_keep=config.window_keep,
    )
    dtype = forward_dtype(model, config.dtype, device)
    # autocast entered per step: the caller's code between pieces runs unaffected
    yield from text_pieces(steps, tokenizer, config, lambda: autocast(device, dtype))


def text_pieces(
    steps: Iterator[torch.Tensor],
    tokenizer: CharTokenizer,
    config: SampleConfig,
    each_step: Callable[[], AbstractContextManager] = nullcontext,
) -> Iterator[TextPiece]:
    """Each sample's new text from the (num_samples, 1) ids of `steps`, through its stop filter;
    once every sample has stopped, no further step is drawn (no more forward passes). Each
    step is drawn inside `each_step()` (autocast, for one)."""
    filters = [StopFilter(config.stop) for _ in range(config.num_samples)]
    while not all(f.done for f in filters):
        with each_step():
            idx_next = next(steps, None)  # (num_samples, 1)
        if idx_next is None:
            break
        for i, token in enumerate(idx_next[:, 0].tolist()):
            if not filters[i].done and (text := filters[i].feed(tokenizer.itos[token])):
                yield TextPiece(i, text)
    for i, stop_filter in enumerate(filters):
        if text := stop_filter.flush():
            yield TextPiece(i, text)


def generate(
    model: LanguageModel,
    tokenizer: CharTokenizer,
    prompt: str = "",
    config: SampleConfig | None = None,
    **controls: Any,
) -> list[str]:
    """The new text of each of the `num_samples` samples (prompt not included)."""
    config = sample_config(config, **controls)
    texts = [""] * config.num_samples
    for piece in stream(model, tokenizer, prompt, config):
        texts[piece.sample] += piece.text
    return texts
