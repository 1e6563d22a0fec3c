"""From a trained model to text: `sampling` (temperature, top-k, top-p), `decoders` (next-character
logits with or without a KV cache, and the window rule past `block_size`), `generate` (prompts,
stop strings, streaming), `inspection` (attention weights and next-character probabilities) and
`precision` (device and dtype)."""
