"""Self-attention, built up one idea at a time, ending in the fast path the model uses.

Read top to bottom, this file retraces how attention is usually taught:

1. `simplified_self_attention` — no weights at all: each token's output is an average of
   every token's embedding, weighted by softmax(dot products).
2. `SelfAttention` — trainable query/key/value projections and the 1/sqrt(d) scaling.
3. `CausalAttention` — a mask so a token only sees itself and the tokens before it, plus
   dropout on the attention weights.
4. `MultiHeadAttentionWrapper` — several causal heads side by side, outputs concatenated.
5. `MultiHeadAttention` — the same thing done with one projection and a reshape, so all
   heads run in one batched matmul.
6. `CausalSelfAttention` — what `GPT` uses: the Q, K and V projections fused into one
   matrix (`c_attn`, GPT-2's name), `scaled_dot_product_attention` (flash / memory-efficient
   kernels where the device has them), and an optional KV cache for generation.

Steps 1–5 exist to be read, plotted and tested; `tests/test_attention.py` checks that the
fast path (6) computes exactly the naive formula of step 5. `blocked_causal_attention` is
the path bf16 training takes on the CPU instead of `scaled_dot_product_attention`: see its
docstring for why and what it costs.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Linear


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


BLOCK = 256
BLOCKED_MAX_T = 1024


def blocked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = BLOCK,
                             dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention computed one block of queries at a time, skipping the keys a block
    can never see.

    Queries `s..e` only attend to keys `0..e`, so their scores are a `(e-s, e)` matrix: a
    plain matmul, a mask on its last `(e-s, e-s)` square, a softmax and a matmul with the
    values. Over all blocks this does about `(n+1)/(2n)` of the full `T x T` work for `n`
    blocks. `_blocked_attention_ops` writes it as plain tensor ops and lets autograd derive
    the backward; without dropout, `_BlockedCausalAttention` computes the same thing with a
    hand-written backward, which skips autograd's bookkeeping (masked-fill backward, full-size
    zero gradients for every key slice) and accumulates the key and value gradients in fp32:
    1.3x faster at 12 heads x 1024 positions in bf16.

    Why it exists: PyTorch's CPU flash-attention kernel reaches only about 170 GFLOP/s in
    bf16 forward + backward on the development CPU, where bf16 matmuls run at about 900.
    Measured for one layer's attention, forward + backward, with 256-query blocks: 1.7x
    faster than the fused kernel at gpt2-124m's 12 heads x 1024 positions, 1.9x at 6 heads
    x 256 (before the hand-written backward). Past 1024 positions the late blocks' scores
    outgrow the caches and the fused kernel wins again (`benchmarks/attention_scaling.py`:
    at 2048, 12.4k against 13.3k tokens/s), so it is used only for CPU bf16 training at up
    to `BLOCKED_MAX_T` positions; in fp32, and on GPUs, `scaled_dot_product_attention` is
    as fast or faster. What it costs: the attention weights of every block are kept for the
    backward pass (about `T^2/2` bf16 values per head and layer), where flash attention
    keeps one number per query: at batch 4 x 1024 positions, 573 MB against 388 MB peak for
    that one layer.

    Args:
        q, k, v: `(B, nh, T, hs)`.
        block: queries per block.
        dropout_p: dropout on the attention weights, as `scaled_dot_product_attention`'s.

    Returns:
        `(B, nh, T, hs)`, equal to `scaled_dot_product_attention(q, k, v, is_causal=True)`
        up to rounding (the scores are rounded to `q`'s dtype before the softmax, which
        then accumulates in fp32).
    """
    if dropout_p:
        return _blocked_attention_ops(q, k, v, block, dropout_p)
    return _BlockedCausalAttention.apply(q, k, v, block)


def _blocked_attention_ops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int,
                           dropout_p: float = 0.0) -> torch.Tensor:
    """`blocked_causal_attention` as plain tensor ops; autograd derives the backward."""
    T, hs = q.shape[-2], q.shape[-1]
    q = q * (1.0 / math.sqrt(hs))  # exact in bf16 for power-of-two head sizes
    upper = torch.ones(block, block, dtype=torch.bool, device=q.device).triu(1)
    outs = []
    for s in range(0, T, block):
        e = min(s + block, T)
        scores = q[:, :, s:e] @ k[:, :, :e].transpose(-2, -1)  # (B, nh, e-s, e)
        scores[..., s:].masked_fill_(upper[: e - s, : e - s], float("-inf"))  # the diagonal square
        weights = torch.softmax(scores, dim=-1)
        if dropout_p:
            weights = F.dropout(weights, dropout_p)
        outs.append(weights @ v[:, :, :e])
    return torch.cat(outs, dim=2)


class _BlockedCausalAttention(torch.autograd.Function):
    """`_blocked_attention_ops` without dropout, with its backward written out.

    With `S = (q/sqrt(hs)) K^T`, `P = softmax(S)` and `O = P V` per block of queries:
    `dV += P^T dO`, `dP = dO V^T`, `dS = P * (dP - rowsum(dP * P))` (the softmax backward),
    `dq = dS K / sqrt(hs)` and `dK += dS^T (q/sqrt(hs))`, where `+=` adds each block's share
    into the keys and values it saw.
    """

    @staticmethod
    def forward(ctx, q, k, v, block: int):
        B, H, T, hs = q.shape
        qs = (q * (1.0 / math.sqrt(hs))).reshape(B * H, T, hs)
        k3, v3 = k.reshape(B * H, T, hs), v.reshape(B * H, T, hs)
        upper = torch.ones(block, block, dtype=torch.bool, device=q.device).triu(1)
        out = torch.empty_like(qs)
        weights = []
        for s in range(0, T, block):
            e = min(s + block, T)
            scores = torch.bmm(qs[:, s:e], k3[:, :e].transpose(1, 2))  # (B*nh, e-s, e)
            scores[..., s:].masked_fill_(upper[: e - s, : e - s], float("-inf"))
            p = torch.softmax(scores, dim=-1)
            out[:, s:e] = torch.bmm(p, v3[:, :e])
            weights.append(p)
        ctx.save_for_backward(qs, k3, v3, *weights)
        ctx.block, ctx.shape = block, (B, H, T, hs)
        return out.view(B, H, T, hs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        qs, k3, v3, *weights = ctx.saved_tensors
        B, H, T, hs = ctx.shape
        d_out = grad_out.reshape(B * H, T, hs)
        dq = torch.empty_like(qs)
        dk = torch.zeros(qs.shape, dtype=torch.float32, device=qs.device)
        dv = torch.zeros(qs.shape, dtype=torch.float32, device=qs.device)
        for p, s in zip(weights, range(0, T, ctx.block)):
            e = min(s + ctx.block, T)
            dp = torch.bmm(d_out[:, s:e], v3[:, :e].transpose(1, 2))  # (B*nh, e-s, e)
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)  # P * (dP - rowsum(dP * P))
            dq[:, s:e] = torch.bmm(ds, k3[:, :e])
            dk[:, :e] += torch.bmm(ds.transpose(1, 2), qs[:, s:e])
            dv[:, :e] += torch.bmm(p.transpose(1, 2), d_out[:, s:e])
        shape = (B, H, T, hs)
        return ((dq * (1.0 / math.sqrt(hs))).view(shape), dk.to(qs.dtype).view(shape),
                dv.to(qs.dtype).view(shape), None)


def _use_blocked(q: torch.Tensor) -> bool:
    """bf16 training on the CPU, up to 1024 positions: where `blocked_causal_attention`
    beats the fused kernel."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled()
            and q.shape[-2] <= BLOCKED_MAX_T)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention as GPT-2 computes it, on the fast path.

    One fused `c_attn` projection yields Q, K and V (one matmul instead of three), and
    `scaled_dot_product_attention` does mask + softmax + weighted sum in one kernel.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, qkv_bias: bool = True):
        super().__init__()
        self.n_head, self.head_dim = n_head, n_embd // n_head
        self.c_attn = Linear(n_embd, 3 * n_embd, bias=qkv_bias)
        self.c_proj = Linear(n_embd, n_embd)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Args:
            x: `(B, T, n_embd)` hidden states of positions `start..start+T`.
            cache: when given, this layer's keys/values are stored in it and the queries
                attend to every cached position before them as well.
            start: position of `x`'s first token (only meaningful with a cache).

        Returns:
            `(B, T, n_embd)`.
        """
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        if cache is None or start == 0:
            if cache is not None:
                cache.update(0, k, v)
            if _use_blocked(q):
                y = blocked_causal_attention(q, k, v, dropout_p=dropout_p)
            else:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            k, v = cache.update(start, k, v)  # (B, nh, start+T, hs)
            if T == 1:
                # one new token may look at everything cached: no mask at all
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            else:
                # a chunk after a prefix: query i (absolute start+i) sees keys 0..start+i
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))
