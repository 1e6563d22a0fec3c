"""A trained model carried over to a larger vocabulary, for fine-tuning on text with characters
the model never saw (the vocabulary itself: chargpt.data.tokenizer.join_vocabularies).

Each of the old characters' rows (token embedding, LM head weight and bias; for the bigram, its
table's rows and columns) moves to that character's id in the new vocabulary, unchanged, so text
made of the old characters gets the same logits as before. A new character's rows start as the
mean of the old characters' rows:
- as input, it enters the blocks as an average character, at the scale the blocks were trained
  on (a fresh N(0, 0.02) row would be an input of a size and direction they never saw);
- as output, its logit is the mean of the old logits in every context, so by Jensen's inequality
  (exp(mean) <= mean(exp)) its probability starts at most 1 / (old vocabulary + new characters):
  the model's predictions on the old text barely move, and the new text teaches it the rest.
  A random or zero row could instead make the new character likely everywhere.
(John Hewitt's note "Initializing new word embeddings for pretrained language models", 2021,
argues the same for word vocabularies.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from chargpt.config import ModelConfig
from chargpt.model import LanguageModel, build_model


def grown(tensor: torch.Tensor, dim: int, new_size: int, old_ids: torch.Tensor) -> torch.Tensor:
    """`tensor` with `new_size` entries along `dim`: entry i moved to old_ids[i], the others the
    mean of the old entries."""
    shape = list(tensor.shape)
    shape[dim] = new_size
    mean = tensor.mean(dim=dim, keepdim=True)
    return mean.expand(shape).clone().index_copy_(dim, old_ids, tensor)


@torch.no_grad()
def resize_vocabulary(
    model: LanguageModel, config: ModelConfig, new_ids: Sequence[int], new_size: int
) -> LanguageModel:
    """A model like `model` for a vocabulary of `new_size` characters, in which the old
    character with id i has id new_ids[i]. The new model is on `model`'s device."""
    old_size = model.vocab_size
    if len(new_ids) != old_size or len(set(new_ids)) != old_size or max(new_ids) >= new_size:
        raise ValueError(f"new_ids must give {old_size} distinct ids below {new_size}")
    device = next(model.parameters()).device
    with torch.device(device):
        resized = build_model(config, new_size)
    old_ids = torch.tensor(list(new_ids), device=device)
    target_shapes = {name: value.shape for name, value in resized.state_dict().items()}
    state = {}
    for name, value in model.state_dict().items():
        # the vocabulary's dimensions are those whose size changes with it
        for dim, (old, new) in enumerate(zip(value.shape, target_shapes[name], strict=True)):
            if old != new:
                if (old, new) != (old_size, new_size):
                    raise ValueError(f"{name} changes size other than the vocabulary's")
                value = grown(value, dim, new, old_ids)
        state[name] = value
    resized.load_state_dict(state)
    return resized
