"""`chargpt attention`: a text's attention weights as heatmaps, every head or one head large.

Row t of a head's matrix is how position t (the query) spreads its attention over positions
0..t (the keys): the lab's `wei`. The future, which no position sees, is left blank. Colours are
viridis (readable in greyscale and with every common colour-vision deficiency), 0 to 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chargpt.errors import ChargptError
from chargpt.generation.inspection import Inspection
from chargpt.viz.plot import new_figure, save_figure

CELL = 2.0  # inches per head in the grid
SHOWN = {"\n": "↵", " ": "␣", "\t": "→"}  # characters that would print as nothing


def shown(char: str) -> str:
    """A visible stand-in for whitespace, the character itself otherwise."""
    return SHOWN.get(char, char)


def check_selection(seen: Inspection, layer: int | None, head: int | None) -> None:
    """One-line errors for a model without attention or a layer or head it does not have."""
    if seen.n_layer == 0:
        raise ChargptError(f"{seen.note}, so there is nothing to draw: pass a GPT run")
    for name, value, count in (("layer", layer, seen.n_layer), ("head", head, seen.n_head)):
        if value is not None and not 0 <= value < count:
            choices = "0" if count == 1 else f"0 to {count - 1}"
            raise ChargptError(
                f"--{name} {value} does not exist: the model has {count} {name}"
                f"{'s' if count > 1 else ''}: pass {choices}"
            )


def plot_attention(
    seen: Inspection, out: Path, layer: int | None = None, head: int | None = None
) -> Path:
    """Draw the heads that `layer` and `head` select (None: all) into the PNG `out`: one head
    large with its characters on both axes, several as a grid of layers (rows) x heads."""
    check_selection(seen, layer, head)
    layers = [layer] if layer is not None else list(range(seen.n_layer))
    heads = [head] if head is not None else list(range(seen.n_head))
    if len(layers) == 1 and len(heads) == 1:
        figure = draw_one_head(seen, layers[0], heads[0])
    else:
        figure = draw_grid(seen, layers, heads)
    out = Path(out)
    save_figure(figure, out)
    return out


def future_blank(seen: Inspection, layer: int, head: int) -> Any:
    """The head's (T, T) weights as a masked array: the future is masked, drawn as background."""
    import numpy as np

    weights = seen.attention[layer, head].numpy()
    return np.ma.masked_array(weights, mask=np.triu(np.ones_like(weights, dtype=bool), k=1))


def draw_heatmap(axes: Any, seen: Inspection, layer: int, head: int) -> Any:
    axes.set_facecolor("0.93")
    return axes.imshow(
        future_blank(seen, layer, head), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest"
    )


def draw_grid(seen: Inspection, layers: list[int], heads: list[int]) -> Any:
    """Small multiples: one row per layer, one column per head, one shared colour bar."""
    figure = new_figure(CELL * len(heads) + 1.0, CELL * len(layers) + 0.7)
    grid = figure.subplots(len(layers), len(heads), squeeze=False)
    for row, layer in enumerate(layers):
        for column, head in enumerate(heads):
            axes = grid[row][column]
            image = draw_heatmap(axes, seen, layer, head)
            axes.set_xticks([])
            axes.set_yticks([])
            axes.set_title(f"layer {layer}, head {head}", fontsize=9)
    figure.colorbar(image, ax=grid, shrink=0.8, label="attention weight")
    text = "".join(shown(c) for c in seen.chars)
    figure.suptitle(f"{text[:60]}{'…' if len(text) > 60 else ''}  (rows: query, columns: key)")
    return figure


def draw_one_head(seen: Inspection, layer: int, head: int) -> Any:
    """One head's full matrix, each row and column labelled with its character."""
    T = len(seen.chars)
    side = min(max(4.0 + 0.12 * T, 6.0), 24.0)
    figure = new_figure(side + 1.0, side)
    axes = figure.subplots()
    image = draw_heatmap(axes, seen, layer, head)
    labels = [shown(c) for c in seen.chars]
    cell = (side - 2.0) / T * 72  # points per row, roughly: the axes fill all but ~2 inches
    size = min(10.0, max(3.0, 0.75 * cell))
    axes.set_xticks(range(T), labels, fontsize=size)
    axes.set_yticks(range(T), labels, fontsize=size)
    axes.tick_params(length=0)
    axes.set_xlabel("key: the character attended to")
    axes.set_ylabel("query: the position that reads")
    axes.set_title(f"layer {layer}, head {head}: wei = softmax(q kᵀ / √head_size), causal")
    figure.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    return figure
