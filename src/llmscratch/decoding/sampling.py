"""Sampling: pick the next token from a model's logits.

`Sampling` holds one generation's settings (temperature, top-k, top-p, seed) and is the one
place they are checked (`check_sampling`): the CLI, `chat`, the server's requests and every
decoding path build one. `sample` is the same draw as a plain function on logits, knowing
nothing about models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError


class SamplingError(UserError):
    """A sampling setting out of range; `param` names it (`temperature`, `top_k`, `top_p`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def check_sampling(temperature: float | None = 0.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """The one check of sampling settings (`Sampling` runs it when made, `sample` per call).

    Valid: `temperature` a finite number >= 0 (0 = greedy) or None; `top_k` an integer >= 0
    (0 or None = off); `top_p` a number in (0, 1] (1 or None = off).

    Raises:
        SamplingError: one line naming the setting and the value given.
    """
    def is_number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if temperature is not None and not (is_number(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise SamplingError("temperature", f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0):
        raise SamplingError("top_k", f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if top_p is not None and not (is_number(top_p) and 0 < top_p <= 1):
        raise SamplingError("top_p", f"top_p must be in (0, 1] (1 = off), got {top_p!r}")


@dataclass(frozen=True)
class Sampling:
    """How one generation picks its tokens; checked when made (`check_sampling`).

    Args:
        temperature: 0 (or None) is greedy (argmax); higher is more random.
        top_k: sample from the k likeliest tokens only (0 or None = off).
        top_p: sample from the smallest set of tokens whose probability reaches p (1 or
            None = off).
        seed: seeds a private generator (`generator`), so the same call gives the same
            tokens and the global random state is left alone.

    Raises:
        SamplingError: a setting out of range.
    """

    temperature: float | None = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p)

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        """A fresh generator seeded with `seed` (None without a seed: the global one)."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """`(B,)` next-token ids from `(B, V)` logits with these settings."""
        return _draw(logits, self.temperature, self.top_k, self.top_p, generator)


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from `(B, V)` logits; returns `(B,)` ids.

    temperature 0 is greedy (argmax). Otherwise logits are divided by the temperature,
    restricted to the `top_k` most likely tokens and/or the smallest set whose probability
    reaches `top_p`, and one token is drawn.

    Raises:
        SamplingError: a setting out of range (`check_sampling`).
    """
    check_sampling(temperature, top_k, top_p)
    return _draw(logits, temperature, top_k, top_p, generator)


TINY_TEMPERATURE = 1e-4
"""Below this temperature `_draw` scales the logits in float64 after shifting the largest to
0, so a temperature as small as 5e-324 samples (all but greedily) instead of failing."""


def _draw(logits, temperature, top_k, top_p, generator) -> torch.Tensor:
    """`sample` without the check (for settings a `Sampling` has already checked)."""
    if temperature is None or temperature <= 0.0:
        return logits.argmax(dim=-1)
    if temperature < TINY_TEMPERATURE:
        # logits / 1e-40 overflows float32 (inf - inf = nan in the softmax) and 1e-46 is 0
        # there: shift the largest logit to 0 first and divide in float64, so the likeliest
        # tokens get probability ~1 (ties share it) and the rest underflow to 0
        logits = logits.float()
        logits = ((logits - logits.amax(dim=-1, keepdim=True)).double() / temperature).float()
    else:
        logits = logits.float() / temperature
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0.0 < top_p < 1.0 and probs.device.type == "cpu":
        # a lower bound on the nucleus's size: no token has more than the row's largest
        # probability (a flat row, as random weights give, goes straight to the sort)
        top = float(probs.amax(dim=-1).min())
        need = math.ceil(top_p / top) if top > 0 else probs.shape[-1]
        for k in NUCLEUS_CANDIDATES:
            if k >= probs.shape[-1]:
                break
            if k < need:
                continue
            nucleus, need = _nucleus_in_top(probs, top_p, k)
            if nucleus is not None:
                return _draw_within(probs, nucleus, generator)
    if top_p is not None and 0.0 < top_p < 1.0:
        probs = _nucleus_by_sort(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


NUCLEUS_CANDIDATES = (256, 4096)
"""Candidate-set sizes `_draw` tries for top-p before sorting the whole vocabulary: the
nucleus is looked for among the `k` likeliest tokens (`torch.topk`, linear in the vocabulary)
and the full sort runs only when it is not provably inside them (or cannot be: a flat
distribution, as a model with random weights gives, goes straight to the sort). CPU only:
the proof needs `cumsum` to be a sequential scan, which it is on the CPU and not on a GPU,
where the full sort runs as before."""


def _nucleus_by_sort(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` with every token outside the nucleus of mass `top_p` set to 0 (the full sort)."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    # drop a token when the tokens ranked above it already reach top_p; the first
    # token always survives because the mass above it is 0
    drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    drop[..., 0] = False  # a top_p below float32's smallest number (1e-50) is 0 there
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def _nucleus_in_top(probs: torch.Tensor, top_p: float, k: int) -> tuple[list[torch.Tensor] | None, int]:
    """Each row's nucleus (token ids, ascending) found among its `k` likeliest tokens, or None
    when some row's nucleus is not provably the one `_nucleus_by_sort` keeps; with it, a lower
    bound on the nucleus's size (the mass still missing over the k-th probability).

    `topk`'s values are the first `k` values of the full descending sort, so the cumulative
    sums over them (a sequential scan) and the drop rule give the same verdicts for those
    ranks. The nucleus is exactly the first `m` ranks when rank `k` is dropped (the verdicts
    are monotone, so every later rank is too), the row is finite, and the last kept value is
    strictly above the first dropped one: then the nucleus is "every token above that value",
    the same set whatever order the sort gives tied tokens. Otherwise: None (sort in full).
    """
    values, ids = torch.topk(probs, k, dim=-1)
    if not bool(torch.isfinite(values[:, 0]).all()):
        return None, k + 1  # nan/inf: the full path raises multinomial's own error
    cum = values.cumsum(dim=-1)
    drop = (cum - values) >= top_p
    drop[:, 0] = False
    if not bool(drop[:, -1].all()):  # the nucleus may reach past the k candidates
        missing = float((top_p - cum[:, -1]).max())
        smallest = float(values[:, -1].min())
        return None, (k + math.ceil(missing / smallest) if smallest > 0 and missing > 0 else k + 1)
    kept = (~drop).sum(dim=-1)  # (B,): m, 1 <= m < k
    rows = torch.arange(values.shape[0], device=values.device)
    if bool((values[rows, kept - 1] == values[rows, kept]).any()):
        return None, k + 1  # a tie across the boundary: which tied tokens stay is the sort's choice
    return [ids[b, : int(kept[b])].sort().values for b in range(values.shape[0])], 1


def _draw_within(probs: torch.Tensor, nucleus: list[torch.Tensor], generator) -> torch.Tensor:
    """The token `torch.multinomial` draws from `probs` zeroed outside `nucleus`, computed
    only over the nucleus.

    For one sample `torch.multinomial` takes the argmax of `p / q` over the whole row, `q`
    an `Exp(1)` draw per token (`exponential_` on a tensor like `probs`): tokens outside the
    nucleus score 0. So: the same full-row noise (the generator advances as before), the same
    quotient on the nucleus, the first maximum in token order.
    """
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    for b, ids in enumerate(nucleus):
        out[b] = ids[torch.argmax(probs[b, ids] / q[b, ids])]
    return out


GREEDY = Sampling()
"""Greedy decoding: the likeliest token every time."""
