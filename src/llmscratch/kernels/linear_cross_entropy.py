"""The LM head and its cross-entropy fused: the training loss without the full logits.

A language model's loss multiplies every position's hidden state by the `(vocab, C)` head
and takes the cross-entropy of the result. Done plainly (`lm_loss(model.lm_head(hidden),
targets)`) that materializes `(B*T, vocab)` logits in fp32 several times over (logits,
log-softmax, its gradient): for gpt2-124m at 8 x 1024 tokens, 1.6 GB per copy.
`fused_lm_loss` computes the same mean loss and its gradients chunk by chunk, never holding
more than one chunk of logits (`_LinearCrossEntropy` explains how, and why it is faster on
the CPU too).

When it is taken: `lm_head_loss(model, hidden, targets)` uses it when `apply_kernels` gave
the model a `FusedLMHead` (in every precision and on every device: it is exact up to float
rounding) and `fused_wins` measured its forward + backward faster than the plain loss on
this machine for that head shape, compute dtype and row count (`choice.py`; measured at
the batch's rows rounded up to a power of two, `measure_rows`: the plain loss's cost is
its memory traffic, which grows with the rows, so a decision taken at 256 rows chose the
plain loss where, at a training step's 2048 rows, the fused one made the whole step 20%
faster), or the head is forced (`apply_kernels(model, force=True)`); the plain `lm_loss`
of the head's logits otherwise (a reference model, a classifier head, a LoRA-wrapped head).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models.gpt import lm_loss
from .choice import choose, isolated_rng
from .split_linear import SplitLinear

MIN_MEASURE_ROWS, MAX_MEASURE_ROWS = 256, 4096


def measure_rows(rows: int) -> int:
    """The row count a decision for `rows` rows is measured at: the next power of two,
    between 256 and 4096 (beyond it the plain loss only loses more)."""
    return min(MAX_MEASURE_ROWS, max(MIN_MEASURE_ROWS, 1 << max(0, rows - 1).bit_length()))


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` without ever holding all the logits.

    Rows are processed in chunks: logits of one chunk, their softmax, the loss, and at once
    the gradient (softmax - one_hot), which is all backward needs. Peak memory is one chunk
    of logits instead of `(N, vocab)` in fp32 several times over (logits, log-softmax, and
    its gradient), and the full logits never travel through memory at all.

    Three details make it fast on the CPU (measured at gpt2-124m, 1024 rows, bf16):
    - The softmax runs on the logits in the compute dtype (the kernel accumulates in fp32)
      and becomes the gradient in place: one pass instead of six over fp32 logits.
    - The loss needs each row's log-sum-exp, which comes from the softmax's largest entry:
      `lse = max - log(p_max)`. `p_max >= 1/vocab` never underflows, so in bf16 this is
      within 0.002 of the fp32 value per row; no extra pass over the logits.
    - The vocabulary is padded to a multiple of 64 rows inside the compute copy of the
      weight (GPT-2's 50257 -> 50304; the padding logits are -inf): oneDNN's bf16
      weight-gradient matmul runs about 20% faster on the padded shape.
    The per-row loss weight `1/count` is folded into the small `(n, C)` operands rather
    than applied to the `(n, vocab)` gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_rows: int):
        dtype = hidden.dtype
        V, C = weight.shape
        Vp = -(-V // 64) * 64
        w = hidden.new_empty((Vp, C))  # the compute copy (bf16 under autocast), padded
        w[:V].copy_(weight)
        w[V:].zero_()
        valid_all = targets != ignore_index
        count = valid_all.sum().clamp(min=1).to(torch.float32)
        row_scale = valid_all.to(torch.float32) / count  # d(mean loss)/d(row loss)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        d_hidden = torch.empty_like(hidden)
        d_weight = None
        for s in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[s:s + chunk_rows], targets[s:s + chunk_rows]  # (n, C), (n,)
            valid, scale = valid_all[s:s + chunk_rows], row_scale[s:s + chunk_rows, None]
            t = t.masked_fill(~valid, 0)[:, None]
            logits = h @ w.t()  # (n, Vp)
            if Vp > V:
                logits[:, V:] = float("-inf")
            top, top_idx = logits.max(dim=-1, keepdim=True)
            target_logit = logits.gather(1, t)
            probs = torch.softmax(logits, dim=-1)  # (n, Vp); the logits are not needed again
            del logits
            lse = top.float() - probs.gather(1, top_idx).float().log()
            total += ((lse - target_logit.float()).squeeze(1) * valid).sum()
            probs.scatter_add_(1, t, probs.new_full(t.shape, -1.0))  # softmax - one_hot
            d_hidden[s:s + chunk_rows] = (probs @ w) * scale.to(dtype)  # (n, C)
            dw = probs.t() @ (h * scale.to(dtype))  # (Vp, C)
            if d_weight is None:
                d_weight = dw[:V].to(weight.dtype)
            else:
                d_weight += dw[:V]
        ctx.save_for_backward(d_hidden, d_weight)
        return total / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("fused_lm_loss: backward can run only once per forward (retain_graph is not supported)")
        ctx.consumed = True
        d_hidden, d_weight = ctx.saved_tensors
        # scaled in place: these buffers are ours, and backward runs once per forward
        return d_hidden.mul_(grad_out.to(d_hidden.dtype)), d_weight.mul_(grad_out), None, None, None


def fused_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  ignore_index: int = -100, chunk_elements: int = 2**26) -> torch.Tensor:
    """`lm_loss(hidden @ weight.T, targets)` computed chunk by chunk (see `_LinearCrossEntropy`).

    Args:
        hidden: `(B, T, C)` final hidden states (`model.hidden_states(idx)`).
        weight: `(V, C)` LM head weight (`model.lm_head.weight`).
        targets: `(B, T)` ids, `ignore_index` where no loss is wanted.
        chunk_elements: logits held at once (rows x vocab); 2**26 is 256 MB in fp32.
            Fewer, larger chunks are faster (each chunk adds its share of the weight
            gradient into one fp32 buffer); smaller ones save memory.

    Returns:
        The mean loss over the non-ignored targets (a scalar), with gradients for
        `hidden` and `weight`.
    """
    C = hidden.shape[-1]
    hidden = hidden.to(compute_dtype(hidden))
    rows = max(1, chunk_elements // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden.reshape(-1, C), weight, targets.reshape(-1), ignore_index, rows)


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's where it is on, else `hidden`'s."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return hidden.dtype


def fused_key(hidden: torch.Tensor, weight: torch.Tensor) -> str:
    """The class of a fused-loss decision, e.g.
    `"fused_lm_loss bfloat16 vocab=50257 C=768 rows<=1024"`."""
    rows = measure_rows(hidden.numel() // hidden.shape[-1])
    return (f"fused_lm_loss {str(compute_dtype(hidden)).removeprefix('torch.')} vocab={weight.shape[0]} "
            f"C={weight.shape[1]} rows<={rows}")


def fused_wins(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `fused_lm_loss`'s forward + backward beats the plain head + `lm_loss` on this
    machine for `weight`'s shape, the compute dtype and `hidden`'s row count, measured once at
    `measure_rows` rows on copies (the real weight's gradient is not touched), then cached
    (`choice.choose`)."""
    rows = measure_rows(hidden.numel() // hidden.shape[-1])
    with isolated_rng(hidden.device):
        h = torch.randn(1, rows, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device,
                        requires_grad=True)
        y = torch.randint(0, weight.shape[0], (1, rows), device=hidden.device)
    w = weight.detach().clone().requires_grad_()

    def step(loss_of):
        def run():
            with torch.enable_grad():
                loss_of().backward()
            h.grad = w.grad = None
            if h.device.type != "cpu":  # a GPU runs asynchronously: time the work, not the launch
                torch.accelerator.synchronize(h.device)
        return run

    return choose(fused_key(hidden, weight), step(lambda: fused_lm_loss(h, w, y)),
                  step(lambda: lm_loss(torch.nn.functional.linear(h, w), y)))


class FusedLMHead(SplitLinear):
    """The LM head (a `SplitLinear`, so decoding keeps its two-core path where it wins) that
    `lm_head_loss` computes the loss of with `fused_lm_loss` where `fused_pays`. Same
    parameters and state dict as the `nn.Linear` it replaces."""

    def fused_pays(self, hidden: torch.Tensor) -> bool:
        """Forced, or measured faster for this compute dtype and row count (`fused_wins`,
        once per class)."""
        if self.force:
            return True
        cls = ("loss", compute_dtype(hidden), measure_rows(hidden.numel() // hidden.shape[-1]))
        if cls not in self.chosen:
            self.chosen[cls] = (fused_key(hidden, self.weight), fused_wins(hidden, self.weight))
        return self.chosen[cls][1]


def lm_head_loss(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                 ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy of `model.lm_head(hidden)`, fused where it pays.

    Args:
        model: a `GPT` (anything with an `lm_head`).
        hidden: `(B, T, C)` final hidden states (`model.hidden_states(idx)`).
        targets: `(B, T)` ids, `ignore_index` where no loss is wanted.

    Returns:
        The scalar mean loss over the non-ignored targets: `fused_lm_loss` when the head is
        a `FusedLMHead` (see `apply_kernels`) that `fused_pays`, else `lm_loss` of the full
        logits. The two are equal up to float rounding, gradients included.
    """
    head = model.lm_head
    if isinstance(head, FusedLMHead) and head.bias is None and head.fused_pays(hidden):
        return fused_lm_loss(hidden, head.weight, targets, ignore_index)
    return lm_loss(head(hidden), targets, ignore_index)
