"""What each attention head of a trained run looks at, measured over validation text.

    python benchmarks/attention_heads.py --run RUN [--windows 100] [--out docs/attention]

For every head, the average weight a position gives to itself, to the character before it, to
the most recent space (where the current word starts), to the most recent newline (where the
current line starts) and to all vowels before it, and how far back its weight lies on average.
Averaged over every position from the 16th on of `--windows` consecutive block_size windows of
the validation split (the last 10% of the corpus); the "uniform" row is what attention spread
evenly over the past would give. Prints a Markdown table; with --out, also draws the grid of all
heads for one passage and, large, the head that leads each of the previous-character, last-space
and last-newline columns (chargpt.viz.attention_plot, as `chargpt attention` draws them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from chargpt.data.corpus import load_text
from chargpt.generation.inspection import inspect_text
from chargpt.runs.directory import load_run
from chargpt.viz.attention_plot import plot_attention

SKIP = 16  # first positions left out: with a handful of keys every head looks "local"
VOWELS = set("aeiouAEIOU")
PASSAGE = (  # from the validation split
    "BAPTISTA:\nGood morrow, neighbour Gremio.\nGod save you, gentlemen!\n\n"
    "PETRUCHIO:\nAnd you, good sir!"
)
DRAWN = {"previous": "previous_character", "space": "word_start", "newline": "line_start"}


def last_of(window: str, char: str) -> torch.Tensor:
    """(T, T) mask: query t marks the last position j <= t that holds `char` (none if none)."""
    T = len(window)
    mask = torch.zeros(T, T, dtype=torch.bool)
    last = -1
    for t, c in enumerate(window):
        last = t if c == char else last
        if last >= 0:
            mask[t, last] = True
    return mask


def key_masks(window: str) -> dict[str, torch.Tensor]:
    """For each measure, which keys j count for query t: (T, T) booleans, never above the
    diagonal."""
    T = len(window)
    past = torch.ones(T, T, dtype=torch.bool).tril()
    is_vowel = torch.tensor([c in VOWELS for c in window])
    return {
        "self": torch.eye(T, dtype=torch.bool),
        "previous": torch.eye(T, dtype=torch.bool).roll(-1, dims=1).tril(),
        "space": last_of(window, " "),
        "newline": last_of(window, "\n"),
        "vowels": past & is_vowel,
    }


def measure(run, text: str, windows: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Each measure's mean per head, (n_layer, n_head), and its uniform-attention baseline."""
    T = run.model_config.block_size
    sums: dict[str, torch.Tensor] = {}
    uniform: dict[str, float] = {}
    for start in range(0, windows * T, T):
        window = text[start : start + T]
        attention = inspect_text(run.model, run.tokenizer, window).attention[..., SKIP:, :]
        masks = key_masks(window)
        distance = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).clamp_min(0)
        values = {name: mask.float() for name, mask in masks.items()}
        values["distance"] = distance.float()
        for name, value in values.items():
            per_query = (attention * value[SKIP:]).sum(-1)  # (n_layer, n_head, T - SKIP)
            sums[name] = sums.get(name, 0) + per_query.mean(-1) / windows
            even = value[SKIP:].sum(-1) / torch.arange(SKIP + 1, T + 1)  # weights 1/(t+1)
            uniform[name] = uniform.get(name, 0.0) + even.mean().item() / windows
    return sums, uniform


def table(means: dict[str, torch.Tensor], uniform: dict[str, float]) -> str:
    names = list(means)
    lines = [
        "| head | " + " | ".join(names) + " |",
        "|---|" + "--:|" * len(names),
        "| uniform | " + " | ".join(f"{uniform[n]:.3f}" for n in names) + " |",
    ]
    n_layer, n_head = means[names[0]].shape
    for layer in range(n_layer):
        for head in range(n_head):
            cells = " | ".join(f"{means[n][layer, head]:.3f}" for n in names)
            lines.append(f"| layer {layer}, head {head} | {cells} |")
    return "\n".join(lines)


def leader(values: torch.Tensor) -> tuple[int, int]:
    """(layer, head) of the largest value."""
    index = int(values.argmax())
    return divmod(index, values.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a trained GPT run directory")
    parser.add_argument("--windows", type=int, default=100, help="validation windows to average")
    parser.add_argument("--out", type=Path, help="directory for the attention PNGs")
    args = parser.parse_args()
    run = load_run(args.run)
    corpus = load_text("shakespeare")
    means, uniform = measure(run, corpus[int(0.9 * len(corpus)) :], args.windows)
    print(table(means, uniform))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        seen = inspect_text(run.model, run.tokenizer, PASSAGE)
        print(f"wrote {plot_attention(seen, args.out / 'grid.png')}")
        for measure_name, file_name in DRAWN.items():
            layer, head = leader(means[measure_name])
            path = plot_attention(seen, args.out / f"{file_name}.png", layer, head)
            print(f"wrote {path} (layer {layer}, head {head}: most weight on {measure_name})")


if __name__ == "__main__":
    main()
