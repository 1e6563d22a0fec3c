"""The pieces the recipe options swap into the lab's GPT: norms, activations, rotary positions.

Each option's default is the lab's choice, so the `lab` preset builds the notebook's model.
"""

from __future__ import annotations

import torch
from torch import nn

# (cos, sin) of the rotary angles of each position: (T, hs / 2), or (B, T, hs / 2) per row
RotaryAngles = tuple[torch.Tensor, torch.Tensor]


def make_norm(kind: str, dim: int) -> nn.Module:
    """LayerNorm (the lab's) or RMSNorm (no mean subtraction, no bias) over the last `dim`."""
    return nn.RMSNorm(dim) if kind == "rmsnorm" else nn.LayerNorm(dim)


class ReLUSquared(nn.Module):
    """relu(x)^2: sparse like ReLU, smooth at its kink (Primer, So et al. 2021)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


def make_activation(kind: str) -> nn.Module:
    """The feed-forward nonlinearity: relu (the lab's), relu2 or gelu."""
    return {"relu": nn.ReLU, "relu2": ReLUSquared, "gelu": nn.GELU}[kind]()


class Rotary(nn.Module):
    """Rotary position embeddings (RoPE, Su et al. 2021): each pair of a head's query and key
    features is rotated by an angle proportional to the position, so q·k depends on the
    positions only through their difference. No parameters: nothing in the state dict."""

    def __init__(self, head_size: int, block_size: int, base: float = 10000.0):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)  # (block_size, hs / 2)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, pos: torch.Tensor) -> RotaryAngles:
        """(T,) or (B, T) positions -> their (cos, sin), (T, hs / 2) or (B, T, hs / 2)."""
        return self.cos[pos], self.sin[pos]


def rotate(x: torch.Tensor, angles: RotaryAngles) -> torch.Tensor:
    """Rotate (B, n_head, T, hs) queries or keys: feature i pairs with feature i + hs / 2."""
    cos, sin = (a.to(x.dtype).unsqueeze(-3) for a in angles)  # broadcast over the heads
    x1, x2 = x.chunk(2, dim=-1)  # (B, n_head, T, hs / 2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
