"""Checks and reads on 1-D token ids, shared by the token storage and the batch samplers.

Token ids arrive as a numpy array, a read-only memmap of a whole corpus, a torch tensor or a
list; these helpers accept all of them without copying, and say in one line what is wrong.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from .shards import ShardedTokens


def as_1d(ids, what: str = "ids"):
    """Accept a 1-D numpy array / memmap / torch tensor / list of token ids, without copying
    arrays. Lists become int64 arrays."""
    if isinstance(ids, torch.Tensor):
        arr = ids
    elif isinstance(ids, (np.ndarray, ShardedTokens)):  # shards: read on demand, never loaded whole
        arr = ids
    else:
        arr = np.asarray(ids, dtype=np.int64)
    if arr.ndim != 1:
        raise UserError(f"{what} must be a 1-D sequence of token ids, got shape {tuple(arr.shape)}")
    return arr


def check_positive(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")


def check_length(n_tokens: int, context_length: int, what: str = "corpus") -> None:
    if n_tokens < context_length + 1:
        raise UserError(
            f"{what} has {n_tokens} tokens; need at least context_length+1 = {context_length + 1}"
            " (use more text or a shorter context_length)"
        )


def gather_windows(ids, starts: np.ndarray, length: int) -> torch.Tensor:
    """Rows `ids[s : s + length]` for each start, as an int64 tensor of shape (len(starts), length).

    Fancy indexing reads exactly those tokens from a memmap, and converting to int64 here
    (not in torch) avoids torch's limited support for uint16 tensors.
    """
    index = starts[:, None] + np.arange(length)[None, :]  # (n, length)
    if isinstance(ids, torch.Tensor):
        return ids[torch.from_numpy(index)].long()
    return torch.from_numpy(np.asarray(ids[index], dtype=np.int64))
