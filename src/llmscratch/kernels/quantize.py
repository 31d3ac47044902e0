"""Lower-precision weights for inference: bf16, or int8 weight-only quantization.

Decoding one token at a time reads every weight once per token and does little arithmetic
with it, so its speed is set by how many bytes the weights take and how fast the kernel
streams them. bf16 halves the bytes of fp32; int8 halves them again.

int8 here is weight-only and symmetric, one scale per output channel (row of the weight):

    scale[o] = max_i |W[o, i]| / 127,     Wq[o, i] = round(W[o, i] / scale[o])  in [-127, 127]

Activations stay in bf16 and the matmul dequantizes on the fly (`torch._weight_int8pack_mm`
on the CPU, a plain dequantize-then-matmul elsewhere). Embeddings and LayerNorms stay bf16;
the LM head gets its own int8 copy of the (tied) token embedding.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UserError
from ..models.gpt import GPT


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 quantization.

    Args:
        weight: `(out, in)` float matrix.

    Returns:
        `(q, scale)`: `(out, in)` int8 and `(out,)` fp32, with `q * scale[:, None] ≈ weight`.
    """
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _int8pack_available(device: torch.device, in_features: int) -> bool:
    """The CPU int8 kernel, for widths it computes correctly: with torch 2.13 it returns
    garbage (or crashes) unless the input width is a multiple of 32 (e.g. a SwiGLU
    intermediate size of 217), so other widths take the dequantize-then-matmul path."""
    return device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm") and in_features % 32 == 0


class Int8Linear(nn.Module):
    """A frozen `nn.Linear` with int8 weights and per-output-channel scales, for inference."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        q, scale = quantize_weight_int8(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", q)  # (out, in) int8
        self.register_buffer("scale", scale.to(compute_dtype))  # (out,)
        bias = None if linear.bias is None else linear.bias.detach().to(compute_dtype)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.scale.dtype).contiguous()  # (N, in)
        if _int8pack_available(x2.device, self.in_features):
            y = torch._weight_int8pack_mm(x2, self.weight, self.scale)  # (N, out)
        else:
            y = x2 @ (self.weight.to(x2.dtype) * self.scale[:, None]).t()
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


def quantize_int8(model: GPT, compute_dtype: torch.dtype = torch.bfloat16) -> GPT:
    """Turn a trained model into an inference-only int8 model, in place.

    Every linear layer of the blocks and the LM head become `Int8Linear`; everything else
    (embeddings, LayerNorms, the KV cache) moves to `compute_dtype`. Returns the model, in
    eval mode. It can no longer be trained or saved as a checkpoint.
    """
    if getattr(getattr(model, "config", None), "logit_softcap", None) is not None:
        raise UserError("int8 weights do not support a model with logit soft-capping yet; use bf16 or fp32")
    model.eval()
    head = model.lm_head
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, Int8Linear(child, compute_dtype))
    del head  # the tied head's int8 copy is separate from wte, which embeddings still use
    model.to(compute_dtype)  # LayerNorms, embeddings; int8 buffers keep their dtype
    model.quantized = "int8"
    return model
