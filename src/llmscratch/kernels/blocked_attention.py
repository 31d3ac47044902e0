"""Blocked causal attention with a hand-written backward: the CPU bf16 training kernel.

PyTorch's CPU flash-attention kernel reaches only about 170 GFLOP/s in bf16 forward +
backward on the development CPU, where bf16 matmuls run at about 900. Computing causal
attention one block of queries at a time as plain matmuls (skipping the keys a block can
never see) is faster there. Measured for one layer's attention, forward + backward, with
256-query blocks: 1.7x faster than the fused kernel at gpt2-124m's 12 heads x 1024
positions, 1.9x at 6 heads x 256 (before the hand-written backward, which adds 1.3x).

When it applies (`use_blocked`, decided per call inside `BlockedCausalSelfAttention`):
- no cached prefix (training, or a prompt's first chunk), and
- on the CPU, with bf16 queries (bf16 weights or bf16 autocast), and
- autograd on (training: inference keeps the fused kernel, which needs no saved weights),
- at most `BLOCKED_MAX_T` positions: past 1024 the late blocks' scores outgrow the caches
  and the fused kernel wins again (`benchmarks/attention_scaling.py`: at 2048, 12.4k
  against 13.3k tokens/s).
In fp32, and on GPUs, `scaled_dot_product_attention` is as fast or faster, so everything
else goes to the plain `CausalSelfAttention.attend`. Where it applies, it is taken only if
`blocked_wins` measured its forward + backward faster than the fused kernel's on this
machine for that head count, head size and length bucket (`choice.py`; a CPU with AMX has a
faster fused kernel), or when forced (`apply_kernels(model, force=True)`).

What it costs: the attention weights of every block are kept for the backward pass (about
`T^2/2` bf16 values per head and layer), where flash attention keeps one number per query:
at batch 4 x 1024 positions, 573 MB against 388 MB peak for that one layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models.attention import CausalSelfAttention
from .choice import choose, isolated_rng

BLOCK = 256
BLOCKED_MAX_T = 1024


def use_blocked(q: torch.Tensor) -> bool:
    """bf16 training on the CPU, up to `BLOCKED_MAX_T` positions: where
    `blocked_causal_attention` beats the fused kernel (see the module docstring).

    Args:
        q: `(B, nh, T, hs)` queries.
    """
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled()
            and q.shape[-2] <= BLOCKED_MAX_T)


def blocked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = BLOCK,
                             dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention computed one block of queries at a time, skipping the keys a block
    can never see.

    Queries `s..e` only attend to keys `0..e`, so their scores are a `(e-s, e)` matrix: a
    plain matmul, a mask on its last `(e-s, e-s)` square, a softmax and a matmul with the
    values. Over all blocks this does about `(n+1)/(2n)` of the full `T x T` work for `n`
    blocks. `blocked_attention_ops` writes it as plain tensor ops and lets autograd derive
    the backward; without dropout, `_BlockedCausalAttention` computes the same thing with a
    hand-written backward, which skips autograd's bookkeeping (masked-fill backward,
    full-size zero gradients for every key slice) and accumulates the key and value
    gradients in fp32: 1.3x faster at 12 heads x 1024 positions in bf16.

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
        return blocked_attention_ops(q, k, v, block, dropout_p)
    return _BlockedCausalAttention.apply(q, k, v, block)


def blocked_attention_ops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = BLOCK,
                          dropout_p: float = 0.0) -> torch.Tensor:
    """`blocked_causal_attention` as plain tensor ops; autograd derives the backward.

    Args / Returns: as `blocked_causal_attention`.
    """
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
    """`blocked_attention_ops` without dropout, with its backward written out.

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


def length_bucket(T: int) -> int:
    """The length class of a blocked-attention decision: the next power of two, at least 64."""
    return max(64, 1 << (T - 1).bit_length())


def blocked_key(q: torch.Tensor) -> str:
    """The class of a blocked-attention decision, e.g.
    `"blocked_attention bfloat16 heads=12 head_size=64 T<=1024"`."""
    T = min(length_bucket(q.shape[2]), BLOCKED_MAX_T)
    return f"blocked_attention {str(q.dtype).removeprefix('torch.')} heads={q.shape[1]} head_size={q.shape[3]} T<={T}"


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The reference the blocked kernel replaces: the fused causal kernel."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def blocked_wins(q: torch.Tensor) -> bool:
    """Whether `blocked_causal_attention`'s forward + backward beats the fused kernel's
    (`sdpa_causal`) on this machine for `q`'s heads, head size, dtype and length bucket
    (measured once at one sequence of the bucket's length, then cached: `choice.choose`)."""
    _, nh, _, hs = q.shape
    T = min(length_bucket(q.shape[2]), BLOCKED_MAX_T)
    with isolated_rng(q.device):
        qkv = [torch.randn(1, nh, T, hs, dtype=q.dtype, device=q.device, requires_grad=True) for _ in range(3)]
        grad = torch.randn(1, nh, T, hs, dtype=q.dtype, device=q.device)

    def step(attend):
        def run():
            with torch.enable_grad():
                attend(*qkv).backward(grad)
            for t in qkv:
                t.grad = None
        return run

    return choose(blocked_key(q), step(blocked_causal_attention), step(sdpa_causal))


class BlockedCausalSelfAttention(CausalSelfAttention):
    """`CausalSelfAttention` (same parameters, same state dict) that takes
    `blocked_causal_attention` where `use_blocked` says it applies and `blocked_wins`
    measured it faster (or `force` is set), and the plain `scaled_dot_product_attention`
    everywhere else."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.force = False  # take the blocked kernel wherever it applies, without measuring
        self.chosen: dict[tuple, tuple[str, bool]] = {}  # (dtype, bucket) -> (key, use)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_mask: torch.Tensor | None = None) -> torch.Tensor:
        # causal, unpadded, no cached prefix, bf16 CPU training
        if (self.causal and key_mask is None and k.shape[2] == q.shape[2] and use_blocked(q)
                and self.blocked_pays(q)):
            return blocked_causal_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return super().attend(q, k, v, key_mask)

    def blocked_pays(self, q: torch.Tensor) -> bool:
        """Forced, or measured faster for `q`'s class (`blocked_wins`, once per module and class)."""
        if self.force:
            return True
        cls = (q.dtype, q.shape[1], q.shape[3], length_bucket(q.shape[2]))
        if cls not in self.chosen:
            self.chosen[cls] = (blocked_key(q), blocked_wins(q))
        return self.chosen[cls][1]

    @classmethod
    def from_attention(cls, attn: CausalSelfAttention) -> "BlockedCausalSelfAttention":
        """A `cls` sharing `attn`'s sub-modules (no weights allocated or copied)."""
        with torch.device("meta"):  # projections of its own, replaced at once by attn's
            new = cls(**attn.init_args)
        for name, child in attn.named_children():  # c_attn, c_proj, q_norm/k_norm, dropout
            setattr(new, name, child)
        new.train(attn.training)
        return new
