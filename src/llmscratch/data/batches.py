"""Batches for training and evaluation, in two styles.

- `SlidingWindowDataset` / `create_dataloader`: the book's GPTDatasetV1 idea, every window
  of `context_length` tokens at a fixed stride, through a torch DataLoader. Easy to read
  and to inspect in a notebook.
- `BatchSampler.get_batch(step)`: what the training loop uses. The batch is a pure function
  of (seed, step), which makes resuming and multi-GPU sharding exact.

`iter_eval_batches` walks non-overlapping windows in order for a validation loss.

Every sampler returns `(x, y)` int64 tensors where `y` is `x` shifted left by one token:
position t of `y` is the token the model must predict after seeing `x[..., : t + 1]`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from .ids import as_1d, check_length, check_positive, gather_windows

__all__ = ["BatchSampler", "SlidingWindowDataset", "create_dataloader", "iter_eval_batches"]


# --------------------------------------------------------------------------- sliding windows


class SlidingWindowDataset(Dataset):
    """Every window of `context_length` tokens, taken at a fixed `stride`.

    Item i starts at token `i * stride`: `x = ids[s : s + T]` and `y = ids[s + 1 : s + T + 1]`.
    A window is kept only if its last target token exists, so there are
    `(len(ids) - T - 1) // stride + 1` items. `stride == context_length` gives
    non-overlapping windows (each token is a target once per epoch); a smaller stride
    gives more, overlapping windows (more samples, and more overfitting).

    Example (ids 0..9, context_length 4, stride 4):
        item 0: x = [0, 1, 2, 3], y = [1, 2, 3, 4]
        item 1: x = [4, 5, 6, 7], y = [5, 6, 7, 8]

    Args:
        ids: 1-D token ids (numpy array, memmap, torch tensor or list). Not copied.
        context_length: T, tokens per window.
        stride: distance between window starts.
    """

    def __init__(self, ids, context_length: int, stride: int):
        check_positive(context_length, "context_length")
        check_positive(stride, "stride")
        self.ids = as_1d(ids)
        self.context_length = int(context_length)
        self.stride = int(stride)
        check_length(len(self.ids), self.context_length)
        self._n = (len(self.ids) - self.context_length - 1) // self.stride + 1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `(x, y)`, each int64 of shape (context_length,)."""
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"window {i} out of range for {self._n} windows")
        start = np.array([i * self.stride])
        row = gather_windows(self.ids, start, self.context_length + 1)[0]  # (T + 1,)
        return row[:-1], row[1:]


def create_dataloader(
    ids,
    batch_size: int,
    context_length: int,
    stride: int,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader over `SlidingWindowDataset(ids, context_length, stride)`.

    Shuffling draws from a `torch.Generator` seeded with `seed`, so two loaders built with
    the same arguments yield the same batches, epoch by epoch, regardless of the global
    torch seed.

    Args:
        ids: 1-D token ids.
        batch_size: windows per batch.
        context_length: T.
        stride: distance between window starts.
        shuffle: visit windows in a random order each epoch.
        drop_last: drop a final batch smaller than `batch_size` (keeps shapes constant).
        seed: shuffling seed.
        num_workers: DataLoader worker processes (0 = load in the main process).

    Returns:
        A DataLoader yielding `(x, y)` int64 tensors of shape (batch_size, context_length).
    """
    check_positive(batch_size, "batch_size")
    dataset = SlidingWindowDataset(ids, context_length, stride)
    if drop_last and len(dataset) < batch_size:
        raise UserError(
            f"only {len(dataset)} windows of {context_length} tokens (stride {stride}) but "
            f"batch_size is {batch_size} with drop_last; use a smaller batch_size or stride"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


# --------------------------------------------------------------------------- training batches


class BatchSampler:
    """Deterministic, resumable random batches: the batch for a step is a pure function of
    (seed, step).

    Design. The corpus is cut into `n = (len(ids) - 1) // T` non-overlapping windows of
    T = `context_length` input tokens (each with its T shifted targets, so the last target
    of one window is the first input of the next). Training samples are numbered globally:
    sample `g` belongs to epoch `g // n` and is the `(g % n)`-th window of that epoch's
    order. Each epoch draws, from a numpy Generator seeded with (seed, epoch):

    - a permutation of the n windows, taken in order within the epoch, so every window is
      seen exactly once per epoch (unlike nanoGPT's independent random offsets);
    - a start offset in `[0, slack]`, where `slack = len(ids) - 1 - n * T` is the spare
      room, so window boundaries move between epochs when the corpus allows it.

    Step `s` with global batch size B covers samples `s*B .. s*B + B - 1`. Nothing depends
    on what was drawn before, so resuming at step s needs only s (no sampler state in the
    checkpoint), and rank r of `world_size` W takes rows `r*B/W .. (r+1)*B/W - 1` of that
    global batch: W processes together see exactly the rows one process would.

    Args:
        ids: 1-D token ids (a memmap from `load_bin`, an array or a tensor). Not copied.
        batch_size: the GLOBAL batch size B (all ranks together).
        context_length: T.
        seed: any integer.

    Example:
        >>> sampler = BatchSampler(load_bin(path), batch_size=8, context_length=256, seed=0)
        >>> x, y = sampler.get_batch(step)  # (8, 256) each; same step -> same batch
    """

    def __init__(self, ids, batch_size: int, context_length: int, seed: int = 0):
        check_positive(batch_size, "batch_size")
        check_positive(context_length, "context_length")
        self.ids = as_1d(ids)
        self.batch_size = int(batch_size)
        self.context_length = int(context_length)
        self.seed = int(seed)
        check_length(len(self.ids), self.context_length)
        self.windows_per_epoch = (len(self.ids) - 1) // self.context_length
        self._slack = len(self.ids) - 1 - self.windows_per_epoch * self.context_length
        # A couple of epochs' permutations; a batch touches at most a few consecutive epochs.
        self._epochs: OrderedDict[int, tuple[np.ndarray, int]] = OrderedDict()

    def epoch_of(self, step: int) -> float:
        """How many passes over the corpus are done at the start of `step` (fractional)."""
        return step * self.batch_size / self.windows_per_epoch

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, int]:
        """(window permutation, start offset) for an epoch, memoised."""
        if epoch in self._epochs:
            self._epochs.move_to_end(epoch)
            return self._epochs[epoch]
        # SeedSequence mixes the pair (seed, epoch) into independent streams; the modulo
        # lets negative seeds through (SeedSequence wants non-negative entropy).
        rng = np.random.default_rng([self.seed % 2**64, epoch])
        perm = rng.permutation(self.windows_per_epoch)
        offset = int(rng.integers(0, self._slack + 1))
        self._epochs[epoch] = (perm, offset)
        if len(self._epochs) > 4:
            self._epochs.popitem(last=False)
        return perm, offset

    def starts(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Start positions in `ids` of this rank's windows for `step`, shape (batch_size // world_size,)."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise UserError(f"step must be a non-negative integer, got {step!r}")
        check_positive(world_size, "world_size")
        if self.batch_size % world_size:
            raise UserError(
                f"batch_size {self.batch_size} is not divisible by world_size {world_size}; "
                "pick a batch size that is a multiple of the number of processes"
            )
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside [0, {world_size}) for world_size {world_size}")
        rows = self.batch_size // world_size
        sample = step * self.batch_size + rank * rows + np.arange(rows, dtype=np.int64)  # global numbers
        epochs, positions = np.divmod(sample, self.windows_per_epoch)
        starts = np.empty(rows, dtype=np.int64)
        for epoch in np.unique(epochs):
            perm, offset = self._epoch_plan(int(epoch))
            mask = epochs == epoch
            starts[mask] = offset + perm[positions[mask]] * self.context_length
        return starts

    def get_batch(
        self,
        step: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the global batch for `step`.

        Args:
            step: the optimizer step (0-based). With gradient accumulation, pass a
                micro-step counter instead, so each micro-batch gets fresh data.
            rank: this process's rank.
            world_size: number of processes; must divide batch_size.
            device: move the tensors there (pinned and non-blocking for CUDA).

        Returns:
            `(x, y)`, int64 tensors of shape (batch_size // world_size, context_length);
            `y[:, t] == ids[start + t + 1]`.
        """
        starts = self.starts(step, rank, world_size)
        rows = gather_windows(self.ids, starts, self.context_length + 1)  # (b, T + 1)
        x, y = rows[:, :-1], rows[:, 1:]
        if device is not None:
            device = torch.device(device)
            if device.type == "cuda":
                # Pinned host memory lets the copy overlap with the previous step's compute.
                return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
            return x.to(device), y.to(device)
        return x, y


def iter_eval_batches(
    ids,
    batch_size: int,
    context_length: int,
    max_batches: int | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Walk non-overlapping windows in order, for a validation loss that is the same every time.

    Windows start at 0, T, 2T, ...; the last batch may hold fewer than `batch_size` rows,
    so every window counts (weight the loss by rows when averaging). With several ranks,
    batch i goes to rank `i % world_size`; sum losses and row counts across ranks.

    Args:
        ids: 1-D token ids.
        batch_size: windows per batch.
        context_length: T.
        max_batches: stop after this many batches (all ranks together); None for all.
        rank, world_size: this process's share.

    Yields:
        `(x, y)` int64 tensors of shape (rows, context_length), rows <= batch_size.
    """
    check_positive(batch_size, "batch_size")
    check_positive(context_length, "context_length")
    check_positive(world_size, "world_size")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside [0, {world_size}) for world_size {world_size}")
    if max_batches is not None:
        check_positive(max_batches, "max_batches")
    ids = as_1d(ids)
    check_length(len(ids), context_length, "validation data")
    n_windows = (len(ids) - 1) // context_length
    starts = np.arange(n_windows, dtype=np.int64) * context_length
    batches: Sequence[np.ndarray] = [
        starts[i : i + batch_size] for i in range(0, n_windows, batch_size)
    ]
    if max_batches is not None:
        batches = batches[:max_batches]
    for i, batch_starts in enumerate(batches):
        if i % world_size != rank:
            continue
        rows = gather_windows(ids, batch_starts, context_length + 1)
        yield rows[:, :-1], rows[:, 1:]
