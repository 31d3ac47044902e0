"""`SplitLinear`: `nn.Linear` with a faster CPU path for decoding a few tokens in fp32.

Decoding multiplies each weight by a handful of rows (one new token per sequence), so the
matmul is really a matrix-vector product, limited by how fast the weight streams from
memory. Measured on a 2-core AVX-512 CPU (torch 2.13, MKL), `F.linear` in fp32 reads a
weight at about 16 GB/s there: the matrix-vector kernel runs on one core, over the
`(out, in)` layout it streams slowest.

Splitting the output rows into two halves and doing them as one two-batch `bmm` (views,
no copy) uses both cores: for the GPT-2 shapes, 39-60 GB/s at one row (as matrix times
vector per half), 18-20 GB/s at eight rows (as rows times the transposed half, which is
faster there), against 11-23 GB/s for `F.linear`, and nothing gained from 32 rows on,
where the ordinary matmul kernel takes over.

On an Intel Xeon with AMX, though, the same split halved batch-1 fp32 decoding (issue 29):
there `F.linear`'s own kernel already uses both cores. So the split is only a candidate:

- It applies (`use_split`) to at most `SPLIT_MAX_ROWS` rows, on the CPU, fp32 input and
  weight, a contiguous weight of more than one row, and autograd off. Everything else
  (bf16, which gains nothing from it; training; long prompts; GPUs) is plain `F.linear`.
- Where it applies, `SplitLinear` takes it only if `split_wins` measured it faster than
  `F.linear` on this machine for that weight shape and row class (one row, or 2 to
  `SPLIT_MAX_ROWS`; see `choice.py`), or when forced (`apply_kernels(model, force=True)`).
- It is measured where its weight will be read from: a model whose weights outgrow the
  CPU's last-level cache streams every weight from memory at each token, so the
  measurement cycles through copies of the weight that together are twice that cache
  (`residency`). Timing one weight over and over instead keeps it in cache, where the
  split gains nothing: measured that way, on an AMD EPYC under load, every gpt2-124m
  projection chose `F.linear`, and batch-1 fp32 decoding ran at half its forced speed.

The result equals `F.linear` up to float summation order (`tests/test_kernels.py`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .choice import choose, isolated_rng, last_level_cache_bytes

SPLIT_MAX_ROWS = 8


def use_split(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight)` takes the two-core split path (see the module docstring)."""
    if x.dtype != torch.float32:  # first: a bf16 or int8 model's every linear stops here
        return False
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (0 < rows <= SPLIT_MAX_ROWS and x.device.type == "cpu" and weight.dtype == torch.float32
            and weight.is_contiguous() and weight.shape[0] > 1 and not torch.is_grad_enabled())


def _split_linear(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x2d @ weight.T` as a two-batch bmm over the halves of `weight`'s rows.

    Args:
        x2d: `(rows, in)`; weight: `(out, in)`, contiguous.

    Returns:
        `(rows, out)`.
    """
    out_f, in_f = weight.shape
    half = out_f // 2
    rows = x2d.shape[0]
    w = weight[: 2 * half].view(2, half, in_f)  # the two halves, no copy
    if rows == 1:  # (2, half, in) @ (2, in, 1): the matrix-vector form, fastest for one row
        y = torch.bmm(w, x2d.t().unsqueeze(0).expand(2, in_f, 1)).view(1, 2 * half)
    else:  # (2, rows, in) @ (2, in, half)
        y = torch.bmm(x2d.unsqueeze(0).expand(2, rows, in_f), w.transpose(1, 2))
        y = y.transpose(0, 1).reshape(rows, 2 * half)
    if out_f % 2:  # an odd row count (GPT-2's 50257-token head): the last row on its own
        y = torch.cat([y, F.linear(x2d, weight[2 * half:])], dim=1)
    return y


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` through the two-core split (for inputs `use_split` accepts).

    Args:
        x: `(..., in)`; weight: `(out, in)`; bias: `(out,)` or None.

    Returns:
        `(..., out)`.
    """
    rows = x.numel() // x.shape[-1]
    y = _split_linear(x.reshape(rows, x.shape[-1]), weight)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


def residency(working_set: int) -> str:
    """Where a model whose weights take `working_set` bytes reads them from at each token:
    `"cache"` if they fit in the last-level cache, else `"memory"`."""
    return "cache" if working_set <= last_level_cache_bytes() else "memory"


def split_wins(weight: torch.Tensor, rows: int, working_set: int = 0) -> bool:
    """Whether the split beats `F.linear` on this machine for `weight`'s shape and dtype at
    `rows` rows' class (1, or 2 to `SPLIT_MAX_ROWS`, measured at the class's largest) and
    the model's `residency` (`working_set`: its weights' bytes; 0 = just this weight):
    measured once, then cached (`choice.choose`). From memory, each call reads the next of
    several copies of the weight that together are twice the last-level cache."""
    return split_decision(weight, rows, working_set)[1]


def split_decision(weight: torch.Tensor, rows: int, working_set: int = 0) -> tuple[str, bool]:
    """`split_wins`'s decision with its shape class (`split_key`): `(key, use)`."""
    rows = 1 if rows == 1 else SPLIT_MAX_ROWS
    place = residency(working_set or weight.numel() * weight.element_size())
    key = split_key(weight, rows, place)
    with isolated_rng(weight.device):
        x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    w = weight.detach()
    copies = [w]  # the copies are made only if this measures (not for a cached decision)

    def cycling(fn):
        turn = [0]

        def run():
            if place == "memory" and len(copies) == 1:
                nbytes = max(1, w.numel() * w.element_size())
                copies.extend(w.clone() for _ in range(min(63, -(-2 * last_level_cache_bytes() // nbytes) - 1)))
            turn[0] = (turn[0] + 1) % len(copies)
            return fn(x, copies[turn[0]])
        return run

    return key, choose(key, cycling(_split_linear), cycling(F.linear))


def split_key(weight: torch.Tensor, rows: int, place: str = "cache") -> str:
    """The shape class of a split decision, e.g.
    `"split_linear float32 768x3072 rows=1 from memory"`."""
    dtype = str(weight.dtype).removeprefix("torch.")
    return (f"split_linear {dtype} {weight.shape[0]}x{weight.shape[1]} "
            f"rows={'1' if rows == 1 else f'2-{SPLIT_MAX_ROWS}'} from {place}")


class SplitLinear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict) whose forward takes the split path
    where it applies and was measured to win (or `force` is set), else `F.linear`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.force = False  # take the split wherever it applies, without measuring
        self.working_set = 0  # bytes of the whole model's weights (apply_kernels sets it)
        self.chosen: dict[tuple, tuple[str, bool]] = {}  # (dtype, one row) -> (key, use)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_split(x, self.weight) and self.split_pays(x):
            return split_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def split_pays(self, x: torch.Tensor) -> bool:
        """Forced, or measured faster for this input's row class (`split_wins`, looked up
        once per module and class)."""
        if self.force:
            return True
        rows = x.numel() // x.shape[-1]
        cls = (x.dtype, rows == 1)
        if cls not in self.chosen:
            self.chosen[cls] = split_decision(self.weight, rows, self.working_set)
        return self.chosen[cls][1]

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "SplitLinear":
        """A `cls` sharing `lin`'s Parameters (so a tied weight stays tied), built without
        allocating or initializing weights of its own."""
        with torch.device("meta"):
            new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None)
        new.weight = lin.weight
        new.bias = lin.bias
        return new
