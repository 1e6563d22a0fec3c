"""See the model think: next-character probabilities and every head's attention weights.

    run = load_run("runs/shakespeare")
    seen = inspect_text(run.model, run.tokenizer, "ROMEO: I")
    seen.top(7)                    # [(character, probability), ...]: what may follow "ROMEO: I"
    wei = seen.attention[0, 2]     # (T, T): layer 0, head 2, the lab's `wei`

The weights are the lab's `wei` (part d): softmax(q kᵀ / sqrt(head_size)) with the future masked
out, after the softmax and before dropout, so each row sums to one. They are computed here, from
each block's own query and key projections, while the model runs one block at a time; the
model's normal forward pass (the fused kernel) is untouched and stays as fast as ever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.generation.generate import encode_prompt
from chargpt.model import CausalSelfAttention, GPTLanguageModel, LanguageModel
from chargpt.model.layers import RotaryAngles, rotate

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
        """Plain JSON: attention rows cut to the preceding positions (row t has t + 1 weights),
        probabilities and natural-log probabilities rounded to `decimals` places."""
        logprobs = self.probs.double().clamp_min(1e-30).log()
        attention = rounded(self.attention, decimals)
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
            "attention": [
                [[row[: t + 1] for t, row in enumerate(head)] for head in layer]
                for layer in attention
            ],
        }


def rounded(values: torch.Tensor, decimals: int) -> list:
    """Nested lists of floats that print with at most `decimals` decimal places."""
    scale = 10.0**decimals
    return (values.double() * scale).round().div(scale).tolist()


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
    was_training = model.training  # a served model is in eval mode already: no write to it,
    if was_training:  # as another thread (the server's engine) may be running it
        model.eval()  # the weights before dropout: dropout is off in eval mode
    try:
        logits, attention = logits_and_attention(model, idx)
    finally:
        if was_training:
            model.train()
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
    run block by block, as `GPTLanguageModel.logits` does, taking each block's weights from the
    normalised input its attention reads; a bigram has none (n_layer 0)."""
    B, T = idx.shape
    if not isinstance(model, GPTLanguageModel):
        return model.logits(idx), torch.zeros(0, 0, B, T, T)
    x, rope = model.embed(idx, torch.arange(T, device=idx.device))  # (B, T, C)
    layers = []
    for block in model.blocks:
        layers.append(attention_weights(block.sa, block.ln1(x), rope))  # (n_head, B, T, T)
        x = block(x, rope=rope)  # (B, T, C)
    logits = model.lm_head(model.ln_f(x))  # (B, T, V)
    return logits, torch.stack(layers)


def attention_weights(
    sa: nn.Module, h: torch.Tensor, rope: RotaryAngles | None = None
) -> torch.Tensor:
    """Each head's `wei` for the block input `h` (B, T, C): (n_head, B, T, T). Works on both
    attention paths: the fused `qkv` matrix or the lab's `Head` modules, with the recipe's
    QK-norm and rotary positions (`rope`: the angles of the T positions) where the model has
    them."""
    if isinstance(sa, CausalSelfAttention):
        B, T, C = h.shape
        q, k, _ = sa.qkv(h).view(B, T, 3, sa.n_head, C // sa.n_head).permute(2, 3, 0, 1, 4)
    else:
        q = torch.stack([head.query(h) for head in sa.heads])  # (n_head, B, T, hs)
        k = torch.stack([head.key(h) for head in sa.heads])  # (n_head, B, T, hs)
    if sa.qk_norm:
        q, k = sa.q_norm(q), sa.k_norm(k)
    if rope is not None:
        q, k = rotate(q, rope), rotate(k, rope)
    return causal_softmax(q, k)  # q, k: (n_head, B, T, hs)


def causal_softmax(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(..., T, hs) queries and keys -> (..., T, T) weights: softmax(q kᵀ / sqrt(hs)) over the
    keys at or before each query."""
    T, hs = q.shape[-2:]
    scores = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (..., T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)
    return F.softmax(scores.float().masked_fill(future, float("-inf")), dim=-1)
