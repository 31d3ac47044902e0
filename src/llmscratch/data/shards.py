"""Token shards on disk, as `llmscratch prepare` writes them, and reading them back.

A prepared folder holds

- `train_000000.bin`, `train_000001.bin`, ...: the training stream, cut into files of
  `shard_tokens` tokens each (the last one shorter), raw ids in the manifest's `dtype`
  (`uint16` when the vocabulary fits, else `uint32`), native byte order; `<|endoftext|>`
  between documents;
- `val_000000.bin`, ...: the held-out documents, the same way;
- `tokenizer.json`: the tokenizer that made them;
- `manifest.json`: format version, tokenizer (spec, name, vocabulary, fingerprint),
  source, settings, and per split its tokens, documents, UTF-8 bytes and shards (file,
  tokens, sha256). It is written last: a folder without it is an unfinished `prepare`.

`open_prepared(folder)` checks every shard (present, the size the manifest says and, with
`verify`, its sha256) and returns `PreparedData`, whose `train` and `val` are
`ShardedTokens`: the shards of a split as one read-only 1-D sequence of ids, each file
memory-mapped, so `BatchSampler` and `iter_eval_batches` use them like a single `.bin`
(a window may run from one shard into the next, as the text does).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "STATE", "PreparedData", "ShardedTokens",
           "is_prepared_dir", "open_prepared", "shard_name"]

FORMAT = "llmscratch-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = "prepare_state.json"  # progress of an unfinished prepare (removed when it finishes)
SPLITS = ("train", "val")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


class ShardedTokens:
    """Several memory-mapped shard files read as one 1-D sequence of token ids.

    Supports `len`, an int index, a slice (step 1) and an integer array of any shape (what
    `gather_windows` asks for); the result is a numpy array of the shards' dtype.
    """

    ndim = 1

    def __init__(self, arrays: list[np.ndarray]):
        if not arrays:
            raise UserError("no shards to read")
        self.arrays = arrays
        self.dtype = arrays[0].dtype
        sizes = np.array([len(a) for a in arrays], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # shard i holds [offsets[i], offsets[i+1])
        self.shape = (int(self.offsets[-1]),)

    def __len__(self) -> int:
        return self.shape[0]

    def _locate(self, pos: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, pos, side="right") - 1

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return self[np.arange(start, stop, step)]
            if stop <= start:
                return np.empty(0, dtype=self.dtype)
            first, last = self._locate(np.array([start, stop - 1]))
            parts = [self.arrays[s][max(start - self.offsets[s], 0): min(stop, self.offsets[s + 1]) - self.offsets[s]]
                     for s in range(first, last + 1)]
            return np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"token {key} out of range for {n} tokens")
            s = int(self._locate(np.array([i]))[0])
            return self.arrays[s][i - self.offsets[s]]
        index = np.asarray(key)
        if index.dtype.kind not in "iu":
            raise TypeError(f"ShardedTokens indices must be integers, got {index.dtype}")
        flat = index.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            raise IndexError(f"token index out of range for {n} tokens")
        which = self._locate(flat)
        out = np.empty(flat.shape, dtype=self.dtype)
        for s in np.unique(which):
            mask = which == s
            out[mask] = self.arrays[s][flat[mask] - self.offsets[s]]
        return out.reshape(index.shape)

    def __array__(self, dtype=None, copy=None):
        arr = self[0:len(self)]
        return arr.astype(dtype) if dtype is not None else arr


@dataclass
class PreparedData:
    """A prepared folder, opened: its manifest, and each split's shards as one sequence."""

    folder: Path
    manifest: dict
    train: ShardedTokens
    val: ShardedTokens | None

    @property
    def tokenizer_file(self) -> Path:
        return self.folder / self.manifest["tokenizer"]["file"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    def bytes_per_token(self, split: str = "val") -> float:
        """UTF-8 bytes of text per token in a split (turns nats/token into bits/byte)."""
        info = self.manifest["splits"][split]
        return info["bytes"] / max(1, info["tokens"])


def is_prepared_dir(path) -> bool:
    """Whether `path` is a folder `llmscratch prepare` wrote (finished or not)."""
    p = Path(str(path)).expanduser()
    return p.is_dir() and ((p / MANIFEST).is_file() or (p / STATE).is_file())


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        if (folder / STATE).is_file():
            raise UserError(f"{folder}: llmscratch prepare did not finish there (no {MANIFEST}); "
                            "run the same prepare command again to complete it")
        raise UserError(f"{folder}: not a prepared folder (no {MANIFEST}); make one with llmscratch prepare")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not an llmscratch shard manifest (no \"format\": \"{FORMAT}\")")
    if manifest.get("version") != FORMAT_VERSION:
        raise UserError(f"{path}: shard format version {manifest.get('version')!r}; this llmscratch reads "
                        f"version {FORMAT_VERSION}: prepare the corpus again")
    return manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _open_split(folder: Path, manifest: dict, split: str, verify: bool) -> ShardedTokens | None:
    try:
        info = manifest["splits"][split]
        dtype = np.dtype(manifest["dtype"])
        shards = info["shards"]
    except (KeyError, TypeError) as e:
        raise UserError(f"{folder / MANIFEST}: missing field {e}; prepare the corpus again") from None
    arrays = []
    for entry in shards:
        path = folder / entry["file"]
        if not path.is_file():
            raise UserError(f"{path} is missing ({MANIFEST} lists it); restore it or prepare the corpus again")
        size, want = path.stat().st_size, int(entry["tokens"]) * dtype.itemsize
        if size != want:
            raise UserError(f"{path} has {size:,} bytes but {MANIFEST} says {entry['tokens']:,} tokens "
                            f"({want:,} bytes): the shard is damaged; prepare the corpus again")
        if verify and _sha256(path) != entry["sha256"]:
            raise UserError(f"{path}: sha256 does not match {MANIFEST} (expected {entry['sha256'][:16]}...): "
                            "the shard is corrupted; prepare the corpus again")
        if entry["tokens"]:
            arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(int(entry["tokens"]),)))
    return ShardedTokens(arrays) if arrays else None


def open_prepared(folder: str | os.PathLike, verify: bool = True) -> PreparedData:
    """Open a folder written by `llmscratch prepare`.

    Args:
        folder: the folder.
        verify: check each shard's sha256 against the manifest (sizes are always checked).

    Raises:
        UserError: no manifest (or an unfinished prepare), a missing, truncated or
            corrupted shard, no training tokens.
    """
    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    train = _open_split(folder, manifest, "train", verify)
    if train is None:
        raise UserError(f"{folder}: the training split holds no tokens")
    val = _open_split(folder, manifest, "val", verify) if "val" in manifest.get("splits", {}) else None
    return PreparedData(folder, manifest, train, val)
