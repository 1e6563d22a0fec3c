"""Why attention divides q . k by sqrt(d_k): the figures quoted in docs/lab_answers.md (part c).

For queries and keys with independent unit-variance entries, prints by width d_k: the variance of
q . k with and without the scaling, and, for 2000 queries each against the same 64 keys, the
softmax's mean entropy (uniform over 64 keys: 4.16 nats), its mean largest weight, and the share
of queries whose softmax Jacobian diag(p) - p p^T has Frobenius norm below 0.01 (saturated: almost
no gradient reaches their scores). tests/test_lab_answers.py checks the same claims.

    python benchmarks/attention_scaling.py
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def softmax_stats(scores: torch.Tensor) -> tuple[float, float, float]:
    p = F.softmax(scores, dim=-1)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean().item()
    jacobian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    saturated = (torch.linalg.matrix_norm(jacobian) < 0.01).float().mean().item()
    return entropy, p.max(-1).values.mean().item(), saturated


def main() -> None:
    print(
        "| d_k | var(q.k) | var(q.k/sqrt(d_k)) | entropy raw / scaled | max weight raw / scaled "
        "| saturated raw / scaled |"
    )
    print("|--:|--:|--:|--:|--:|--:|")
    for d_k in (16, 64, 256, 1024):
        g = torch.Generator().manual_seed(0)
        pairs = (torch.randn(20000, d_k, generator=g) * torch.randn(20000, d_k, generator=g)).sum(
            -1
        )
        g = torch.Generator().manual_seed(0)
        scores = torch.randn(2000, d_k, generator=g) @ torch.randn(64, d_k, generator=g).T
        raw, scaled = softmax_stats(scores), softmax_stats(scores / math.sqrt(d_k))
        print(
            f"| {d_k} | {pairs.var():.1f} | {(pairs / math.sqrt(d_k)).var():.3f} | "
            f"{raw[0]:.2f} / {scaled[0]:.2f} | {raw[1]:.2f} / {scaled[1]:.2f} | "
            f"{raw[2]:.0%} / {scaled[2]:.0%} |"
        )


if __name__ == "__main__":
    main()
