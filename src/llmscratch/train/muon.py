"""Muon: momentum whose update is orthogonalised, for the hidden weight matrices.

AdamW scales each weight's update by its own gradient history. For a weight *matrix* the
gradient (and its momentum) is usually dominated by a few directions: a handful of large
singular values. Muon (Keller Jordan, 2024; used by modded-nanogpt and nanochat) replaces
the momentum matrix `M = U S V^T` by its orthogonal factor `U V^T` before stepping, so
every direction the gradient points in moves by the same amount and rare directions are
not drowned out. Computing `U V^T` with an SVD is slow; a few Newton–Schulz iterations of
an odd polynomial `p(X) = aX + b(XX^T)X + c(XX^T)^2 X` push every singular value of
`X / ||X||` towards 1 with matmuls only (`newton_schulz`).

Only 2-D weights inside the blocks get Muon. Embeddings, the LM head (tied to the
embedding in GPT-2) and every vector (biases, norm gains) keep AdamW: an embedding row is
updated only when its token occurs, which is not what orthogonalising a whole matrix
assumes. One `Muon` optimizer holds both kinds of parameter groups, so the training loop,
its learning-rate schedule and its checkpoints see a single optimizer.

The update is scaled by `0.2 * sqrt(max(rows, cols))` (Moonshot AI's "Muon is scalable",
2025), which gives it the root-mean-square size of a typical AdamW update: the same
learning rate and schedule then suit both groups, and a run switches optimizer with one
flag.
"""

from __future__ import annotations

import math

import torch

# The quintic's coefficients from Keller Jordan's Muon: chosen to make the slope at 0 as
# steep as possible (fast growth of small singular values) while the iterates stay in about
# [0.7, 1.2] rather than converging exactly to 1, which five steps could not do anyway.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately the orthogonal factor `U V^T` of `g = U S V^T`.

    Args:
        g: a `(rows, cols)` matrix.
        steps: Newton–Schulz iterations.

    Returns:
        A matrix of `g`'s shape and dtype whose singular values lie near 1 (about 0.7–1.2)
        and whose singular vectors are `g`'s.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    transposed = x.shape[0] > x.shape[1]
    if transposed:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + eps)  # Frobenius norm >= spectral norm: all singular values <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.T
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for the groups marked `muon=True`, AdamW for the others, in one optimizer.

    Build it with `muon_param_groups(model, weight_decay)`. A Muon group's step, for a
    matrix `W` with gradient `G`:

        B <- momentum * B + G                 (momentum buffer)
        N <- G + momentum * B                 (Nesterov)
        W <- W * (1 - lr * weight_decay) - lr * 0.2 * sqrt(max(rows, cols)) * NS(N)

    An AdamW group's step is PyTorch's AdamW (decoupled weight decay, bias correction).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.95,
                 ns_steps: int = 5):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, muon=False,
                        momentum=momentum, ns_steps=ns_steps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups hold 2-D weight matrices only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            step_fn = self._muon_step if group["muon"] else self._adamw_step
            for p in group["params"]:
                if p.grad is not None:
                    step_fn(p, group)
        return loss

    def _muon_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf, mu = state["momentum_buffer"], group["momentum"]
        buf.mul_(mu).add_(p.grad)
        update = newton_schulz(p.grad.add(buf, alpha=mu), group["ns_steps"])
        scale = 0.2 * math.sqrt(max(p.shape))
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update, alpha=-group["lr"] * scale)

    def _adamw_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = state["step"].item()
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(p.grad, 1 - beta1)  # m <- beta1 m + (1 - beta1) g
        v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (v / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** t))


def muon_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups for `Muon`: the blocks' 2-D weights get Muon (with weight decay);
    embeddings and the LM head get AdamW with weight decay; vectors AdamW without."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if head is not None:
        embeddings.add(id(head.weight))
    muon, adam_decay, adam_no_decay, seen = [], [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2:
            adam_no_decay.append(p)
        elif id(p) in embeddings or p.dim() != 2:
            adam_decay.append(p)
        else:
            muon.append(p)
    groups = [{"params": muon, "muon": True, "weight_decay": weight_decay},
              {"params": adam_decay, "weight_decay": weight_decay},
              {"params": adam_no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
