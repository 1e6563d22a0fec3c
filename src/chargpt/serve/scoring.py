"""Log-probabilities for OpenAI's `logprobs`: of each chosen character and of the likeliest ones.

A prompt is scored as `chargpt eval` scores text: its full pass with the default stride
(context_length // 2), so every character is predicted from at least half a block of the text
before it, and a prompt of up to context_length + 1 characters from all of it. The windows are
run a few at a time, so that a long prompt never stalls the characters of everyone else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from chargpt.eval.evaluate import full_pass_windows
from chargpt.model import LanguageModel


@dataclass(frozen=True)
class TokenLogprob:
    """One character of a choice's text, with what OpenAI's `logprobs` says about it."""

    token: str
    logprob: float | None  # None for a prompt's first character: nothing predicts it
    top: dict[str, float] | None  # the likeliest characters and the chosen one
    offset: int  # where it starts, counted from the start of the prompt


def token_logprobs(
    log_probs: torch.Tensor,
    chosen: list[int],
    top: int,
    itos: dict[int, str],
    first_offset: int,
) -> list[TokenLogprob]:
    """Entries for the (R, V) log-probabilities of R consecutive characters, `chosen` ids."""
    values, ids = log_probs.topk(min(top, log_probs.shape[-1]), dim=-1)  # (R, top)
    chosen_logprobs = log_probs.gather(1, torch.tensor(chosen, device=log_probs.device)[:, None])
    entries = []
    rows = zip(chosen, chosen_logprobs[:, 0].tolist(), ids.tolist(), values.tolist(), strict=True)
    for i, (token, logprob, top_ids, top_values) in enumerate(rows):
        likeliest = {itos[t]: v for t, v in zip(top_ids, top_values, strict=True)}
        likeliest.setdefault(itos[token], logprob)  # OpenAI: up to logprobs + 1 entries
        entries.append(TokenLogprob(itos[token], logprob, likeliest, first_offset + i))
    return entries


class PromptScore:
    """The log-probability of every character of one prompt given the ones before it."""

    def __init__(self, ids: list[int], context_length: int, top: int, itos: dict[int, str]):
        self.ids, self.top, self.itos = ids, top, itos
        self.entries = [TokenLogprob(itos[ids[0]], None, None, 0)]
        self.window = min(context_length, len(ids) - 1)  # input positions per window
        self.starts: list[int] = []
        self.first_scored: list[int] = []
        if len(ids) > 1:
            stride = max(1, context_length // 2)
            starts, first_scored = full_pass_windows(len(ids), context_length, 1, stride)
            self.starts, self.first_scored = starts.tolist(), first_scored.tolist()
        self.next = 0  # the first window not run yet

    @property
    def done(self) -> bool:
        return self.next >= len(self.starts)

    def run(self, model: LanguageModel, budget: int) -> int:
        """Run the next windows, about `budget` positions (at least one window); return how many
        positions ran."""
        count = max(1, budget // self.window)
        starts = self.starts[self.next : self.next + count]
        first_scored = self.first_scored[self.next : self.next + count]
        device = next(model.parameters()).device
        windows = torch.tensor([self.ids[s : s + self.window] for s in starts], device=device)
        log_probs = F.log_softmax(model.logits(windows).float(), dim=-1)  # (B, window, V)
        for w, (start, first) in enumerate(zip(starts, first_scored, strict=True)):
            # input position j predicts the character at start + j + 1
            targets = self.ids[start + first + 1 : start + self.window + 1]
            self.entries += token_logprobs(
                log_probs[w, first:], targets, self.top, self.itos, start + first + 1
            )
        self.next += len(starts)
        return len(starts) * self.window
