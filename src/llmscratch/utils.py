"""Small helpers shared by every stage: atomic file writes, hashing, device choice, seeding."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import IO, Iterator

import numpy as np
import torch
from safetensors.torch import save_file

from .errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; if the block succeeds, rename it over `path`.

    A crash or Ctrl-C in the middle leaves the old file (or no file) in place, never a
    half-written one: `os.replace` is atomic on POSIX and Windows within one folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp creates the file 0600; give it the permissions a plain open() would have
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what `atomic_path`'s mkstemp names look like


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files `atomic_path` leaves when its process is killed mid-write
    (`kill -9`, power loss): `.model.safetensors.k2j4x8ab.tmp` and the like. Call it where a
    run (re)starts in `folder`, before anything writes there. Returns what was removed."""
    removed = []
    for p in Path(folder).iterdir():
        if p.is_file() and _TEMP_NAME.match(p.name):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, atomically: a crash leaves the previous file intact.

    Here, below both `checkpoint` (run folders) and `weights` (Hugging Face folders), so
    that those two can depend on each other in one direction only.
    """
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """`open(path, mode)` that replaces `path` only once the block succeeds (see `atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents, or a UserError naming the file and what is wrong
    (missing, a folder, unreadable, not UTF-8)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected a file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None


def parse_json(text: str, where: str, expect: type | None = dict, line: int | None = None):
    """`json.loads(text)`, or a UserError naming `where` (a file) and the line with what is
    wrong: a syntax error and its column, nesting too deep to parse, or a top-level value
    that is not an `expect` (dict or list; None accepts anything). `line`: the file line
    `text` starts at when it is one record of a JSONL file (None: `text` is the whole file).
    """
    first = line or 1
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}:{first + e.lineno - 1}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise UserError(f"{where}:{first}: JSON nested too deeply to read") from None
    if expect is not None and not isinstance(data, expect):
        expected = {dict: "a JSON object", list: "a JSON array"}.get(expect, expect.__name__)
        at = where if line is None else f"{where}:{line}"
        raise UserError(f"{at}: expected {expected}, got {type(data).__name__}")
    return data


def read_json(path: str | os.PathLike, expect: type | None = dict):
    """The JSON value in the UTF-8 file `path` (an object by default), or a UserError naming
    the file and what is wrong with it: the one JSON reader of the package's files."""
    return parse_json(read_text(path), str(path), expect)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def physical_memory() -> int | None:
    """This machine's memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file`, with a damaged file (truncated, not safetensors, a
    header of 2^60 bytes) a one-line UserError naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except Exception as e:  # SafetensorError, or OSError for an unreadable file
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def pick_device(device: str | None = None) -> torch.device:
    """`device` if given ("cpu", "cuda", "cuda:1", "mps"), else the best one available."""
    if device and device != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda", "mps"):
            raise UserError(f"--device {device}: not a device; use cpu, cuda, cuda:N, mps or auto")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise UserError(f"--device {device}: Apple MPS is not available on this machine")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def fields_in_order(cls) -> list[dataclasses.Field]:
    """The fields of the dataclass `cls` in the order its `FIELD_ORDER` names them, then
    the fields it does not name, in declaration order.

    A subclass's fields come after its base's; a config that adds fields to a shared base
    (`train.settings.RunConfig`) names the order its users see them in (`--help`, the
    settings a run records) with `FIELD_ORDER`.
    """
    order = {name: i for i, name in enumerate(getattr(cls, "FIELD_ORDER", ()))}
    return sorted(dataclasses.fields(cls), key=lambda f: order.get(f.name, len(order)))


PROGRESS_INTERVAL_ENV = "LLMSCRATCH_PROGRESS_INTERVAL"
"""Seconds between the plain progress lines written when stderr is not a terminal (default 30)."""


class _PlainLines:
    """A stream for tqdm when it is not writing to a terminal (a log file, a pipe): a redraw
    becomes one plain line, at most one per `interval` seconds (the last one always, at
    close), without the carriage returns and padding that redraw a bar in place; blank
    writes (tqdm clearing its line) and repeats are dropped."""

    def __init__(self, stream, interval: float):
        self.stream = stream
        self.interval = interval
        self.last = None
        self.last_time = None
        self.pending = None

    def write(self, text: str, force: bool = False) -> None:
        import time

        line = text.replace("\r", "").strip()
        if not line or line == self.last:
            return
        now = time.monotonic()
        if force or self.last_time is None or now - self.last_time >= self.interval:
            self.stream.write(line + "\n")
            self.last, self.last_time, self.pending = line, now, None
        else:
            self.pending = line

    def finish(self) -> None:
        if self.pending is not None:
            self.write(self.pending, force=True)

    def flush(self) -> None:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            self.stream.flush()


def progress_bar(iterable=None, **kwargs):
    """A tqdm progress bar (same arguments) that follows the convention of tools writing to
    a log: on a terminal it redraws in place; otherwise (stderr piped or redirected) it
    writes one plain line at the start, one every `$LLMSCRATCH_PROGRESS_INTERVAL` seconds
    (default 30) and one at the end, so a log holds a readable line per interval instead of
    every redraw."""
    import sys

    from tqdm.auto import tqdm

    stream = kwargs.pop("file", None) or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if kwargs.get("disable") or (callable(isatty) and isatty()):
        return tqdm(iterable, file=stream, **kwargs)
    try:
        interval = max(float(os.environ.get(PROGRESS_INTERVAL_ENV, "30")), 0.0)
    except ValueError:
        interval = 30.0
    kwargs.update(dynamic_ncols=False, ncols=100, ascii=True, mininterval=min(interval, 0.1))
    return _plain_tqdm()(iterable, file=_PlainLines(stream, interval), **kwargs)


_PLAIN_TQDM = []


def _plain_tqdm():
    """tqdm whose close writes the last line its `_PlainLines` held back."""
    if not _PLAIN_TQDM:
        from tqdm.auto import tqdm

        class PlainTqdm(tqdm):
            def close(self):
                super().close()
                finish = getattr(self.fp, "finish", None) or getattr(getattr(self.fp, "wrapped", None), "finish", None)
                if finish is not None:
                    finish()

        _PLAIN_TQDM.append(PlainTqdm)
    return _PLAIN_TQDM[0]
