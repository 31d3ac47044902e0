"""Opt-in speed for a built model: faster kernels swapped in, the reference model untouched.

`GPT(config)` is the readable reference (`nn.Linear` + `scaled_dot_product_attention`).
`apply_kernels(model)` swaps, in place and sharing the same Parameters (state dict, weight
tying, checkpoints and LoRA unchanged):

- every fp32 `nn.Linear` -> `SplitLinear` (`split_linear.py`): two-core matrix-vector
  products when decoding a few rows in fp32 on the CPU (a model already in bf16 keeps its
  plain `nn.Linear`s: the split never runs there, so not even its wrapper is left in the way);
- every `CausalSelfAttention` -> `BlockedCausalSelfAttention` (`blocked_attention.py`):
  blocked causal attention with a hand-written backward for bf16 training on the CPU;
- the LM head -> `FusedLMHead` (`linear_cross_entropy.py`): `lm_head_loss` then computes
  head + cross-entropy chunk by chunk, never holding the full logits.

Each kernel decides per call whether it applies (its module docstring says where) and,
where it does, takes it only if it was measured faster than the computation it replaces on
this machine, for that shape class (`choice.py`: a few milliseconds the first time, then
cached per CPU model, CPU flags, threads and torch version under the cache folder). What a
kernel wins on one CPU it can lose on another (issue 29: the split linear halved batch-1
fp32 decoding on an Intel CPU with AMX), so nothing is assumed. Otherwise it falls back to
the plain computation, so a kernel model computes what the reference computes, up to float
rounding (`tests/test_kernels.py`). `malloc.py` holds the one process-wide setting (glibc
keeps freed memory), which the training and bench commands apply.

The CLI, trainer, server and bench apply the kernels by default (measured choice);
`--no-kernels` (or `kernels = false` in a config) gives the reference model, and an explicit
`--kernels` forces every applicable kernel on without measuring (`force=True`).
`kernel_path(model)` says which path each shape class took.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models.attention import CausalSelfAttention
from .choice import decisions
from .blocked_attention import BlockedCausalSelfAttention, blocked_causal_attention
from .linear_cross_entropy import FusedLMHead, fused_lm_loss, lm_head_loss
from .malloc import release_freed_memory, reuse_freed_memory
from .split_linear import SplitLinear

KERNEL_MODULES = (SplitLinear, BlockedCausalSelfAttention)


def apply_kernels(model: nn.Module, force: bool = False) -> nn.Module:
    """Swap the kernels into a built model, in place (see the module docstring).

    Only modules of exactly the reference types are swapped, so calling it twice, or on a
    model already quantized (`Int8Linear`) or LoRA-wrapped, is safe: what is not a plain
    `nn.Linear` or `CausalSelfAttention` is left as it is. Works on any device and dtype.

    Args:
        model: a `GPT` (or any module holding `nn.Linear` / `CausalSelfAttention`s).
        force: take every kernel wherever it applies, without measuring (the CLI's explicit
            `--kernels`); False (the default): only where measured faster on this machine.

    Returns:
        The same model.
    """
    if getattr(model, "quantized", None):  # int8 weights: no fp32 linear, and never trained
        return model  # (blocked attention serves training only): the reference's own code
    # linears first: the new attention modules then share the already-swapped projections
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                if parent is model and name == "lm_head":
                    setattr(parent, name, FusedLMHead.from_linear(child))
                elif child.weight.dtype == torch.float32:  # the split runs on fp32 weights only
                    setattr(parent, name, SplitLinear.from_linear(child))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is CausalSelfAttention:
                setattr(parent, name, BlockedCausalSelfAttention.from_attention(child))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, SplitLinear):
            m.working_set = weight_bytes  # where its weights are read from when decoding
        if isinstance(m, KERNEL_MODULES):
            m.force = force
            m.chosen.clear()  # decided again, in the new mode
    return model


def kernel_path(model: nn.Module) -> dict[str, str]:
    """Which path each shape class the model has met so far took: key -> `"kernel"` or
    `"reference"`, with `" (forced)"` or the measured speed-up. Empty for a reference model
    or before the first forward pass."""
    known = decisions()
    path = {}
    for m in model.modules():
        if isinstance(m, KERNEL_MODULES):
            for key, use in m.chosen.values():
                speedup = known.get(key, {}).get("speedup")
                path[key] = ("kernel" if use else "reference") + (f" ({speedup:.2f}x)" if speedup else "")
            if m.force:
                path[f"{type(m).__name__} (forced)"] = "kernel"
    return dict(sorted(path.items()))


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
    "kernel_path",
    "lm_head_loss",
    "release_freed_memory",
    "reuse_freed_memory",
]
