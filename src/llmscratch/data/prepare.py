"""`llmscratch prepare`: a corpus larger than memory -> fixed-size token shards + manifest.

    prepare(PrepareConfig(input="crawl/*.jsonl.zst", out="data/crawl", tokenizer="gpt2", workers=8))

How it goes (the shard layout is `shards.py`'s):

1. The input streams as segments (`sources.py`): a record's text, or a piece of a text
   file. Segment g goes to the validation split when a hash of its text (blake2b, 64 bits)
   falls under `val_fraction`: held-out *documents*, chosen by content (a document copied
   twice lands in the same split), not the last tokens of the stream.
2. The main process reads, hashes and batches the segments (about 1 MiB of text a batch;
   the batching never depends on `workers`); `workers` processes encode the batches, the
   results come back in order, at most `2 * workers` batches in flight, so memory stays
   bounded whatever the corpus size.
3. Each split's tokens fill a buffer of `shard_tokens` ids; a full buffer becomes
   `train_000007.bin` (written to a temporary name, then renamed). `<|endoftext|>` goes
   between documents, and wherever a split's stream skips text (a long file's pieces held
   out in part), never inside a run of text that continues.
4. After every shard, `prepare_state.json` records, per split, the shards done and the
   segment (and token within it) its unfinished buffer started at. Interrupted (Ctrl-C,
   a kill, a crash), the same command reads the input again from the earliest such
   segment, skips what is already on disk, and finishes with the very bytes of an
   uninterrupted run. `manifest.json` is written last.

Shards are byte-identical whatever `workers` is, interrupted or not (tests/test_prepare.py).
Each text is encoded with `encode_ordinary`: a literal `<|endoftext|>` written in the corpus
is ordinary text, so only the separators are end-of-text tokens.
"""

from __future__ import annotations

import collections
import hashlib
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from ..errors import UserError
from ..utils import remove_stale_temporaries, write_json
from .shards import FORMAT, FORMAT_VERSION, MANIFEST, SPLITS, STATE, read_manifest, shard_name
from .sources import ReadStats, Segment, describe_input, input_files, iter_segments
from .tokens import token_dtype, tokenizer_fingerprint

__all__ = ["PrepareConfig", "PrepareResult", "is_validation", "prepare"]

BATCH_CHARS = 1 << 20  # text per batch sent to a worker
_WRITE_TOKENS = 1 << 20  # ids a split keeps in memory before they go to its shard file
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class PrepareConfig:
    """Settings of `llmscratch prepare`; each field is also a flag."""

    input: str
    """a file (.txt, .jsonl, .parquet; .txt/.jsonl may be .gz or .zst), a folder of them, a
    glob (quote it), or hf:NAME[:CONFIG] (a Hugging Face dataset, streamed)"""
    out: str
    """folder for the shards, tokenizer.json and manifest.json (rerun the same command there
    to resume an interrupted prepare)"""
    tokenizer: str = "bpe:8192"
    """gpt2, bpe:VOCAB (a byte-level BPE trained on the first --tokenizer-sample-mb of the
    training text), wordpiece:VOCAB, or a saved tokenizer.json"""
    workers: int = 1
    """processes encoding in parallel (the shards are the same whatever the number)"""
    shard_tokens: int = 100_000_000
    """tokens per shard file (the last of each split is shorter)"""
    text_field: str = "text"
    """the field of a .jsonl record, or the column of a parquet file or hf dataset, holding the text"""
    val_fraction: float = 0.01
    """share of the documents held out for validation (chosen by a hash of each document's text)"""
    tokenizer_sample_mb: float = 16.0
    """MB of training text a bpe:/wordpiece: tokenizer is trained on"""
    progress: bool = True
    """show a progress bar"""

    def validate(self) -> None:
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if self.shard_tokens < 1:
            raise UserError(f"--shard-tokens must be positive, got {self.shard_tokens}")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.tokenizer_sample_mb <= 0:
            raise UserError(f"--tokenizer-sample-mb must be positive, got {self.tokenizer_sample_mb}")
        if not self.text_field:
            raise UserError("--text-field must not be empty")


@dataclass
class PrepareResult:
    out: Path
    manifest: dict | None
    """None when interrupted"""
    interrupted: bool
    shards_written: int
    """by this call (0 when the folder was already complete)"""
    replaced_bytes: int = 0
    first_bad: str = ""


def is_validation(data: bytes, val_fraction: float) -> bool:
    """Whether a segment (its UTF-8 bytes) is held out: the first 64 bits of its blake2b
    digest, as a fraction of 2**64, fall under `val_fraction`."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(data, digest_size=8, person=b"llmscratch-val").digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


# ---------------------------------------------------------------------- encoding

_WORKER_TOKENIZER = None


def _init_worker(tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_batch(texts: list[str], tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """`(ids of all texts concatenated as uint32, the count of each)`."""
    tok = tokenizer if tokenizer is not None else _WORKER_TOKENIZER
    to_numpy = getattr(getattr(tok, "encoding", None), "encode_to_numpy", None)
    if to_numpy is not None:  # GPT-2's (tiktoken): ids straight into an array, no Python ints
        arrays = [to_numpy(t, allowed_special=set(), disallowed_special=()) for t in texts]
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        flat = np.concatenate(arrays).astype(np.uint32, copy=False) if arrays else np.empty(0, np.uint32)
        return flat, lengths
    encode = tok.encode_ordinary
    lists = [encode(t) for t in texts]
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    flat = np.fromiter((i for x in lists for i in x), dtype=np.uint32, count=int(lengths.sum()))
    return flat, lengths


class _Encoder:
    """Batches encoded in order: in this process (1 worker) or in a pool, with at most
    `2 * workers` batches in flight."""

    def __init__(self, tokenizer, workers: int):
        self.tokenizer = tokenizer
        self.pool = None
        if workers > 1:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self.pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,))
        self.window = 2 * workers

    def run(self, jobs: Iterator[tuple[list, list[str]]]) -> Iterator[tuple[list, np.ndarray, np.ndarray]]:
        if self.pool is None:
            for meta, texts in jobs:
                yield (meta, *_encode_batch(texts, self.tokenizer))
            return
        pending: collections.deque = collections.deque()
        for meta, texts in jobs:
            pending.append((meta, self.pool.apply_async(_encode_batch, (texts,))))
            while len(pending) >= self.window:
                meta0, res = pending.popleft()
                yield (meta0, *res.get())
        while pending:
            meta0, res = pending.popleft()
            yield (meta0, *res.get())

    def close(self, terminate: bool = False) -> None:
        if self.pool is not None:
            (self.pool.terminate if terminate else self.pool.close)()
            self.pool.join()
            self.pool = None


# ----------------------------------------------------------------------- writing


class _Stop(Exception):
    """Raised after `stop_after_shards` shards (a simulated interruption, for tests)."""


class _SplitWriter:
    """One split's token stream -> shard files, with what a resume needs (`saved`).

    The shard being filled is an open temporary file (at most `_WRITE_TOKENS` ids wait in
    memory), renamed to its name once full: memory does not grow with `shard_tokens`."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int, eot: int, saved: dict | None):
        self.out, self.split, self.dtype, self.eot = out, split, dtype, eot
        self.shard_tokens = shard_tokens
        self.buf = np.empty(min(shard_tokens, _WRITE_TOKENS), dtype=dtype)
        self.fill = 0  # ids waiting in buf
        self.in_shard = 0  # ids of the shard being filled (in its file and in buf)
        self.file = self.tmp = self.hasher = None
        self.saved = saved or {"shards": [], "start_segment": 0, "start_offset": 0, "prev": None,
                               "counts": {"tokens": 0, "documents": 0, "segments": 0, "bytes": 0}}
        self.shards = list(self.saved["shards"])
        self.prev = tuple(self.saved["prev"]) if self.saved["prev"] else None
        self.counts = dict(self.saved["counts"])
        self.on_shard = None  # called after each shard file is on disk

    @property
    def start_segment(self) -> int:
        return self.saved["start_segment"]

    def add(self, g: int, seg: Segment, ids: np.ndarray, nbytes: int) -> None:
        """Append segment g (its ids), with an end-of-text first unless it continues the
        previous segment of this split."""
        before_prev, before_counts = self.prev, dict(self.counts)
        cont = self.prev is not None and self.prev == (seg.doc, seg.piece - 1)
        sep = self.prev is not None and not cont
        contribution = np.concatenate([np.array([self.eot], dtype=ids.dtype), ids]) if sep else ids
        self.counts["segments"] += 1
        self.counts["documents"] += 0 if cont else 1
        self.counts["bytes"] += nbytes
        self.prev = (seg.doc, seg.piece)
        pos = self.saved["start_offset"] if g == self.saved["start_segment"] else 0
        n = len(contribution)
        while pos < n:
            take = min(n - pos, len(self.buf) - self.fill, self.shard_tokens - self.in_shard)
            self.buf[self.fill:self.fill + take] = contribution[pos:pos + take]
            self.fill += take
            self.in_shard += take
            pos += take
            if self.fill == len(self.buf):
                self._spill()
            if self.in_shard == self.shard_tokens:
                self._close_shard()
                self.saved = {"shards": list(self.shards), "start_segment": g, "start_offset": pos,
                              "prev": list(before_prev) if before_prev else None, "counts": before_counts}
                self.on_shard()
        self.counts["tokens"] += n

    def _spill(self) -> None:
        """The waiting ids -> the shard's temporary file."""
        if self.file is None:
            name = shard_name(self.split, len(self.shards))
            fd, self.tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.out)
            self.file, self.hasher = os.fdopen(fd, "wb"), hashlib.sha256()
        data = self.buf[:self.fill].tobytes()
        self.file.write(data)
        self.hasher.update(data)
        self.fill = 0

    def _close_shard(self) -> None:
        self._spill()
        self.file.flush()
        os.fsync(self.file.fileno())  # on disk before the name points at it
        self.file.close()
        name = shard_name(self.split, len(self.shards))
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.out / name)
        self.shards.append({"file": name, "tokens": self.in_shard, "sha256": self.hasher.hexdigest()})
        self.file = self.tmp = self.hasher = None
        self.in_shard = 0

    def abort(self) -> None:
        """Drop the unfinished shard file (a resume writes it again)."""
        if self.file is not None:
            self.file.close()
            Path(self.tmp).unlink(missing_ok=True)
            self.file = self.tmp = None

    def finish(self) -> dict:
        if self.in_shard:
            self._close_shard()
        return {**self.counts, "shards": self.shards}


# ------------------------------------------------------------------------ the job


def _settings(cfg: PrepareConfig, source: str) -> dict:
    return {"source": source, "text_field": cfg.text_field, "val_fraction": cfg.val_fraction,
            "shard_tokens": cfg.shard_tokens, "tokenizer_spec": cfg.tokenizer}


def _sample_texts(cfg: PrepareConfig) -> Iterator[str]:
    """The first `tokenizer_sample_mb` of the training split's text (for bpe:/wordpiece:)."""
    budget = int(cfg.tokenizer_sample_mb * 1e6)
    for seg in iter_segments(cfg.input, cfg.text_field):
        data = seg.text.encode("utf-8", "surrogatepass")
        if is_validation(data, cfg.val_fraction):
            continue
        yield seg.text
        budget -= len(data)
        if budget <= 0:
            return


def _tokenizer(cfg: PrepareConfig, out: Path, resuming: bool):
    from ..tokenizer import build_tokenizer, load_tokenizer

    path = out / TOKENIZER_FILE
    if resuming and path.is_file():
        return load_tokenizer(path)
    trained = str(cfg.tokenizer).startswith(("bpe:", "wordpiece:"))
    texts = list(_sample_texts(cfg)) if trained else []
    if trained and not texts:
        raise UserError(f"{cfg.input}: the corpus holds no text to train the tokenizer on (every document is "
                        f"empty{' or held out for validation' if cfg.val_fraction else ''})")
    tok = build_tokenizer(cfg.tokenizer, texts)
    return tok


def _check_folder(out: Path, settings: dict) -> tuple[dict | None, dict | None]:
    """`(finished manifest, unfinished state)` already in `out` for these settings (at most
    one is not None); UserError if `out` holds something else."""
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if {k: manifest.get(k) for k in settings} != settings:
            raise UserError(f"{out} already holds data prepared with other settings "
                            f"({_differences(manifest, settings)}); pick another --out or delete it")
        return manifest, None
    if (out / STATE).is_file():
        import json

        try:
            state = json.loads((out / STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UserError(f"{out / STATE} is damaged; delete {out} and prepare again") from None
        if {k: state.get("settings", {}).get(k) for k in settings} != settings:
            raise UserError(f"{out} holds an unfinished prepare with other settings "
                            f"({_differences(state.get('settings', {}), settings)}); rerun it with those, "
                            "or pick another --out")
        return None, state
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; pick a new folder")
    return None, None


def _differences(saved: dict, settings: dict) -> str:
    return ", ".join(f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in settings.items() if saved.get(k) != v)


def prepare(cfg: PrepareConfig, *, stop_after_shards: int | None = None) -> PrepareResult:
    """Tokenize `cfg.input` into shards in `cfg.out` (see the module docstring); resume an
    unfinished prepare there; do nothing if it is already complete.

    Args:
        cfg: the settings.
        stop_after_shards: behave as if interrupted once this many shards are written by
            this call (the state is saved; the same call again resumes).

    Raises:
        UserError: a bad setting or input, an empty corpus, or a folder holding other data.
    """
    cfg.validate()
    source = describe_input(cfg.input)
    if not cfg.input.startswith("hf:"):
        input_files(cfg.input)  # a missing path fails before anything is written
    out = Path(cfg.out).expanduser()
    settings = _settings(cfg, source)
    manifest, state = _check_folder(out, settings)
    if manifest is not None:
        return PrepareResult(out, manifest, False, 0)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    try:
        tokenizer = _tokenizer(cfg, out, state is not None)
        try:
            eot = int(tokenizer.eot_id)
        except UserError:
            raise UserError(f"--tokenizer {cfg.tokenizer}: the tokenizer has no <|endoftext|> token to put "
                            "between documents") from None
    except BaseException:
        if created:
            out.rmdir()
        raise
    fingerprint = tokenizer_fingerprint(tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    settings.update(fingerprint=fingerprint, dtype=dtype.name)
    if state is not None and state["settings"] != settings:
        raise UserError(f"{out} holds an unfinished prepare with another tokenizer; delete it or pick another --out")
    saved = (state or {}).get("splits", {})
    for split in SPLITS:  # a shard written after the state was last saved: written again below
        done = {e["file"] for e in saved.get(split, {}).get("shards", [])}
        for p in out.glob(f"{split}_*.bin"):
            if p.name not in done:
                p.unlink()
    writers = {s: _SplitWriter(out, s, dtype, cfg.shard_tokens, eot, saved.get(s)) for s in SPLITS}
    written = [0]

    def save_state() -> None:
        write_json(out / STATE, {"settings": settings, "splits": {s: w.saved for s, w in writers.items()}})
        written[0] += 1
        if stop_after_shards is not None and written[0] >= stop_after_shards:
            raise _Stop

    for w in writers.values():
        w.on_shard = save_state
    if state is None:
        write_json(out / STATE, {"settings": settings, "splits": {s: w.saved for s, w in writers.items()}})
    if not (out / TOKENIZER_FILE).is_file():
        tokenizer.save(out / TOKENIZER_FILE)

    stats = ReadStats()
    encoder = _Encoder(tokenizer, cfg.workers)
    bar = tqdm(unit="B", unit_scale=True, desc="prepare", disable=not cfg.progress, smoothing=0.1)
    started = time.perf_counter()
    try:
        for metas, flat, lengths in encoder.run(_jobs(cfg, writers, stats)):
            ends = np.cumsum(lengths)
            for (g, seg, split, nbytes), end, n in zip(metas, ends, lengths):
                writers[split].add(g, seg, flat[end - n:end].astype(dtype, copy=False), nbytes)
                bar.update(nbytes)
        encoder.close()
    except _Stop:
        encoder.close(terminate=True)
        bar.close()
        for w in writers.values():
            w.abort()
        return PrepareResult(out, None, True, written[0], stats.replaced_bytes, stats.first_bad)
    except BaseException as e:
        encoder.close(terminate=True)
        bar.close()
        for w in writers.values():
            w.abort()
        if isinstance(e, UserError) and not any(w.shards for w in writers.values()):
            _undo(out, created)  # bad input found before any shard: leave no half-made folder
        raise
    bar.close()
    if writers["train"].counts["tokens"] == 0 and writers["val"].counts["tokens"] == 0:
        _undo(out, created)
        raise UserError(f"{cfg.input}: the corpus holds no text (every document is empty)")
    splits = {s: w.finish() for s, w in writers.items()}
    if splits["train"]["tokens"] == 0:
        raise UserError(f"{cfg.input}: every document fell in the validation split; lower --val-fraction")
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, **settings,
        "tokenizer": {"spec": cfg.tokenizer, "name": str(tokenizer.name), "vocab_size": int(tokenizer.vocab_size),
                      "eot_id": eot, "fingerprint": fingerprint, "file": TOKENIZER_FILE},
        "encoding": "encode_ordinary; <|endoftext|> between documents",
        "split_rule": "blake2b-64 of each segment's UTF-8 text / 2**64 < val_fraction",
        "replaced_bytes": stats.replaced_bytes,
        "files": len(stats.files),
        "seconds": round(time.perf_counter() - started, 3),
        "splits": splits,
    }
    write_json(out / MANIFEST, manifest)
    (out / STATE).unlink()
    return PrepareResult(out, manifest, False, written[0], stats.replaced_bytes, stats.first_bad)


def _undo(out: Path, created: bool) -> None:
    """Remove what this prepare wrote to `out` before its first shard."""
    for name in (STATE, TOKENIZER_FILE):
        (out / name).unlink(missing_ok=True)
    remove_stale_temporaries(out)
    if created and not any(out.iterdir()):
        out.rmdir()


def _jobs(cfg: PrepareConfig, writers: dict, stats: ReadStats) -> Iterator[tuple[list, list[str]]]:
    """Batches of segments still to encode: `(metas, texts)`, metas `(g, segment, split,
    UTF-8 bytes)`. On a resume, segments a split already holds on disk are skipped."""
    first = min(w.start_segment for w in writers.values())
    metas: list = []
    texts: list[str] = []
    chars = 0
    for g, seg in enumerate(iter_segments(cfg.input, cfg.text_field, stats)):
        if g < first:
            continue
        data = seg.text.encode("utf-8", "surrogatepass")
        split = "val" if is_validation(data, cfg.val_fraction) else "train"
        if g < writers[split].start_segment:
            continue
        metas.append((g, seg, split, len(data)))
        texts.append(seg.text)
        chars += len(seg.text)
        if chars >= BATCH_CHARS:
            yield metas, texts
            metas, texts, chars = [], [], 0
    if metas:
        yield metas, texts
