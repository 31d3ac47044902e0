"""Token storage: a corpus encoded once into a flat binary file of ids, and split.

1. `tokenize_to_bin(documents, tokenizer)` encodes the corpus once into a flat binary file
   of token ids (uint16 for GPT-2's 50,257 tokens), with `<|endoftext|>` between documents,
   cached under a hash of the texts and the tokenizer. `load_bin` maps it back as a
   read-only `np.memmap`, so a corpus larger than RAM costs nothing to open.
   `token_ids(documents, tokenizer)` does both and also returns bytes per token, which
   turns a loss in nats/token into bits/byte.
2. `split_train_val(ids, val_fraction)` cuts it into a training head and a validation tail
   (views, no copies).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from .corpora import cache_root
from ..errors import UserError
from ..utils import atomic_write, progress_bar, write_json
from .ids import as_1d, check_length, check_positive

__all__ = ["load_bin", "split_train_val", "token_dtype", "token_ids", "tokenize_to_bin", "tokenizer_fingerprint"]

# Bumped whenever the .bin layout or the cache key changes, so old caches are not reused.
_BIN_FORMAT = 1


# --------------------------------------------------------------------------- token storage


def tokenizer_fingerprint(tokenizer) -> str:
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


def token_dtype(vocab_size: int) -> np.dtype:
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
    size, eot id and its saved form, see `tokenizer_fingerprint`); the same corpus and
    tokenizer find the existing file and skip encoding entirely. Both files are written
    atomically, the sidecar last, so a crash never leaves a file that looks complete.

    Args:
        documents: `Document`s (from `llmscratch.data.corpora.load_text`), strings, or
            (name, text) pairs.
        tokenizer: anything with `.encode(text) -> list[int]`, `.vocab_size`, `.eot_id`, `.name`.
        cache_dir: folder for the files (default: `<cache root>/tokens`).
        source: a human description for the sidecar (default: the document names).
        progress: show a tqdm bar over characters encoded.

    Returns:
        Path to the `.bin`; open it with `load_bin`.
    """
    docs = _as_documents(documents)
    if not docs:
        raise UserError("no documents to tokenize")
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "tokens"
    vocab_size = int(tokenizer.vocab_size)
    eot_id = _eot_id(tokenizer, needed=len(docs) > 1)
    dtype = token_dtype(vocab_size)

    h = hashlib.sha256()
    h.update(f"llmscratch-bin-v{_BIN_FORMAT}\0{dtype.str}\0".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
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
        progress_bar(
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
    ids = as_1d(ids)
    is_number = isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
    if not is_number or not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    n = len(ids)
    n_val = int(round(n * val_fraction))
    train, val = ids[: n - n_val], ids[n - n_val :]
    if context_length is not None:
        check_positive(context_length, "context_length")
        check_length(len(train), context_length, f"training split ({1 - val_fraction:g} of {n} tokens)")
        if val_fraction > 0:
            check_length(len(val), context_length, f"validation split ({val_fraction:g} of {n} tokens)")
    return train, val


def token_ids(documents, tokenizer, *, source: str | None = None,
              progress: bool = True) -> tuple[np.memmap, float]:
    """The documents' token ids, tokenized once and cached (`tokenize_to_bin` + `load_bin`),
    and the average UTF-8 bytes per token.

    Bytes per token is what turns a loss in nats/token into bits/byte, the number that
    compares models with different tokenizers; pretraining and `evaluate_lm` both report it.

    Args:
        documents: `Document`s, strings or (name, text) pairs, as for `tokenize_to_bin`.
        tokenizer: any llmscratch tokenizer.
        source: a human description for the cache sidecar (e.g. the dataset name).
        progress: show a tqdm bar while encoding.

    Returns:
        `(ids, bytes_per_token)`, the ids a read-only memmap.
    """
    docs = _as_documents(documents)
    n_bytes = sum(len(text.encode("utf-8")) for _, text in docs)
    ids = load_bin(tokenize_to_bin(docs, tokenizer, source=source, progress=progress))
    return ids, n_bytes / len(ids)
