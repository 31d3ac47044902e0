"""LoRA: low-rank adapters, so fine-tuning trains a few percent of the weights.

A frozen linear layer `y = x W^T + b` gets a trainable bypass of rank r:

    y = x W^T + b + (alpha / r) * (x A^T) B^T        A: (r, in), B: (out, r)

`A` starts random and `B` starts at zero, so the adapted model begins exactly where the
base model is and training moves it through the low-rank update `B A` only. Because the
update is just a matrix, it can be folded back into `W` (`merge_lora`), after which the
model is a plain `GPT` again: it saves, loads and generates like any run folder, with no
LoRA code needed at inference.

The adapters go on GPT-2's attention and MLP projections: `attn.c_attn`, `attn.c_proj`,
`mlp.c_fc` and `mlp.c_proj` in every block.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import UserError

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
"""The sub-modules of each block that receive an adapter."""


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update `(alpha / rank) * B @ A`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank <= 0:
            raise UserError(f"--lora-rank must be positive, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scale = alpha / rank
        dev, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dtype))
        # Kaiming-uniform A (as nn.Linear inits its weight) and zero B: the product starts
        # at zero, so the adapted model's output equals the base model's before training.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` whose weight is `W + scale * B @ A` (same outputs)."""
        base = self.base
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(base.weight + self.scale * (self.lora_B @ self.lora_A))
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out


def _get_parent(model: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = dotted.rpartition(".")
    return model.get_submodule(parent_name), attr


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=TARGETS) -> list[str]:
    """Freeze every weight of `model`, then wrap the target projections in `LoRALinear`.

    Args:
        model: a `GPT` (blocks under `model.h`); changed in place.
        rank: the adapters' rank r (e.g. 8 or 16).
        alpha: scale numerator; the update is multiplied by alpha / r.
        targets: sub-module paths inside each block.

    Returns:
        The dotted names of the wrapped modules.

    A module the caller wants trainable besides the adapters (a classification head)
    should have `requires_grad` switched back on after this call.
    """
    if rank <= 0:
        raise UserError(f"--lora-rank must be positive, got {rank}")
    if alpha <= 0:
        raise UserError(f"--lora-alpha must be positive, got {alpha}")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for i, _block in enumerate(model.h):
        for t in targets:
            name = f"h.{i}.{t}"
            parent, attr = _get_parent(model, name)
            layer = getattr(parent, attr)
            if isinstance(layer, LoRALinear):
                raise UserError(f"{name} already has a LoRA adapter")
            setattr(parent, attr, LoRALinear(layer, rank, alpha))
            wrapped.append(name)
    return wrapped


def merge_lora(model: nn.Module) -> int:
    """Fold every `LoRALinear` in `model` back into a plain `nn.Linear`, in place.

    After merging, the state dict has exactly GPT-2's parameter names again.

    Returns:
        How many adapters were merged.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        parent, attr = _get_parent(model, name)
        setattr(parent, attr, getattr(parent, attr).merged())
    return len(names)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())
