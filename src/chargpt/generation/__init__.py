"""From a trained model to text: `sampling` (temperature, top-k, top-p), `decoders` (next-character
logits with or without a KV cache, and the window rule past `block_size`), `generate` (prompts,
stop strings, streaming) and `inspection` (attention weights and next-character probabilities).
Where and in which precision a model runs is the model's own: `chargpt.model.precision`."""
