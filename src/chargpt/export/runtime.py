"""Running an exported graph (chargpt.export.onnx_graph) in onnxruntime: sampling with the same
controls, window rule and random draws as `chargpt.generation.generate.stream`, and scoring
through the `LanguageModel` interface (`chargpt eval --backend onnxruntime`).

    model = OnnxModel("model.onnx")
    for piece in onnx_stream(model, "ROMEO:", max_new_tokens=200, temperature=0):
        print(piece.text, end="")

The logits come from onnxruntime, through the same decoder interface as PyTorch's
(`OnnxDecoder`: the same window rule); the choice of each character is `sample_next`'s, with
one torch.Generator per sample seeded `seed + i` as in PyTorch, so greedy text is the same text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from chargpt.config import ModelConfig, SampleConfig, from_dict
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.export.onnx_graph import CONFIG_KEY, FORMAT, FORMAT_KEY, VOCAB_KEY
from chargpt.generation.decoders import Decoder, Rows, Window
from chargpt.generation.generate import (
    TextPiece,
    decode_steps,
    encode_prompt,
    resolve_seed,
    sample_config,
    text_pieces,
)
from chargpt.generation.sampling import Controls
from chargpt.generation.speed import Job, Work, sampled
from chargpt.model.base import LanguageModel
from chargpt.model.timing import fastest_seconds

Pasts = list[np.ndarray]  # past.{i}.key, past.{i}.value for each block i: (B, n_head, P, hs)


@dataclass(frozen=True)
class SessionSettings:
    """How an onnxruntime session runs on the CPU: `threads` intra-op threads (0: onnxruntime's
    default, one per physical core), and whether they `spin` between operators (a quicker
    start for the next operator, but busy cores for whatever else runs between two steps)."""

    threads: int
    spin: bool = True

    def options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", str(int(self.spin)))
        return options


# the choices timed when no thread count is given: which one wins depends on the cores, on the
# model's size and on what else the machine runs (threads that split a batch-1 step's small
# products can cost more than they save)
CANDIDATES = (SessionSettings(1), SessionSettings(0), SessionSettings(0, spin=False))


class OnnxModel:
    """An exported graph in an onnxruntime CPU session, with the model config and vocabulary
    its metadata carries. `threads`: onnxruntime's intra-op threads; 0: the fastest here of
    `CANDIDATES`, timed on `work` (what the caller will repeat) at start-up, in `settings`."""

    def __init__(self, path: str | Path, threads: int = 0, work: Work | None = None):
        self.settings = SessionSettings(threads) if threads else CANDIDATES[0]
        self.session = open_session(path, self.settings)
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get(FORMAT_KEY) != FORMAT:
            raise ChargptError(
                f"{path} is not a chargpt export ({FORMAT_KEY} is {meta.get(FORMAT_KEY)!r}, "
                f"not {FORMAT!r}): export it again with this chargpt"
            )
        self.config = from_dict(ModelConfig, json.loads(meta[CONFIG_KEY]))
        self.tokenizer = CharTokenizer.from_dict(json.loads(meta[VOCAB_KEY]))
        self.past_names = [i.name for i in self.session.get_inputs()[1:]]
        self.block_size = self.config.block_size
        if not threads:
            self.choose_session(path, work or Work())

    def choose_session(self, path: str | Path, work: Work) -> None:
        """Keep the session of the `CANDIDATES` that runs `work` fastest (a few tenths of a
        second at the lab's size, sessions included)."""
        sessions = {self.settings: self.session}
        sessions |= {settings: open_session(path, settings) for settings in CANDIDATES[1:]}
        jobs = {settings: self.job(work, session) for settings, session in sessions.items()}
        seconds = fastest_seconds(jobs, repeats=5, threads=None)
        self.settings = min(seconds, key=seconds.__getitem__)
        self.session = sessions[self.settings]

    def job(self, work: Work, session: ort.InferenceSession | None = None) -> Job:
        """`work` once in `session` (this model's by default), as `chargpt.generation.speed`
        times it for PyTorch: a step after half a block of positions (zeros) and the draw of
        the next ids, or a scoring window."""
        session = session or self.session
        ids = np.zeros((work.rows, work.length(self.block_size)), np.int64)
        pasts = self.empty_pasts(work.rows, work.past(self.block_size))
        feed = {"ids": ids, **dict(zip(self.past_names, pasts, strict=True))}
        if work.scoring:
            return lambda: session.run(None, feed)
        return sampled(work, lambda: torch.from_numpy(session.run(None, feed)[0][:, -1]))

    def empty_pasts(self, batch: int, positions: int = 0) -> Pasts:
        """Zero pasts of `positions` positions (none: the pasts of a prefill)."""
        c = self.config
        shape = (batch, c.n_head, positions, c.n_embd // c.n_head)
        return [np.zeros(shape, np.float32) for _ in self.past_names]

    def run(self, ids: np.ndarray, pasts: Pasts) -> tuple[np.ndarray, Pasts]:
        """(B, T) ids after the positions in `pasts` -> (B, T, V) logits and the presents."""
        feed = dict(zip(self.past_names, pasts, strict=True))
        feed["ids"] = ids.astype(np.int64, copy=False)
        logits, *presents = self.session.run(None, feed)
        return logits, presents


def open_session(path: str | Path, settings: SessionSettings) -> ort.InferenceSession:
    """`path` in an onnxruntime CPU session; a file that is not a model is a one-line error."""
    try:
        return ort.InferenceSession(
            str(path), settings.options(), providers=["CPUExecutionProvider"]
        )
    except Exception as err:  # onnxruntime raises its own exception types, unexported
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ChargptError(
            f"cannot load {path} as an ONNX model ({first}): make it with chargpt export"
        ) from None


class OnnxDecoder(Decoder):
    """The `Decoder` interface over an `OnnxModel`: a prompt is read once (a prefill), then one
    position per new character with the presents fed back as pasts, and past block_size the
    same `Window` rule as PyTorch's (the same logits). The graph takes one past length for all
    the rows of a run, so slots keep their pasts in runs of consecutive slots at one length
    (those prefilled together, stepping together); a run splits where its slots part."""

    def __init__(self, model: OnnxModel, slots: int, window_keep: float = 0.5, exact: bool = False):
        window = Window.of(model.block_size, window_keep)
        vocab = model.tokenizer.vocab_size
        super().__init__(slots, window, vocab, torch.device("cpu"), exact)
        self.model = model
        self.pasts: dict[range, Pasts] = {}  # a run of slots -> its pasts, (len(run), ...)

    def prefill(self, slots: list[int]) -> None:
        self.detach(slots)
        run = range(slots[0], slots[-1] + 1)
        idx = np.array([self.ids[slot] for slot in slots])  # (R, T)
        logits, self.pasts[run] = self.model.run(idx, self.model.empty_pasts(len(slots)))
        self.set_logits(slots, torch.from_numpy(logits[:, -1]))
        for slot in slots:
            self.lengths[slot] = idx.shape[1]

    def recompute(self, slots: list[int]) -> None:
        idx = np.array([self.ids[slot] for slot in slots])  # (R, block_size), no pasts
        logits, _ = self.model.run(idx, self.model.empty_pasts(len(slots)))
        self.set_logits(slots, torch.from_numpy(logits[:, -1]))

    def step(self, next_ids: dict[int, int]) -> None:
        for run in [run for run in self.pasts if any(s in next_ids for s in run)]:
            if not all(slot in next_ids for slot in run):
                self.split(run)
        for run in [run for run in self.pasts if run[0] in next_ids]:
            ids = np.array([[next_ids[slot] for slot in run]]).T  # (R, 1)
            logits, self.pasts[run] = self.model.run(ids, self.pasts[run])
            self.set_logits(run, torch.from_numpy(logits[:, -1]))
            for slot in run:
                self.lengths[slot] += 1

    def free(self, slot: int) -> None:
        self.detach([slot])
        super().free(slot)

    def split(self, run: range) -> None:
        """Give each slot of `run` its own pasts."""
        pasts = self.pasts.pop(run)
        for i, slot in enumerate(run):
            self.pasts[range(slot, slot + 1)] = [past[i : i + 1] for past in pasts]

    def detach(self, slots: list[int]) -> None:
        """Forget the pasts of `slots` (their runs' other slots keep theirs)."""
        for run in [run for run in self.pasts if any(slot in run for slot in slots)]:
            self.split(run)
        for slot in slots:
            self.pasts.pop(range(slot, slot + 1), None)


def check_fp32(quantize: str, dtype: str = "auto") -> None:
    """The graph is fp32: asking for int8 or bf16 is a mistake, not something to ignore."""
    if quantize != "none" or dtype == "bf16":
        raise ChargptError(
            "the onnxruntime backend runs the fp32 graph: drop --quantize and --dtype bf16"
        )


def onnx_stream(
    model: OnnxModel, prompt: str = "", config: SampleConfig | None = None, **controls: Any
) -> Iterator[TextPiece]:
    """`chargpt.generation.generate.stream` on onnxruntime: the same controls (SampleConfig
    fields), the same seeds, stop strings and window rule. fp32 only: no quantize, no bf16."""
    config = sample_config(config, **controls)
    check_fp32(config.quantize, config.dtype)
    tokenizer = model.tokenizer
    ids = encode_prompt(tokenizer, prompt, config.on_unknown)
    idx = torch.tensor([ids] * config.num_samples)  # (num_samples, T)
    seed = resolve_seed(config.seed)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(config.num_samples)]
    # no KV cache in PyTorch re-reads the last block_size ids for each character: exact mode
    exact = config.long_context == "exact" or not config.kv_cache

    def steps() -> Iterator[torch.Tensor]:
        if not config.max_new_tokens:
            return
        decoder = OnnxDecoder(model, config.num_samples, config.window_keep, exact)
        rows = Rows(decoder, idx)  # reads the prompt once
        controls = Controls(config.temperature, config.top_k, config.top_p)
        yield from decode_steps(rows, config.max_new_tokens, controls, generators)

    yield from text_pieces(steps(), tokenizer, config)


def onnx_generate(
    model: OnnxModel, prompt: str = "", config: SampleConfig | None = None, **controls: Any
) -> list[str]:
    """The new text of each of the `num_samples` samples (prompt not included)."""
    config = sample_config(config, **controls)
    texts = [""] * config.num_samples
    for piece in onnx_stream(model, prompt, config):
        texts[piece.sample] += piece.text
    return texts


class OnnxLanguageModel(LanguageModel):
    """An `OnnxModel` behind the `LanguageModel` interface, for scoring (`chargpt eval`): each
    window is one prefill from position 0. CPU tensors in and out; no parameters of its own."""

    def __init__(self, model: OnnxModel):
        super().__init__()
        self.onnx = model
        self.context_length = model.block_size
        self.vocab_size = model.tokenizer.vocab_size

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        ids = idx.cpu().numpy()
        logits, _ = self.onnx.run(ids, self.onnx.empty_pasts(len(ids)))
        return torch.from_numpy(logits).to(idx.device)  # (B, T, V)
