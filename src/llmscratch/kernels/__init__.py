"""Opt-in speed for a built model: faster kernels swapped in, the reference model untouched.

`GPT(config)` is the readable reference (`nn.Linear` + `scaled_dot_product_attention`).
`apply_kernels(model)` swaps, in place and sharing the same Parameters (state dict, weight
tying, checkpoints and LoRA unchanged):

- every `nn.Linear` -> `SplitLinear` (`split_linear.py`): two-core matrix-vector products
  when decoding a few rows in fp32 on the CPU;
- every `CausalSelfAttention` -> `BlockedCausalSelfAttention` (`blocked_attention.py`):
  blocked causal attention with a hand-written backward for bf16 training on the CPU;
- the LM head -> `FusedLMHead` (`linear_cross_entropy.py`): `lm_head_loss` then computes
  head + cross-entropy chunk by chunk, never holding the full logits.

Each kernel decides per call whether it pays (its module docstring says when) and falls
back to the plain computation otherwise, so a kernel model computes what the reference
computes, up to float rounding (`tests/test_kernels.py`). `malloc.py` holds the one
process-wide setting (glibc keeps freed memory), which the training and bench commands
apply.

The CLI, trainer, server and bench apply the kernels by default; `--no-kernels` (or
`kernels = false` in a config) gives the reference model.
"""

from __future__ import annotations

import torch.nn as nn

from ..models.attention import CausalSelfAttention
from .blocked_attention import BlockedCausalSelfAttention, blocked_causal_attention
from .linear_cross_entropy import FusedLMHead, fused_lm_loss, lm_head_loss
from .malloc import release_freed_memory, reuse_freed_memory
from .split_linear import SplitLinear

KERNEL_MODULES = (SplitLinear, BlockedCausalSelfAttention)


def apply_kernels(model: nn.Module) -> nn.Module:
    """Swap the kernels into a built model, in place (see the module docstring).

    Only modules of exactly the reference types are swapped, so calling it twice, or on a
    model already quantized (`Int8Linear`) or LoRA-wrapped, is safe: what is not a plain
    `nn.Linear` or `CausalSelfAttention` is left as it is. Works on any device and dtype.

    Args:
        model: a `GPT` (or any module holding `nn.Linear` / `CausalSelfAttention`s).

    Returns:
        The same model.
    """
    # linears first: the new attention modules then share the already-swapped projections
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                cls = FusedLMHead if parent is model and name == "lm_head" else SplitLinear
                setattr(parent, name, cls.from_linear(child))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is CausalSelfAttention:
                setattr(parent, name, BlockedCausalSelfAttention.from_attention(child))
    return model


def has_kernels(model: nn.Module) -> bool:
    """Whether any kernel module is in `model` (False for a reference `GPT(config)`)."""
    return any(isinstance(m, KERNEL_MODULES) for m in model.modules())


__all__ = [
    "BlockedCausalSelfAttention",
    "FusedLMHead",
    "SplitLinear",
    "apply_kernels",
    "blocked_causal_attention",
    "fused_lm_loss",
    "has_kernels",
    "lm_head_loss",
    "release_freed_memory",
    "reuse_freed_memory",
]
