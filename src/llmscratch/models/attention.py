"""Self-attention, built up one idea at a time, ending in the layer the model uses.

Read top to bottom, this file retraces how attention is usually taught:

1. `simplified_self_attention` — no weights at all: each token's output is an average of
   every token's embedding, weighted by softmax(dot products).
2. `SelfAttention` — trainable query/key/value projections and the 1/sqrt(d) scaling.
3. `CausalAttention` — a mask so a token only sees itself and the tokens before it, plus
   dropout on the attention weights.
4. `MultiHeadAttentionWrapper` — several causal heads side by side, outputs concatenated.
5. `MultiHeadAttention` — the same thing done with one projection and a reshape, so all
   heads run in one batched matmul.
6. `FusedSelfAttention` — what the models use: the Q, K and V projections fused into one
   matrix (`c_attn`, GPT-2's name), `scaled_dot_product_attention` (flash / memory-efficient
   kernels where the device has them), and an optional `KVCache` for generation. Causal for
   the decoders (`GPT`); `causal=False` makes it bidirectional (BERT's encoder); a key mask
   hides padding (ragged batches, padded encoder inputs). `CausalSelfAttention`, its name
   before the encoder shared it, still imports.

Beside it: `RMSNorm` and rotary position embeddings (`rope_frequencies`, `apply_rope`), the
pieces of the Llama/Qwen-style decoders, and grouped-query attention as an option of step 6.

Steps 1–5 exist to be read, plotted and tested; `tests/test_attention.py` checks that
step 6 computes exactly the naive formula of step 5. Faster CPU paths (a blocked causal
attention for bf16 training) live apart in `llmscratch.kernels` and are swapped in by
`apply_kernels`; this file stays plain `nn.Linear` + `scaled_dot_product_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F



def simplified_self_attention(x: torch.Tensor) -> torch.Tensor:
    """Attention with no trainable weights.

    Args:
        x: `(T, d)` or `(B, T, d)` embeddings.

    Returns:
        Context vectors of the same shape: row t is `sum_s softmax_s(x_t · x_s) x_s`.
    """
    scores = x @ x.transpose(-2, -1)  # (.., T, T): similarity of every pair of tokens
    weights = torch.softmax(scores, dim=-1)  # each row sums to 1
    return weights @ x  # (.., T, d)


class SelfAttention(nn.Module):
    """Scaled dot-product self-attention with trainable query, key and value projections."""

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The `(B, T, T)` attention matrix (rows sum to 1), e.g. for a heat map."""
        q, k = self.W_query(x), self.W_key(x)
        # Dividing by sqrt(d_k) keeps the dot products' variance near 1, so the softmax
        # does not saturate into a one-hot vector with vanishing gradients.
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1]), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d_in) -> (B, T, d_out)
        return self.attention_weights(x) @ self.W_value(x)


class CausalAttention(nn.Module):
    """One causal attention head: token t attends only to tokens 0..t."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float = 0.0,
                 qkv_bias: bool = False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        # True above the diagonal = "future" positions to hide. A buffer moves with .to().
        mask = torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), 1)
        self.register_buffer("mask", mask, persistent=False)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        q, k = self.W_query(x), self.W_key(x)
        scores = q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1])  # (B, T, T)
        # -inf before the softmax gives the future exactly zero weight and keeps rows summing to 1
        scores = scores.masked_fill(self.mask[:T, :T], float("-inf"))
        return torch.softmax(scores, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.attention_weights(x)) @ self.W_value(x)


class MultiHeadAttentionWrapper(nn.Module):
    """`n_head` independent causal heads whose outputs are concatenated: clear but slow."""

    def __init__(self, d_in: int, d_out: int, context_length: int, n_head: int,
                 dropout: float = 0.0, qkv_bias: bool = False):
        super().__init__()
        self.heads = nn.ModuleList(
            CausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(n_head)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d_in) -> (B, T, n_head*d_out)
        return torch.cat([head(x) for head in self.heads], dim=-1)


class MultiHeadAttention(nn.Module):
    """Multi-head causal attention with one projection per Q/K/V split into heads by a view.

    This is the naive formula the fast path is tested against: explicit scores, mask,
    softmax, dropout and weighted sum.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, n_head: int,
                 dropout: float = 0.0, qkv_bias: bool = False):
        super().__init__()
        if d_out % n_head != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by n_head ({n_head})")
        self.n_head, self.head_dim = n_head, d_out // n_head
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)  # mixes what the heads found
        self.dropout = nn.Dropout(dropout)
        mask = torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), 1)
        self.register_buffer("mask", mask, persistent=False)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, n_head, T, T)` attention weights."""
        B, T, _ = x.shape
        q = self.W_query(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.W_key(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, nh, T, T)
        scores = scores.masked_fill(self.mask[:T, :T], float("-inf"))
        return torch.softmax(scores, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        v = self.W_value(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        ctx = self.dropout(self.attention_weights(x)) @ v  # (B, nh, T, hs)
        ctx = ctx.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, d_out)
        return self.out_proj(ctx)


class KVCache(nn.Module):
    """Pre-allocated keys and values of one attention layer, for incremental decoding.

    Allocated once at its full size, so appending a token is an in-place copy rather than
    a `torch.cat` that reallocates the whole cache at every step.
    """

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 device=None, dtype=None):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        # uninitialized: only positions already written (`[:end]` in `update`) are ever read
        self.register_buffer("k", torch.empty(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.empty(shape, device=device, dtype=dtype), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write `k`, `v` `(B, nh, T, hs)` at positions `start..start+T`; return all keys and
        values so far, `(B, nh, start+T, hs)` each."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama, Qwen): `x / sqrt(mean(x^2) + eps) * weight`.

    LayerNorm without the mean subtraction and without a bias: one statistic per vector
    instead of two, and no learned shift. Computed in fp32 and cast back, so bf16 inputs
    lose no precision in the sum of squares.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# --------------------------------------------------------------------------- rotary positions

ROPE_TYPES = ("default", "llama3")


def rope_frequencies(head_dim: int, theta: float = 10000.0, scaling: dict | None = None,
                     device=None) -> torch.Tensor:
    """The `(head_dim // 2,)` angular frequencies of rotary position embeddings (fp32).

    Pair `i` of a head's dimensions turns by `position * theta^(-2i/head_dim)` radians: the
    first pairs spin fast (fine position), the last ones slowly (coarse position).

    `scaling` (Llama 3's `rope_scaling`, `rope_type` "llama3") stretches the context: pairs
    whose wavelength is longer than `original_max_position_embeddings / low_freq_factor`
    turn `factor` times slower, those shorter than `.../high_freq_factor` keep their
    speed, and the ones between are interpolated smoothly.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float()
                                / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"unsupported rope_type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)  # long waves: slower
    smooth = (old_len / wavelen - low) / (high - low)  # 0 at the long end, 1 at the short end
    between = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, `(..., T, head_dim)` for `(..., T)` positions.

    The angles are repeated for both halves of a head (the half-split layout Llama's and
    Hugging Face's weights use: dimension `j` pairs with `j + head_dim/2`).
    """
    angles = positions.float()[..., None] * inv_freq  # (..., T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., T, hd)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`(a, b) -> (-b, a)` over the two halves of the last dimension: a 90-degree turn of
    every (j, j + hd/2) pair."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair of `x`'s dimensions by its position's angle.

    Args:
        x: `(B, nh, T, hs)` queries or keys.
        cos, sin: `(T, hs)` (every row at the same positions) or `(B, T, hs)` (a position
            per row) from `rope_cos_sin`.

    Since a rotation by `a` then the inverse rotation by `b` is one by `a - b`, the dot
    product of a query rotated at position m and a key rotated at n depends only on
    `m - n`: attention sees relative positions, with nothing learned.
    """
    cos, sin = cos.unsqueeze(-3).to(x.dtype), sin.unsqueeze(-3).to(x.dtype)  # broadcast over heads
    return x * cos + rotate_half(x) * sin


class FusedSelfAttention(nn.Module):
    """Multi-head self-attention as GPT-2 computes it (fused Q/K/V), causal by default.

    One fused `c_attn` projection yields Q, K and V (one matmul instead of three), and
    `scaled_dot_product_attention` does mask + softmax + weighted sum in one kernel.
    `causal=False` makes it bidirectional (every token sees every other, as in BERT's
    encoder): the same layer, one switch, not a second copy.

    The modern decoders' options (Llama, Qwen3, Mistral) are arguments of the same layer:
    `n_kv_head < n_head` is grouped-query attention (each key/value head serves a group of
    query heads, so the KV cache holds `n_kv_head` heads; 1 is multi-query attention),
    `head_dim` a per-head width other than `n_embd / n_head`, `qk_norm` an RMSNorm on each
    query and key head, `bias` the output projection's bias, and the `rope` argument of
    `forward` rotates queries and keys by their positions. `c_attn` then yields
    `[q (nh*hs) | k (nkv*hs) | v (nkv*hs)]`.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, qkv_bias: bool = True,
                 causal: bool = True, *, n_kv_head: int | None = None, head_dim: int | None = None,
                 qk_norm: bool = False, bias: bool = True, norm_eps: float = 1e-6):
        super().__init__()
        self.n_head = n_head
        self.n_kv_head = n_kv_head or n_head  # fewer key/value heads: grouped-query attention
        self.head_dim = head_dim or n_embd // n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        self.causal = causal
        self.qk_norm = qk_norm
        self.init_args = dict(n_embd=n_embd, n_head=n_head, dropout=dropout, qkv_bias=qkv_bias, causal=causal,
                              n_kv_head=n_kv_head, head_dim=head_dim, qk_norm=qk_norm, bias=bias,
                              norm_eps=norm_eps)
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(n_embd, q_dim + 2 * kv_dim, bias=qkv_bias)  # [q | k | v]
        self.c_proj = nn.Linear(q_dim, n_embd, bias=bias)
        if qk_norm:  # Qwen3: each head's query and key RMS-normalised before the rotation
            self.q_norm = RMSNorm(self.head_dim, norm_eps)
            self.k_norm = RMSNorm(self.head_dim, norm_eps)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                key_mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                values: dict | None = None) -> torch.Tensor:
        """Args:
            x: `(B, T, n_embd)` hidden states of positions `start..start+T`.
            cache: when given, this layer's keys/values are stored in it and the queries
                attend to every cached position before them as well.
            start: position of `x`'s first token (only meaningful with a cache).
            key_mask: optional `(B, start+T)` bool, True for real tokens and False for
                padding, which no query attends to (left-padded ragged batches, padded
                encoder inputs).
            rope: `(cos, sin)` of the queries' positions (`rope_cos_sin`), to rotate the
                queries and keys by; None for a model with learned positions.
            values: value residual (ResFormer): a dict the model's layers share in one
                forward pass; the first layer leaves its values in it, each later layer
                attends to the mean of its own values and those. None: off.

        Returns:
            `(B, T, n_embd)`.
        """
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        q = q.view(B, T, nh, hs)
        k = k.view(B, T, nkv, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)  # (B, nh, T, hs)
        k = k.transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if values is not None:  # before the cache: a cached value is already mixed
            v = 0.5 * (v + values["first"]) if "first" in values else values.setdefault("first", v)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(start, k, v)  # (B, nkv, start+T, hs): the cached prefix too
        k, v = self.expand_kv(k), self.expand_kv(v)  # (B, nh, start+T, hs)
        y = self.attend(q, k, v, key_mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, nh*hs): heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """`(B, nkv, S, hs)` -> `(B, nh, S, hs)`: each key/value head repeated for the
        `nh / nkv` query heads of its group (a no-op without grouping)."""
        groups = self.n_head // self.n_kv_head
        return t if groups == 1 else t.repeat_interleave(groups, dim=1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(hs)) v; when causal, each query sees only the keys at or
        before it; keys where `key_mask` is False are never seen.

        Args:
            q: `(B, nh, T, hs)`, the last `T` positions; k, v: `(B, nh, P+T, hs)`, a prefix
                of `P >= 0` earlier (cached) positions followed by the queries' own.
            key_mask: optional `(B, P+T)` bool, False at padding.

        Returns:
            `(B, nh, T, hs)`.
        """
        T, P = q.shape[2], k.shape[2] - q.shape[2]
        dropout_p = self.dropout if self.training else 0.0
        if key_mask is not None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=self.attention_mask(T, P, key_mask), dropout_p=dropout_p)
        if not self.causal or T == 1:  # bidirectional, or one new token: no mask at all
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        if P == 0:  # no prefix: the plain causal triangle
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        # a chunk after a prefix: query i (absolute position P+i) sees keys 0..P+i
        mask = torch.ones(T, P + T, dtype=torch.bool, device=q.device).tril(P)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    def attention_mask(self, T: int, P: int, key_mask: torch.Tensor) -> torch.Tensor:
        """The `(B, 1, T, P+T)` bool mask (True = may attend) for queries at `P..P+T`.

        Each query may always see itself, so a padding query has one key to attend to and
        its (never used) output stays finite: an all-False row would give NaN, and NaN
        times a zero weight is still NaN in the keys/values cached for later steps.
        """
        S = P + T
        allowed = key_mask[:, None, None, :S].to(torch.bool)  # (B, 1, 1, S)
        if self.causal:
            allowed = allowed & torch.ones(T, S, dtype=torch.bool, device=key_mask.device).tril(P)
        itself = torch.zeros(T, S, dtype=torch.bool, device=key_mask.device)
        itself[torch.arange(T), torch.arange(P, S)] = True
        return allowed | itself


CausalSelfAttention = FusedSelfAttention
"""The name `FusedSelfAttention` had while only the decoder used it (kept for notebooks and
`kernels`, which swap it by type)."""
