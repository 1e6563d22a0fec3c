"""Lab parts d, e, g, h: a GPT-style decoder built from causal self-attention heads.

Two attention paths compute the same function from the same parameters:
`reference` runs the lab's `Head` modules one by one; `fused` (the default) does one QKV
projection and `scaled_dot_product_attention` (when training with dropout on a CPU, the
chunked loop of `chargpt.model.cpu_attention` instead). Both expose the same state dict (one `qkv`
matrix per block), so a checkpoint loads into either. Both support every recipe option
(rotary positions, QK-norm, RMSNorm, ReLU²/GELU, tied embeddings: see chargpt.model.layers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from chargpt.config import ModelConfig
from chargpt.model.base import LanguageModel
from chargpt.model.cache import AttentionCache
from chargpt.model.cpu_attention import chunked_causal_attention, fused_causal_attention
from chargpt.model.layers import Rotary, RotaryAngles, make_activation, make_norm, rotate

# the QK-norm of a block's queries and keys, shared by all its heads
QKNorm = tuple[nn.Module, nn.Module]
# an attention module's output, or with `return_weights=True` its output and its weights `wei`
Attended = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class Head(nn.Module):
    """Lab part d: one head of causal self-attention, scores scaled by 1/sqrt(head_size)."""

    def __init__(
        self,
        n_embd: int,
        head_size: int,
        block_size: int,
        dropout: float,
        qk_norm: QKNorm | None = None,
    ):
        super().__init__()
        self.head_size = head_size
        self.qk_norm = qk_norm  # a plain tuple: the norms belong to MultiHeadAttention
        # learned projections of each token into a query, a key and a value
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        # lower-triangular mask: position t may only look at positions <= t (not saved: derived)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)), False)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, rope: RotaryAngles | None = None, return_weights: bool = False
    ) -> Attended:
        """(B, T, C) -> (B, T, hs); with `return_weights`, also `wei` (B, T, T) before dropout."""
        B, T, C = x.shape
        k = self.key(x)  # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        v = self.value(x)  # (B, T, hs)
        if self.qk_norm is not None:  # unit-RMS queries and keys (recipe option)
            q, k = self.qk_norm[0](q), self.qk_norm[1](k)
        if rope is not None:  # rotary positions (recipe option), as one head: (B, 1, T, hs)
            q, k = rotate(q[:, None], rope)[:, 0], rotate(k[:, None], rope)[:, 0]
        # affinities between every query and every key, scaled to keep unit variance
        wei = q @ k.transpose(-2, -1) * self.head_size**-0.5  # (B, T, hs) @ (B, hs, T) -> (B, T, T)
        # the future is masked out; slicing the mask makes any T <= block_size work
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))  # (B, T, T)
        wei = F.softmax(wei, dim=-1)  # (B, T, T): each row sums to 1
        out = self.dropout(wei) @ v  # weighted sum of values: (B, T, T) @ (B, T, hs) -> (B, T, hs)
        return (out, wei) if return_weights else out


class MultiHeadAttention(nn.Module):
    """Several `Head`s in parallel, concatenated and projected back to n_embd (reference path)."""

    def __init__(
        self, n_embd: int, n_head: int, block_size: int, dropout: float, qk_norm: bool = False
    ):
        super().__init__()
        head_size = n_embd // n_head
        norms = None
        self.qk_norm = qk_norm
        if qk_norm:  # one gain vector for all heads, stored as in the fused path
            self.q_norm, self.k_norm = nn.RMSNorm(head_size), nn.RMSNorm(head_size)
            norms = (self.q_norm, self.k_norm)
        self.heads = nn.ModuleList(
            [Head(n_embd, head_size, block_size, dropout, norms) for _ in range(n_head)]
        )
        self.proj = nn.Linear(head_size * n_head, n_embd)
        self.dropout = nn.Dropout(dropout)
        # checkpoints store one fused `qkv` matrix; translate to and from the per-head layout
        self.register_state_dict_post_hook(_heads_to_qkv)
        self.register_load_state_dict_pre_hook(_qkv_to_heads)

    def forward(
        self, x: torch.Tensor, rope: RotaryAngles | None = None, return_weights: bool = False
    ) -> Attended:
        """(B, T, C) -> (B, T, C); with `return_weights`, also every head's `wei`, stacked:
        (B, n_head, T, T)."""
        # each head's output and its wei (no extra work: a head computes its wei anyway)
        outs, weights = zip(*[h(x, rope, return_weights=True) for h in self.heads], strict=True)
        out = torch.cat(outs, dim=-1)  # (B, T, n_head * hs)
        out = self.dropout(self.proj(out))  # (B, T, C)
        if return_weights:
            return out, torch.stack(weights, dim=1)  # and the heads' wei: (B, n_head, T, T)
        return out


def _heads_to_qkv(module: MultiHeadAttention, state_dict: dict, prefix: str, _meta) -> None:
    """State-dict hook: replace the heads' query/key/value tensors by the fused `qkv` ones, e.g.
    the (3C, C) weight. Every tensor of a projection has its output rows first (nn.Linear's
    weight; an int8 layer's weight and scales, chargpt.model.quantize): they stack on dim 0."""
    fused: dict[str, list[torch.Tensor]] = {}  # "weight" (or int8 names) -> [query 0, ..., value n]
    for name in ("query", "key", "value"):
        for i in range(len(module.heads)):
            head = f"{prefix}heads.{i}.{name}."
            for key in [key for key in state_dict if key.startswith(head)]:
                fused.setdefault(key.removeprefix(head), []).append(state_dict.pop(key))
    for tensor_name, parts in fused.items():
        state_dict[f"{prefix}qkv.{tensor_name}"] = torch.cat(parts)


def _qkv_to_heads(module: MultiHeadAttention, state_dict: dict, prefix: str, *_args) -> None:
    """Load hook: split each fused `qkv` tensor (e.g. the (3C, C) weight) into each head's
    query/key/value ones. Without any, load_state_dict reports the heads' tensors as missing."""
    n_head = len(module.heads)
    for key in [key for key in state_dict if key.startswith(f"{prefix}qkv.")]:
        tensor_name = key.removeprefix(f"{prefix}qkv.")
        qkv = state_dict.pop(key)
        for name, part in zip(("query", "key", "value"), qkv.chunk(3), strict=True):
            for i, head_part in enumerate(part.chunk(n_head)):
                state_dict[f"{prefix}heads.{i}.{name}.{tensor_name}"] = head_part


class CausalSelfAttention(nn.Module):
    """The fused path: all heads' Q, K, V in one matmul, attention by PyTorch's fused kernel."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, qk_norm: bool = False):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)  # [queries; keys; values]
        if qk_norm:  # recipe option: unit-RMS queries and keys, one gain vector for all heads
            self.q_norm, self.k_norm = nn.RMSNorm(n_embd // n_head), nn.RMSNorm(n_embd // n_head)
        self.qk_norm = qk_norm
        self.proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = dropout
        self.dropout = nn.Dropout(dropout)
        self.attention_dtype: torch.dtype | None = None  # None: q's (see precision.py)

    def forward(
        self,
        x: torch.Tensor,
        cache: AttentionCache | None = None,
        rope: RotaryAngles | None = None,
        return_weights: bool = False,
    ) -> Attended:
        """(B, T, C) -> (B, T, C). With a `cache`, x holds the T positions after those cached;
        `rope` holds the rotary angles of those T positions (recipe option). With
        `return_weights` (and no cache), also each head's `wei`, (B, n_head, T, T), as the lab's
        `Head` computes it: the output is then computed from those weights, not the fused kernel."""
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, n_head, T, hs) tensors
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # keys are rotated before they are cached: cached keys stay valid
            q, k = rotate(q, rope), rotate(k, rope)
        dropout_p = self.attn_dropout if self.training else 0.0
        if return_weights:
            if cache is not None:
                raise ValueError("return_weights reads the whole text: pass no cache")
            wei = causal_weights(q, k)  # (B, n_head, T, T): each row sums to 1
            y = F.dropout(wei, dropout_p) @ v  # (B, n_head, T, hs)
            return self.dropout(self.proj(y.transpose(1, 2).reshape(B, T, C))), wei
        if cache is None and dropout_p > 0 and x.device.type == "cpu":
            # the fused CPU kernel has no dropout; cache-sized chunks are faster: (B, n_head, T, hs)
            y = chunked_causal_attention(q, k, v, dropout_p)
        elif cache is None:
            # softmax(q k^T / sqrt(hs)) v with the causal mask, in one kernel: (B, n_head, T, hs)
            y = fused_causal_attention(q, k, v, dropout_p, self.attention_dtype)
        else:
            mask = cache.query_mask(T, x.device)  # None from position 0 or for one query
            causal = mask is None and T > 1
            k, v = cache.append(k, v)  # (B, n_head, keys, hs): earlier positions too
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p
            )
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again: (B, T, C)
        return self.dropout(self.proj(y))  # (B, T, C)

    def step(
        self, x: torch.Tensor, cache: AttentionCache, rope: RotaryAngles | None = None
    ) -> torch.Tensor:
        """`forward` for one new position per row: (B, 1, C) -> (B, 1, C). With one position
        the heads need no transposes; one query needs no causal mask, only the cache's, which
        hides each row's keys past its own position where the rows' positions differ (a
        `SlotKVCache`; a `KVCache`'s rows share one position and need none)."""
        B, _, C = x.shape
        # (B, 1, 3C) -> q, k, v: (B, n_head, 1, hs) each
        q, k, v = self.qkv(x).view(B, 3, self.n_head, 1, C // self.n_head).unbind(1)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rotate(q, rope), rotate(k, rope)
        mask = cache.query_mask(1, x.device)  # None, or (B, 1, 1, keys)
        k, v = cache.append(k, v)  # (B, n_head, keys, hs): earlier positions too
        dropout_p = self.attn_dropout if self.training else 0.0
        # (B, n_head, 1, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return self.dropout(self.proj(y.view(B, 1, C)))  # heads side by side again: (B, 1, C)


def causal_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The lab's `wei` of (..., T, hs) queries and keys, written out: (..., T, T)."""
    T, hs = q.shape[-2:]
    # affinities between every query and every key, scaled to keep unit variance
    wei = q @ k.transpose(-2, -1) * hs**-0.5  # (..., T, hs) @ (..., hs, T) -> (..., T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)
    return F.softmax(wei.masked_fill(future, float("-inf")), dim=-1)  # the past only


class FeedForward(nn.Module):
    """Lab part e: position-wise MLP, n_embd -> 4 n_embd -> n_embd with a ReLU in between
    (or the `activation` a recipe option names: relu2, gelu)."""

    def __init__(self, n_embd: int, dropout: float, activation: str = "relu"):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),  # widen 4x, as in "Attention Is All You Need"
            make_activation(activation),
            nn.Linear(4 * n_embd, n_embd),  # back to the residual width
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, T, C) -> (B, T, C)


class DecoderBlock(nn.Module):
    """Lab part g: communication (attention) then computation (MLP), pre-LN, with residuals."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        if c.attention == "reference":
            self.sa: nn.Module = MultiHeadAttention(
                c.n_embd, c.n_head, c.block_size, c.dropout, c.qk_norm
            )
        else:
            self.sa = CausalSelfAttention(c.n_embd, c.n_head, c.dropout, c.qk_norm)
        self.ffwd = FeedForward(c.n_embd, c.dropout, c.mlp)
        self.ln1 = make_norm(c.norm, c.n_embd)  # LayerNorm, or RMSNorm (recipe option)
        self.ln2 = make_norm(c.norm, c.n_embd)

    def forward(
        self,
        x: torch.Tensor,
        cache: AttentionCache | None = None,
        rope: RotaryAngles | None = None,
        return_weights: bool = False,
    ) -> Attended:
        """(B, T, C) -> (B, T, C); with `return_weights`, also its attention's `wei`,
        (B, n_head, T, T)."""
        h = self.ln1(x)  # normalise: (B, T, C)
        if cache is None:
            attended = self.sa(h, rope=rope, return_weights=return_weights)
        else:  # a cache: fused path only
            attended = self.sa(h, cache, rope, return_weights=return_weights)
        if return_weights:
            attended, wei = attended  # (B, T, C), (B, n_head, T, T)
        x = x + attended  # attend, add back (residual): (B, T, C)
        x = x + self.ffwd(self.ln2(x))  # normalise, transform, add back (residual): (B, T, C)
        return (x, wei) if return_weights else x

    def step(
        self, x: torch.Tensor, cache: AttentionCache, rope: RotaryAngles | None = None
    ) -> torch.Tensor:
        """`forward` for one new position per row (see `CausalSelfAttention.step`): (B, 1, C)."""
        x = x + self.sa.step(self.ln1(x), cache, rope)
        return x + self.ffwd(self.ln2(x))


# runs decoder block i on x in one way or another: (i, block, x, rope) -> x, (B, T, C)
RunBlock = Callable[[int, DecoderBlock, torch.Tensor, RotaryAngles | None], torch.Tensor]


class GPTLanguageModel(LanguageModel):
    """Lab part h: token + position embeddings, decoder blocks, final LayerNorm, LM head."""

    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.context_length = config.block_size
        self.token_embedding_table = nn.Embedding(vocab_size, config.n_embd)
        if config.pos_emb == "rope":  # positions rotate queries and keys instead (recipe option)
            self.rotary = Rotary(config.n_embd // config.n_head, config.block_size)
        else:
            self.position_embedding_table = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.Sequential(*[DecoderBlock(config) for _ in range(config.n_layer)])
        self.ln_f = make_norm(config.norm, config.n_embd)  # final layer norm
        self.lm_head = nn.Linear(config.n_embd, vocab_size)
        if config.tie_embeddings:  # one (vocab, C) matrix reads characters in and out (option)
            self.lm_head.weight = self.token_embedding_table.weight
        self.apply(self._init_weights)

    @property
    def supports_kv_cache(self) -> bool:
        """Only the fused attention path reads and fills a KV cache (generation.decoders)."""
        return self.config.attention == "fused"

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """N(0, 0.02) for every linear and embedding weight, zero biases (as in the lab)."""
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(
        self, idx: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, RotaryAngles | None]:
        """(B, T) ids at (T,) or (B, T) positions -> (B, T, C) embeddings, and with rotary
        positions (recipe option) their angles, which the blocks apply to queries and keys."""
        tok_emb = self.token_embedding_table(idx)  # (B, T, C): what each character is
        if self.config.pos_emb == "rope":
            return tok_emb, self.rotary(pos)  # positions enter through q and k in each block
        pos_emb = self.position_embedding_table(pos)  # (T, C) or (B, T, C): where each one is
        return tok_emb + pos_emb, None  # (B, T, C)

    def logits(
        self, idx: torch.Tensor, caches: Sequence[AttentionCache] | None = None
    ) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) logits. With `caches` (one per block), idx holds the T
        positions that follow those already cached, and their keys and values join the caches;
        with `SlotKVCache`s, each row follows its own cached positions."""
        B, T = idx.shape
        if caches is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)  # (T,)
            return self.run_blocks(idx, pos, lambda i, block, x, rope: block(x, rope=rope))
        pos = caches[0].positions(T, idx.device)  # (T,), or (B, T): a position per row
        return self.run_blocks(idx, pos, lambda i, block, x, rope: block(x, caches[i], rope))

    def step(self, idx: torch.Tensor, caches: Sequence[AttentionCache]) -> torch.Tensor:
        """`logits(idx, caches)[:, -1]` for one new id per row: generation's decode step, in
        fewer operations (no causal mask, no head transposes). With `KVCache`s every row is at
        the same position; with `SlotKVCache`s each row is at its own (continuous batching).
        (B, 1) -> (B, vocab_size)."""
        positions = caches[0].positions(1, idx.device)  # (1,), or (B, 1): the new ids'
        logits = self.run_blocks(
            idx, positions, lambda i, block, x, rope: block.step(x, caches[i], rope)
        )
        return logits[:, 0]  # (B, vocab_size)

    def run_blocks(self, idx: torch.Tensor, pos: torch.Tensor, run_block: RunBlock) -> torch.Tensor:
        """The forward pass, written once for `logits`, `step` and inspection (which reads each
        block's attention on the way): (B, T) ids at positions `pos` -> (B, T, V) logits.
        `run_block(i, block, x, rope)` runs decoder block i on x, (B, T, C) -> (B, T, C)."""
        x, rope = self.embed(idx, pos)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = run_block(i, block, x, rope)  # (B, T, C)
        x = self.ln_f(x)  # final layer norm: (B, T, C)
        return self.lm_head(x)  # (B, T, vocab_size)
