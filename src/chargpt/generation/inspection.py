"""See the model think: next-character probabilities and every head's attention weights.

    run = load_run("runs/shakespeare")
    seen = inspect_text(run.model, run.tokenizer, "ROMEO: I")
    seen.top(7)                    # [(character, probability), ...]: what may follow "ROMEO: I"
    wei = seen.attention[0, 2]     # (T, T): layer 0, head 2, the lab's `wei`

The weights are the lab's `wei` (part d): softmax(q kᵀ / sqrt(head_size)) with the future masked
out, after the softmax and before dropout, so each row sums to one. Each block reports its own
(`DecoderBlock(x, return_weights=True)`, on either attention path) while the model runs one block
at a time; the model's normal forward pass (the fused kernel) does not compute them.

`Inspection.to_dict` packs each head's weights for JSON (`/v1/inspect`): its lower triangle, row
after row (row t: how position t weighs positions 0..t, t + 1 weights; T(T + 1)/2 in all, none of
the zeros above the diagonal), as little-endian float16 (2 bytes a weight, within 2**-12 of the
weight), base64-encoded.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.generation.generate import encode_prompt
from chargpt.model import DecoderBlock, GPTLanguageModel, LanguageModel, eval_mode
from chargpt.model.layers import RotaryAngles

NO_ATTENTION = "a bigram model has no attention: each prediction reads only the character before"


@dataclass
class Inspection:
    """What the model computes for one text, position by position."""

    chars: list[str]  # the T characters read
    attention: torch.Tensor  # (n_layer, n_head, T, T): row t is how position t weighs 0..t
    probs: torch.Tensor  # (T, V): probability of each next character after position t
    vocab: list[str]  # the V characters, in the order of probs' columns
    top_k: int = 10  # how many candidates `top` and `to_dict` list by default

    @property
    def n_layer(self) -> int:
        return self.attention.shape[0]

    @property
    def n_head(self) -> int:
        return self.attention.shape[1]

    @property
    def note(self) -> str | None:
        """Why there are no attention weights, when there are none."""
        return NO_ATTENTION if self.n_layer == 0 else None

    def top(self, position: int, k: int | None = None) -> list[tuple[str, float]]:
        """The k likeliest characters to follow `position`, with their probabilities."""
        probs, ids = self.probs[position].topk(min(k or self.top_k, len(self.vocab)))
        return [(self.vocab[i], p) for p, i in zip(probs.tolist(), ids.tolist(), strict=True)]

    def to_dict(self, decimals: int = 4) -> dict[str, Any]:
        """Plain JSON: each head's weights packed (`packed_triangles`), probabilities and
        natural-log probabilities rounded to `decimals` places."""
        logprobs = self.probs.double().clamp_min(1e-30).log()
        return {
            "chars": self.chars,
            "vocab": self.vocab,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "note": self.note,
            "top": [
                [{"char": c, "prob": round(p, decimals)} for c, p in self.top(t)]
                for t in range(len(self.chars))
            ],
            "logprobs": rounded(logprobs, decimals),
            "attention": packed_triangles(self.attention),
        }


def rounded(values: torch.Tensor, decimals: int) -> list:
    """Nested lists of floats that print with at most `decimals` decimal places."""
    scale = 10.0**decimals
    return (values.double() * scale).round().div(scale).tolist()


def packed_triangles(attention: torch.Tensor) -> list[list[str]]:
    """(n_layer, n_head, T, T) weights -> [layer][head]: that head's lower triangle, row after
    row, as little-endian float16 in base64 (the module's docstring). Tensor and byte operations
    only: no Python loop over the weights."""
    T = attention.shape[-1]
    rows, keys = torch.tril_indices(T, T)  # row-major: (0, 0), (1, 0), (1, 1), (2, 0), ...
    halves = attention[..., rows, keys].to(torch.float16).numpy().astype("<f2")  # (L, H, N)
    return [
        [base64.b64encode(head.tobytes()).decode("ascii") for head in layer] for layer in halves
    ]


def attention_size(model: LanguageModel, length: int) -> int:
    """How many weights an inspection of `length` characters returns: n_layer x n_head x
    T(T + 1)/2, each head's triangle (a bigram has none)."""
    if not isinstance(model, GPTLanguageModel):
        return 0
    return model.config.n_layer * model.config.n_head * length * (length + 1) // 2


def inspect_text(
    model: LanguageModel,
    tokenizer: CharTokenizer,
    text: str,
    top_k: int = 10,
    on_unknown: str = "error",
) -> Inspection:
    """Run `model` on `text` (at most its block_size characters; empty reads a newline, as in
    sampling) and keep its next-character probabilities and attention weights, on the CPU.
    Characters the model never saw are an error, or dropped with `on_unknown="skip"`."""
    if top_k < 1:
        raise ChargptError(f"top_k must be at least 1, got {top_k}")
    ids = encode_prompt(tokenizer, text, on_unknown)
    limit = max_text_length(model)
    if limit is not None and len(ids) > limit:
        raise ChargptError(
            f"the text has {len(ids)} characters but the model reads at most {limit}: "
            f"pass the last {limit}"
        )
    device = next(model.parameters()).device
    idx = torch.tensor([ids], device=device)  # (1, T)
    with eval_mode(model):  # the weights before dropout: dropout is off in eval mode
        logits, attention = logits_and_attention(model, idx)
    return Inspection(
        chars=[tokenizer.itos[i] for i in ids],
        attention=attention[:, :, 0].float().cpu(),  # (n_layer, n_head, T, T)
        probs=F.softmax(logits[0].float(), dim=-1).cpu(),  # (T, V)
        vocab=list(tokenizer.chars),
        top_k=top_k,
    )


def max_text_length(model: LanguageModel) -> int | None:
    """The most characters `inspect_text` reads at once: a GPT's block_size (it has a position
    embedding for each); a bigram reads each character alone, so any number."""
    return model.config.block_size if isinstance(model, GPTLanguageModel) else None


@torch.inference_mode()
def logits_and_attention(
    model: LanguageModel, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids -> (B, T, V) logits and (n_layer, n_head, B, T, T) attention weights. A GPT is
    run by `GPTLanguageModel.run_blocks`, as `logits` runs it, each block reporting its own
    weights (`return_weights`); a bigram has none (n_layer 0)."""
    B, T = idx.shape
    if not isinstance(model, GPTLanguageModel):
        return model.logits(idx), torch.zeros(0, 0, B, T, T)
    layers = []

    def run_and_watch(
        _i: int, block: DecoderBlock, x: torch.Tensor, rope: RotaryAngles | None
    ) -> torch.Tensor:
        x, wei = block(x, rope=rope, return_weights=True)  # (B, T, C), (B, n_head, T, T)
        layers.append(wei)
        return x

    logits = model.run_blocks(idx, torch.arange(T, device=idx.device), run_and_watch)
    return logits, torch.stack(layers).transpose(1, 2)  # (B, T, V), (n_layer, n_head, B, T, T)
