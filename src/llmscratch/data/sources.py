"""Streaming a corpus larger than memory: files, folders, globs and Hugging Face datasets,
read one piece of text at a time (what `prepare.py` tokenizes into shards).

An input is one of:

- a file: `.txt` (a document per file), `.jsonl` (a document per line, its `text_field`),
  `.parquet` (a document per row of the `text_field` column, read by row group with
  pyarrow); `.txt` and `.jsonl` may be compressed as `.gz` or `.zst` (the `zstandard`
  package). Parquet compresses inside the file, so `.parquet.gz` is refused;
- a folder: every such file under it, recursively, in sorted order (hidden ones skipped);
- a glob (`data/*.jsonl.gz`, `**` allowed): the matching files in sorted order;
- `hf:NAME[:CONFIG]`: the `train` split of a Hugging Face dataset streamed through
  `datasets` (`hf:/a/local/folder` streams a local folder of data files the same way).

`iter_segments` yields `Segment`s: a record's whole text, or a piece of a `.txt` file. A
long text file is cut into pieces of about `PIECE_CHARS` characters, each ending with a
newline between two non-space characters: GPT-2's split pattern always ends a pre-token
there, so a regex-split BPE (GPT-2's, ours) encodes the pieces one by one into exactly the
ids of the whole file. Nothing is ever held whole: a file is read in 1 MiB blocks.

Bytes that are not UTF-8 become U+FFFD and are counted (`ReadStats.replaced_bytes`, with
where the first one was): one bad byte in a 100 GB crawl should not stop a day's work,
but the manifest says it happened.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from ..errors import UserError

__all__ = ["PIECE_CHARS", "ReadStats", "Segment", "describe_input", "input_files", "iter_segments"]

PIECE_CHARS = 16_384
"""Characters per piece of a `.txt` file (about: a piece ends at the next safe cut)."""
_FORCE_CUT = 64 * PIECE_CHARS  # no safe cut this far (one huge line): cut anyway
_BLOCK = 1 << 20  # bytes read at a time
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
COMPRESSED = (".gz", ".zst")


@dataclass(frozen=True)
class Segment:
    """One piece of text: `piece` k of document `doc` (both counted from 0 in input order)."""

    doc: int
    piece: int
    text: str


@dataclass
class ReadStats:
    """What reading found: bytes that were not UTF-8 (replaced by U+FFFD) and where first."""

    replaced_bytes: int = 0
    first_bad: str = ""
    files: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------- inputs


def _kind(path: Path) -> tuple[str, str]:
    """`(format, compression)` of a file by its name: ("jsonl", "gz") for x.jsonl.gz."""
    name = path.name.lower()
    comp = next((c for c in COMPRESSED if name.endswith(c)), "")
    base = name[: len(name) - len(comp)] if comp else name
    fmt = next((s[1:] for s in TEXT_SUFFIXES if base.endswith(s)), "")
    return fmt, comp[1:]


def _supported(path: Path) -> bool:
    fmt, comp = _kind(path)
    return bool(fmt) and not (fmt == "parquet" and comp)


def input_files(spec: str) -> list[Path]:
    """The files an input names (a file, a folder or a glob), in the order they are read.

    Raises:
        UserError: nothing there, no readable file, or a file of a format we cannot read.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and _supported(p)
                        and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise UserError(f"folder {path} holds no .txt, .jsonl or .parquet files (optionally .gz/.zst)")
        return files
    if path.is_file():
        fmt, comp = _kind(path)
        if fmt == "parquet" and comp:
            raise UserError(f"{path}: a parquet file compresses inside itself; give the .parquet, not a .{comp}")
        if not fmt:
            raise UserError(f"{path}: unknown format; give .txt, .jsonl or .parquet (.txt/.jsonl may be .gz or .zst)")
        return [path]
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [p for p in files if p.is_file() and _supported(p)]
        if not files:
            raise UserError(f"no .txt, .jsonl or .parquet file matches {spec}")
        return files
    raise UserError(f"no such file, folder or glob match: {spec}")


def describe_input(spec: str) -> str:
    """The input as a manifest records it: `hf:...` as given, a local path made absolute."""
    if spec.startswith("hf:"):
        return spec
    return os.path.abspath(os.path.expanduser(spec))


# --------------------------------------------------------------------- decoding


def _open_bytes(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed on the fly for .gz / .zst."""
    _, comp = _kind(path)
    try:
        if comp == "gz":
            return gzip.open(path, "rb")
        if comp == "zst":
            try:
                import zstandard
            except ImportError:
                raise UserError(f"{path}: reading .zst needs the zstandard package: "
                                "pip install zstandard (or llmscratch[prepare])") from None
            raw = open(path, "rb")
            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
        return open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


class _Replacer:
    """A decode error handler that writes U+FFFD for each bad run of bytes and counts them."""

    def __init__(self, stats: ReadStats):
        self.stats = stats
        self.where = ""
        self.name = f"llmscratch-count-{id(self)}"
        codecs.register_error(self.name, self)

    def __call__(self, e: UnicodeDecodeError):
        if not self.stats.replaced_bytes:
            self.stats.first_bad = self.where
        self.stats.replaced_bytes += e.end - e.start
        return "\ufffd", e.end


def _read_errors(path: Path, e: Exception) -> UserError:
    if isinstance(e, EOFError) or "compressed" in str(e).lower() or isinstance(e, gzip.BadGzipFile):
        return UserError(f"{path}: the compressed data is damaged or cut short ({e})")
    return UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}")


def _txt_pieces(path: Path, replacer: _Replacer) -> Iterator[str]:
    """The text of a .txt file in pieces (see the module docstring), a leading BOM dropped."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors=replacer.name)
    buf, first, offset = "", True, 0
    with _open_bytes(path) as f:
        while True:
            try:
                block = f.read(_BLOCK)
            except Exception as e:  # noqa: BLE001 - gzip/zstd raise several kinds
                raise _read_errors(path, e) from None
            replacer.where = f"{path} near byte {offset}"
            offset += len(block)
            buf += decoder.decode(block, final=not block)
            if first and buf:
                buf, first = buf.removeprefix("\ufeff"), False
            start = 0  # pieces are cut from buf[start:]; buf is shortened once per block
            while len(buf) - start >= PIECE_CHARS:
                m = _SAFE_CUT.search(buf, start + PIECE_CHARS - 1)
                if m is None:
                    if len(buf) - start < _FORCE_CUT:
                        break
                    cut = start + _FORCE_CUT
                else:
                    cut = m.end()
                yield buf[start:cut]
                start = cut
            buf = buf[start:]
            if not block:
                break
    if buf:
        yield buf


def _field_error(where: str, text_field: str, record) -> UserError:
    if isinstance(record, dict):
        fields = ", ".join(list(record)[:10]) or "none"
        return UserError(f"{where}: no field {text_field!r} (its fields: {fields}); pass --text-field NAME")
    return UserError(f"{where}: a record must be a JSON object with a {text_field!r} field, got "
                     f"{type(record).__name__}")


def _record_text(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        raise _field_error(where, text_field, record)
    text = record[text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise UserError(f"{where}: field {text_field!r} holds {type(text).__name__}, not text")
    return text


def _jsonl_texts(path: Path, text_field: str, replacer: _Replacer) -> Iterator[str]:
    with _open_bytes(path) as f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except Exception as e:  # noqa: BLE001
                raise _read_errors(path, e) from None
            if not line:
                return
            lineno += 1
            if line.isspace():
                continue
            where = f"{path} line {lineno}"
            replacer.where = where
            try:
                record = json.loads(line.decode("utf-8", errors=replacer.name))
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield _record_text(record, text_field, where)


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading parquet needs pyarrow: pip install pyarrow (or llmscratch[prepare])") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid and OSError
        raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise UserError(f"{path}: no column {text_field!r} (its columns: {', '.join(names[:10])}); "
                        "pass --text-field NAME")
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise UserError(f"{path}: column {text_field!r} holds {type(text).__name__}, not text")
            yield text or ""


def _hf_texts(spec: str, text_field: str) -> Iterator[str]:
    """The `train` split of `hf:NAME[:CONFIG]`, streamed by `datasets`."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{spec}: Hugging Face datasets need the datasets package: pip install datasets "
                        "(or llmscratch[prepare])") from None
    rest = spec[3:]
    name, config = rest, None
    if ":" in rest and not Path(rest).exists():
        name, _, config = rest.rpartition(":")
    if not name:
        raise UserError(f"{spec}: expected hf:NAME or hf:NAME:CONFIG")
    try:
        ds = datasets.load_dataset(name, config, split="train", streaming=True)
        it = iter(ds)
    except Exception as e:  # noqa: BLE001 - network, missing dataset, bad config
        raise UserError(f"{spec}: cannot stream this dataset ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                        ) from None
    for i, record in enumerate(it):
        yield _record_text(record, text_field, f"{spec} record {i}")


# ------------------------------------------------------------------------ segments


def iter_segments(spec: str, text_field: str = "text", stats: ReadStats | None = None) -> Iterator[Segment]:
    """Every non-empty piece of text of the input, in a fixed order (see the module docstring).

    Args:
        spec: a file, folder, glob or `hf:NAME[:CONFIG]`.
        text_field: the field (jsonl) or column (parquet, hf) holding the text.
        stats: filled in as reading goes (bytes replaced, files read).

    Yields:
        `Segment(doc, piece, text)`; empty documents are skipped (and take no number).
    """
    stats = stats if stats is not None else ReadStats()
    replacer = _Replacer(stats)
    doc = 0
    if spec.startswith("hf:"):
        sources = [(spec, _hf_texts(spec, text_field), False)]
    else:
        sources = []
        for path in input_files(spec):
            fmt, _ = _kind(path)
            if fmt == "txt":
                sources.append((str(path), _txt_pieces(path, replacer), True))
            elif fmt == "jsonl":
                sources.append((str(path), _jsonl_texts(path, text_field, replacer), False))
            else:
                sources.append((str(path), _parquet_texts(path, text_field), False))
    for name, texts, pieces_of_one in sources:
        stats.files.append(name)
        piece = 0
        for text in texts:
            if not text:
                continue
            yield Segment(doc, piece, text)
            if pieces_of_one:
                piece += 1
            else:
                doc += 1
        if pieces_of_one and piece:
            doc += 1
