"""Token storage and sampling for training.

The path from text to batches:

1. `tokenize_to_bin(documents, tokenizer)` encodes the corpus once into a flat binary file
   of token ids (uint16 for GPT-2's 50,257 tokens), with `<|endoftext|>` between documents,
   cached under a hash of the texts and the tokenizer. `load_bin` maps it back as a
   read-only `np.memmap`, so a corpus larger than RAM costs nothing to open.
2. `split_train_val(ids, val_fraction)` cuts it into a training head and a validation tail
   (views, no copies).
3. Batches, in one of two styles:

   - `SlidingWindowDataset` / `create_dataloader`: the book's GPTDatasetV1 idea, every
     window of `context_length` tokens at a fixed stride, through a torch DataLoader.
     Easy to read and to inspect in a notebook.
   - `BatchSampler.get_batch(step)`: what the training loop uses. The batch is a pure
     function of (seed, step), which makes resuming and multi-GPU sharding exact.

   `iter_eval_batches` walks non-overlapping windows in order for a validation loss.

Every sampler returns `(x, y)` int64 tensors where `y` is `x` shifted left by one token:
position t of `y` is the token the model must predict after seeing `x[..., : t + 1]`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .errors import UserError
from .utils import atomic_write, write_json

__all__ = [
    "BatchSampler",
    "SlidingWindowDataset",
    "create_dataloader",
    "iter_eval_batches",
    "load_bin",
    "split_train_val",
    "tokenize_to_bin",
]

# Bumped whenever the .bin layout or the cache key changes, so old caches are not reused.
_BIN_FORMAT = 1


# --------------------------------------------------------------------------- helpers


def _as_1d(ids, what: str = "ids"):
    """Accept a 1-D numpy array / memmap / torch tensor / list of token ids, without copying
    arrays. Lists become int64 arrays."""
    if isinstance(ids, torch.Tensor):
        arr = ids
    elif isinstance(ids, np.ndarray):
        arr = ids
    else:
        arr = np.asarray(ids, dtype=np.int64)
    if arr.ndim != 1:
        raise UserError(f"{what} must be a 1-D sequence of token ids, got shape {tuple(arr.shape)}")
    return arr


def _check_positive(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")


def _check_length(n_tokens: int, context_length: int, what: str = "corpus") -> None:
    if n_tokens < context_length + 1:
        raise UserError(
            f"{what} has {n_tokens} tokens; need at least context_length+1 = {context_length + 1}"
            " (use more text or a shorter context_length)"
        )


def _gather(ids, starts: np.ndarray, length: int) -> torch.Tensor:
    """Rows `ids[s : s + length]` for each start, as an int64 tensor of shape (len(starts), length).

    Fancy indexing reads exactly those tokens from a memmap, and converting to int64 here
    (not in torch) avoids torch's limited support for uint16 tensors.
    """
    index = starts[:, None] + np.arange(length)[None, :]  # (n, length)
    if isinstance(ids, torch.Tensor):
        return ids[torch.from_numpy(index)].long()
    return torch.from_numpy(np.asarray(ids[index], dtype=np.int64))


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
        _check_positive(context_length, "context_length")
        _check_positive(stride, "stride")
        self.ids = _as_1d(ids)
        self.context_length = int(context_length)
        self.stride = int(stride)
        _check_length(len(self.ids), self.context_length)
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
        row = _gather(self.ids, start, self.context_length + 1)[0]  # (T + 1,)
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
    _check_positive(batch_size, "batch_size")
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


# --------------------------------------------------------------------------- token storage


def _tokenizer_fingerprint(tokenizer) -> str:
    """A hex digest that changes whenever the tokenizer would encode text differently.

    Name and vocab size alone cannot tell two BPE tokenizers trained on different text
    apart, so we also hash the tokenizer's saved form when it can save itself. A tokenizer
    may offer a cheaper `fingerprint()` (returning a string); that wins. If saving fails
    we fall back to the name, vocab size and eot id.
    """
    h = hashlib.sha256()
    eot = _eot_id(tokenizer, needed=False)
    h.update(f"{tokenizer.name}\0{tokenizer.vocab_size}\0{eot}\0".encode())
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if callable(fingerprint):
        h.update(str(fingerprint()).encode())
    elif callable(getattr(tokenizer, "save", None)):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                tokenizer.save(os.path.join(tmp, "tokenizer"))
            except Exception:  # noqa: BLE001 - best effort: an unknown save() signature
                pass
            for p in sorted(Path(tmp).rglob("*")):
                if p.is_file():
                    h.update(p.relative_to(tmp).as_posix().encode() + b"\0")
                    h.update(p.read_bytes())
    return h.hexdigest()


def _eot_id(tokenizer, needed: bool) -> int | None:
    """The tokenizer's `<|endoftext|>` id; None when it has none and one document needs none."""
    try:
        return int(tokenizer.eot_id)
    except UserError:
        if needed:
            raise
        return None


def _bin_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (GPT-2's 50,257 does), halving disk and memory; else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _as_documents(documents) -> list[tuple[str, str]]:
    """(name, text) pairs from Documents, plain strings, or (name, text) tuples."""
    out = []
    for i, doc in enumerate(documents):
        if isinstance(doc, str):
            out.append((f"document {i}", doc))
        elif hasattr(doc, "name") and hasattr(doc, "text"):
            out.append((str(doc.name), doc.text))
        else:
            name, text = doc
            out.append((str(name), text))
    return out


def _sidecar(bin_path: Path) -> Path:
    return bin_path.with_suffix(".json")


def tokenize_to_bin(
    documents: Iterable,
    tokenizer,
    cache_dir: str | os.PathLike | None = None,
    *,
    source: str | None = None,
    progress: bool = True,
) -> Path:
    """Encode documents once into a flat `.bin` of token ids, cached by content.

    The file is the raw array (native byte order) of `tokenizer.encode(text)` for each
    document with `tokenizer.eot_id` between consecutive documents (not after the last),
    so the model sees where one text ends and the next begins. (Our tokenizers' `encode`
    also turns a literal `<|endoftext|>` written in a text into that id, so one file can
    hold several documents.) A JSON sidecar with the same stem records dtype, count,
    tokenizer, source and the cache key.

    The cache key hashes the texts (in order) and the tokenizer's identity (name, vocab
    size, eot id and its saved form, see `_tokenizer_fingerprint`); the same corpus and
    tokenizer find the existing file and skip encoding entirely. Both files are written
    atomically, the sidecar last, so a crash never leaves a file that looks complete.

    Args:
        documents: `Document`s (from `llmscratch.datasets.load_text`), strings, or
            (name, text) pairs.
        tokenizer: anything with `.encode(text) -> list[int]`, `.vocab_size`, `.eot_id`, `.name`.
        cache_dir: folder for the files (default: `<cache root>/tokens`).
        source: a human description for the sidecar (default: the document names).
        progress: show a tqdm bar over characters encoded.

    Returns:
        Path to the `.bin`; open it with `load_bin`.
    """
    from .datasets import cache_root  # local import: datasets is only needed for the default

    docs = _as_documents(documents)
    if not docs:
        raise UserError("no documents to tokenize")
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "tokens"
    vocab_size = int(tokenizer.vocab_size)
    eot_id = _eot_id(tokenizer, needed=len(docs) > 1)
    dtype = _bin_dtype(vocab_size)

    h = hashlib.sha256()
    h.update(f"llmscratch-bin-v{_BIN_FORMAT}\0{dtype.str}\0".encode())
    h.update(_tokenizer_fingerprint(tokenizer).encode())
    for _, text in docs:
        data = text.encode("utf-8", errors="surrogatepass")
        # Length prefix: ["ab", "c"] and ["a", "bc"] must hash differently.
        h.update(len(data).to_bytes(8, "little") + data)
    key = h.hexdigest()

    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(tokenizer.name)) or "tokenizer"
    bin_path = folder / f"{safe_name}-{key[:16]}.bin"
    if _cache_hit(bin_path, key):
        return bin_path

    count = 0
    total_chars = sum(len(text) for _, text in docs)
    with (
        atomic_write(bin_path, "wb") as f,
        tqdm(
            total=total_chars, unit="char", unit_scale=True, desc="tokenizing", disable=not progress
        ) as bar,
    ):
        for i, (name, text) in enumerate(docs):
            ids = tokenizer.encode(text)
            if i > 0:
                ids = [eot_id, *ids]
            arr = np.asarray(ids, dtype=np.int64)
            if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                # A tokenizer bug, but silently wrapping into uint16 would corrupt training.
                raise ValueError(
                    f"tokenizer {tokenizer.name!r} produced id {int(arr.max())} outside "
                    f"[0, {vocab_size}) for document {name!r}"
                )
            f.write(arr.astype(dtype).tobytes())
            count += arr.size
            bar.update(len(text))

    names = [name for name, _ in docs]
    write_json(
        _sidecar(bin_path),
        {
            "format": _BIN_FORMAT,
            "dtype": dtype.name,
            "count": count,
            "tokenizer": str(tokenizer.name),
            "vocab_size": vocab_size,
            "eot_id": eot_id,
            "documents": len(docs),
            "source": source or _describe(names),
            "key": key,
        },
    )
    return bin_path


def _describe(names: list[str]) -> str:
    """"a, b, c" for a few document names; the first five and a count for many."""
    shown = ", ".join(names[:5])
    return shown if len(names) <= 5 else f"{shown}, ... ({len(names)} in all)"


def _read_sidecar(bin_path: Path) -> dict | None:
    try:
        return json.loads(_sidecar(bin_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _cache_hit(bin_path: Path, key: str) -> bool:
    """True when both files exist, agree with each other, and were made for `key`."""
    meta = _read_sidecar(bin_path)
    if meta is None or meta.get("key") != key or not bin_path.is_file():
        return False
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        return bin_path.stat().st_size == int(meta["count"]) * itemsize
    except (KeyError, TypeError, ValueError):
        return False


def load_bin(path: str | os.PathLike) -> np.memmap:
    """Open a `.bin` written by `tokenize_to_bin` as a read-only memmap.

    Args:
        path: the `.bin`; its JSON sidecar (same stem) must lie next to it.

    Returns:
        1-D `np.memmap` of token ids (uint16 or uint32), shape (count,).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such token file: {path}")
    meta = _read_sidecar(path)
    if meta is None:
        raise UserError(f"{_sidecar(path)} is missing or not valid JSON; re-run tokenization")
    try:
        dtype = np.dtype(meta["dtype"])
        count = int(meta["count"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{_sidecar(path)}: bad or missing field {e}; re-run tokenization") from None
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise UserError(
            f"{path} has {size} bytes but {_sidecar(path).name} says {count} x {dtype.name} "
            f"= {count * dtype.itemsize}; the file is truncated, delete it and re-run tokenization"
        )
    if count == 0:
        raise UserError(f"{path} holds no tokens")
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def split_train_val(
    ids,
    val_fraction: float,
    context_length: int | None = None,
) -> tuple:
    """Split token ids into a training head and a validation tail.

    The tail (not a random subset) keeps both parts contiguous, so windows never straddle
    the two and no token of the validation text leaks into training.

    Args:
        ids: 1-D token ids (array, memmap or tensor).
        val_fraction: share of tokens for validation, in [0, 1); 0 gives an empty tail.
        context_length: when given, each non-empty part must hold at least
            `context_length + 1` tokens (one full window with its targets).

    Returns:
        `(train_ids, val_ids)`, views of `ids` (no copies).
    """
    ids = _as_1d(ids)
    is_number = isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
    if not is_number or not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    n = len(ids)
    n_val = int(round(n * val_fraction))
    train, val = ids[: n - n_val], ids[n - n_val :]
    if context_length is not None:
        _check_positive(context_length, "context_length")
        _check_length(len(train), context_length, f"training split ({1 - val_fraction:g} of {n} tokens)")
        if val_fraction > 0:
            _check_length(len(val), context_length, f"validation split ({val_fraction:g} of {n} tokens)")
    return train, val


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
        _check_positive(batch_size, "batch_size")
        _check_positive(context_length, "context_length")
        self.ids = _as_1d(ids)
        self.batch_size = int(batch_size)
        self.context_length = int(context_length)
        self.seed = int(seed)
        _check_length(len(self.ids), self.context_length)
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
        _check_positive(world_size, "world_size")
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
        rows = _gather(self.ids, starts, self.context_length + 1)  # (b, T + 1)
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
    _check_positive(batch_size, "batch_size")
    _check_positive(context_length, "context_length")
    _check_positive(world_size, "world_size")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside [0, {world_size}) for world_size {world_size}")
    if max_batches is not None:
        _check_positive(max_batches, "max_batches")
    ids = _as_1d(ids)
    _check_length(len(ids), context_length, "validation data")
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
        rows = _gather(ids, batch_starts, context_length + 1)
        yield rows[:, :-1], rows[:, 1:]
