"""Named datasets, where their files come from, and reading a user's own text.

Three ways to get text into the pipeline, all ending in a list of `Document`s:

- Embedded, from the running Python itself, so a fresh machine can pretrain right away
  with no download: `python-docs`, the language reference (`pydoc_data.topics`, ~465 KB),
  and `python-stdlib`, the standard library's own source (~10 MB, one document per file,
  validation files held out at the end).
- Named datasets with a pinned sha256 (`the-verdict`, `tinyshakespeare`, `sms-spam`,
  `alpaca-1100`, `alpaca-preference`). `dataset_path` finds them, in this order:

  1. `$LLMSCRATCH_DATA_DIR/<file>`, a folder the user filled by hand (offline machines);
  2. the cache, `<cache root>/datasets/<file>`;
  3. a download from the registry URL (or from `$LLMSCRATCH_DOWNLOAD_BASE/<mirror name>`,
     a mirror, which is how the tests point the code at a local server).

  Every path verifies the checksum, so a file that is there is the file we expect. The
  fetching itself (resume, verify, atomic rename) is `download.py`'s, shared with `hub`.
- A path: one text file, or a folder whose `.txt` files are read recursively in sorted order.
- `repeats:CORPUS`: any of those mixed with synthetic text whose spans repeat, the
  induction-head curriculum (`synthetic.py`).

Example:
    >>> docs = load_text("python-docs")
    >>> len(docs), docs[0].name
    (1, 'python-docs')
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from .download import ENV_DATA_DIR, download_file, extract_member, reject_unless
from .synthetic import is_repeats_spec, mix_repeats, parse_repeats_spec
from ..errors import UserError
from ..utils import atomic_write, sha256_file

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "Document",
    "EMBEDDED_DATASETS",
    "cache_root",
    "dataset_names",
    "dataset_path",
    "download_file",
    "load_text",
    "python_docs_text",
    "python_stdlib_documents",
    "read_text_file",
]

log = logging.getLogger(__name__)

# Environment variables a user (or a test) sets to change where data comes from.
ENV_CACHE_DIR = "LLMSCRATCH_CACHE_DIR"  # the cache root (datasets/, tokens/ live under it)
ENV_DOWNLOAD_BASE = "LLMSCRATCH_DOWNLOAD_BASE"  # a mirror URL used instead of each entry's URL

ENCODING_ERRORS = ("strict", "replace", "ignore")



@dataclass(frozen=True)
class DatasetInfo:
    """One downloadable dataset.

    Attributes:
        name: the name users type (`--data tinyshakespeare`).
        filename: the file's name in the cache and in `$LLMSCRATCH_DATA_DIR`.
        url: where the file (or the zip holding it) is downloaded from.
        sha256: hex sha256 of the final file (for a zip: of the extracted member).
        description: one line for `--help` and listings.
        archive_member: for a zip download, the member to extract; None for a plain file.
        mirror_name: the file name under `$LLMSCRATCH_DOWNLOAD_BASE`. Plain files use
            `filename`, so a copy of the data folder is a valid mirror; zips keep the
            upstream archive's name.
    """

    name: str
    filename: str
    url: str
    sha256: str
    description: str
    archive_member: str | None = None
    mirror_name: str | None = None

    @property
    def download_name(self) -> str:
        """The file name requested from a mirror (see `mirror_name`)."""
        return self.mirror_name or self.filename


_RAW = "https://raw.githubusercontent.com"

DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in [
        DatasetInfo(
            name="the-verdict",
            filename="the-verdict.txt",
            url=f"{_RAW}/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt",
            sha256="b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
            description="Edith Wharton's short story (20 KB); the book's tiny pretraining corpus",
        ),
        DatasetInfo(
            name="tinyshakespeare",
            filename="tinyshakespeare.txt",
            url=f"{_RAW}/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            description="1.1 MB of Shakespeare (char-rnn's corpus) for pretraining",
        ),
        DatasetInfo(
            name="sms-spam",
            filename="sms_spam_collection.tsv",
            url="https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
            sha256="7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
            description="UCI SMS Spam Collection: 5,574 `label<TAB>message` lines (CC BY 4.0)",
            archive_member="SMSSpamCollection",
            mirror_name="sms+spam+collection.zip",
        ),
        DatasetInfo(
            name="alpaca-1100",
            filename="instruction-data.json",
            url=f"{_RAW}/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json",
            sha256="7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
            description="1,100 Alpaca-style instruction/input/output records",
        ),
        DatasetInfo(
            name="alpaca-preference",
            filename="instruction-data-with-preference.json",
            url=(
                f"{_RAW}/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/"
                "instruction-data-with-preference.json"
            ),
            sha256="305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
            description="the same 1,100 records with chosen/rejected responses (for DPO)",
        ),
    ]
}

# Datasets that need no download; their text comes from the running Python itself.
EMBEDDED_DATASETS: dict[str, str] = {
    "python-docs": "the Python language reference shipped with CPython (pydoc_data.topics, ~465 KB)",
    "python-stdlib": (
        "the running Python's standard-library source, tests and generated files excluded "
        "(~10 MB in 631 files on CPython 3.11; PSF licence, LICENSE.txt beside it)"
    ),
}


@dataclass(frozen=True)
class Document:
    """One piece of text with a name saying where it came from.

    Documents are kept apart (rather than concatenated here) so the tokenizing step can put
    an `<|endoftext|>` token between them and the model learns where one text ends.

    Attributes:
        name: the dataset name, or the file's path (relative to the folder that was read).
        text: the decoded text, verbatim (line endings are not normalised).
    """

    name: str
    text: str


def dataset_names() -> list[str]:
    """All names `load_text` and `dataset_path` accept, embedded first, then downloadable."""
    return [*EMBEDDED_DATASETS, *DATASETS]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The llmscratch cache folder.

    Args:
        cache_dir: an explicit folder; wins over everything else.

    Returns:
        `cache_dir`, else `$LLMSCRATCH_CACHE_DIR`, else `$XDG_CACHE_HOME/llmscratch`,
        else `~/.cache/llmscratch`. Not created here.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "llmscratch"
    return Path.home() / ".cache" / "llmscratch"


def _unknown_name_error(name: str) -> UserError:
    return UserError(f"unknown dataset {name!r}; valid names: {', '.join(dataset_names())}")


def python_docs_text() -> str:
    """The `python-docs` corpus: CPython's language reference as one text.

    `pydoc_data.topics.topics` maps topic names ("assignment", "with", ...) to plain-text
    sections of the reference. We join them in sorted key order, separated by a blank line:
    sorting makes the text independent of dict order in whichever CPython generated the
    module, and one document (not one per topic) keeps the many short topics from each
    being cut off by an `<|endoftext|>`. The text differs a little between Python versions,
    so it has no pinned checksum.

    Returns:
        The joined text (about 465 KB on CPython 3.12).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some minimal Python builds strip pydoc_data
        raise UserError(
            "dataset 'python-docs' needs the pydoc_data module, which this Python lacks; "
            "use another dataset or a path to your own text"
        ) from e
    return "\n\n".join(topics[key].strip("\n") for key in sorted(topics))


# Folders of the standard library that are not its own library code: tests, installed
# packages, bundled wheels, demos, the build configuration.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test",
                     "__pycache__", "ensurepip", "turtledemo"}
# A generated file says so in its first lines (encodings' gencodec tables, token.py, ...).
_GENERATED = re.compile(r"auto-?generated|generated (by|from)|gencodec|do not edit", re.IGNORECASE)
STDLIB_HELD_OUT_PERCENT = 12  # share of files (by a hash of the path) put last, for validation


def _held_out(relative: str) -> bool:
    """Whether a file belongs to the validation tail: a hash of its path, not its position,
    so adding one file to the library moves no other file between the splits."""
    digest = hashlib.sha256(relative.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < STDLIB_HELD_OUT_PERCENT


def python_stdlib_documents() -> list[Document]:
    """The `python-stdlib` corpus: the running interpreter's standard-library source.

    One `Document` per `.py` file, named by its path inside the library. Excluded: tests
    (`test/`, `tests/`, `idle_test/`), installed packages, bundled wheels, demos, files
    that say in their first three lines that they are generated (the codec tables,
    `token.py`, `pydoc_data/topics.py`, ...), the few codec tables that do not say so,
    and files that are not UTF-8. The order is
    deterministic: training files in sorted path order, then the held-out files (about
    12% of them, chosen by a hash of the path) in sorted order, so a validation fraction of
    up to ~10% takes its tail from files the model never trained on.

    The code is the Python Software Foundation's, under the PSF licence (`LICENSE.txt` in
    the same folder); the text differs between Python versions, so it has no checksum.

    Returns:
        The documents, training files first.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held_out = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _STDLIB_SKIP_DIRS.intersection(rel.parts[:-1]) or rel.parts[0].startswith("config-"):
            continue
        if rel.name.startswith("_sysconfigdata"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or _GENERATED.search("\n".join(text.splitlines()[:3])):
            continue
        if "decoding_table = (" in text:  # a codec's 256-entry table, even one not marked generated
            continue
        (held_out if _held_out(rel.as_posix()) else train).append(Document(rel.as_posix(), text))
    if not train:
        raise UserError(f"dataset 'python-stdlib': no standard-library source found under {root}")
    return train + held_out


def _embedded_documents(name: str) -> list[Document]:
    if name == "python-stdlib":
        return python_stdlib_documents()
    return [Document(name, python_docs_text())]


def _verify(path: Path, info: DatasetInfo) -> str:
    """Hex sha256 of `path`; raise a UserError naming the file and both hashes on a mismatch."""
    got = sha256_file(path)
    if got != info.sha256:
        raise UserError(
            f"checksum mismatch for {path}: expected sha256 {info.sha256} ({info.name}), got "
            f"{got}; replace the file with the original or remove it"
        )
    return got


def dataset_path(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    url: str | None = None,
) -> Path:
    """The local path of a named dataset's file, downloading it if needed.

    Looks in `$LLMSCRATCH_DATA_DIR`, then in `<cache root>/datasets/`, then downloads
    (see the module docstring). The checksum is verified each time, since it costs
    milliseconds for these files and catches a file edited or truncated by hand.
    The embedded corpora have no file of their own; their text is written to the cache so
    that every name maps to a path (`python-stdlib`'s files joined, each under a
    `# file: PATH` line).

    Args:
        name: a name from `dataset_names()`.
        cache_dir: the cache root (default: see `cache_root`); files go in `datasets/`.
        progress: show a download progress bar.
        url: download from here instead of the registry URL (a mirror or a local server).
            Without it, `$LLMSCRATCH_DOWNLOAD_BASE/<mirror name>` is used when set.

    Returns:
        Path of the verified file.

    Raises:
        UserError: unknown name, checksum mismatch in the data folder, or a failed download.
    """
    folder = cache_root(cache_dir) / "datasets"
    if name in EMBEDDED_DATASETS:
        path = folder / f"{name}.txt"
        docs = _embedded_documents(name)
        text = docs[0].text if len(docs) == 1 else "\n\n".join(f"# file: {d.name}\n{d.text}" for d in docs)
        data = text.encode("utf-8")
        # Rewrite only when stale, e.g. after switching to another Python version.
        if not path.exists() or path.read_bytes() != data:
            with atomic_write(path, "wb") as f:
                f.write(data)
        return path
    if name not in DATASETS:
        raise _unknown_name_error(name)
    info = DATASETS[name]

    data_dir = os.environ.get(ENV_DATA_DIR)
    if data_dir:
        local = Path(data_dir).expanduser() / info.filename
        if local.is_file():
            _verify(local, info)
            return local

    cached = folder / info.filename
    if cached.is_file():
        if sha256_file(cached) == info.sha256:
            return cached
        # Our own cache was damaged (disk error, manual edit): fetch a clean copy.
        log.warning("cached %s does not match its checksum; downloading it again", cached)
        cached.unlink()

    if url is None:
        base = os.environ.get(ENV_DOWNLOAD_BASE)
        url = f"{base.rstrip('/')}/{info.download_name}" if base else info.url

    if info.archive_member is None:
        return download_file(url, cached, info.sha256, progress=progress)

    archive = folder / info.download_name
    download_file(url, archive, None, progress=progress, offline_name=info.filename)
    try:
        extract_member(archive, info.archive_member, cached)
        reject_unless(cached, "sha256", info.sha256, sha256_file(cached),
                      f"{info.archive_member} extracted from {url}")
    finally:
        # The zip served its purpose (or is bad); either way do not keep it around.
        with contextlib.suppress(FileNotFoundError):
            archive.unlink()
    return cached


# --------------------------------------------------------------------------- local text


def _check_encoding_errors(encoding_errors: str) -> None:
    if encoding_errors not in ENCODING_ERRORS:
        raise UserError(
            f"encoding_errors={encoding_errors!r} is not valid; use one of {', '.join(ENCODING_ERRORS)}"
        )


def read_text_file(path: str | os.PathLike, *, encoding_errors: str = "strict") -> str:
    """Read a UTF-8 text file verbatim (a leading byte-order mark is dropped).

    Args:
        path: the file.
        encoding_errors: "strict" (a bad byte is an error), "replace" (becomes U+FFFD) or
            "ignore" (dropped).

    Returns:
        The decoded text.

    Raises:
        UserError: missing or empty file, or undecodable bytes under "strict", naming the
            byte offset (and line) of the first bad byte.
    """
    _check_encoding_errors(encoding_errors)
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise UserError(f"no such file: {path}") from e
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    if not data:
        raise UserError(f"{path} is empty; give a file with some text in it")
    try:
        text = data.decode("utf-8", errors=encoding_errors)
    except UnicodeDecodeError as e:
        # e.start is an index into `data`, i.e. exactly the byte offset in the file.
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"{path}: not valid UTF-8 at byte offset {e.start} (line {line}, byte "
            f"0x{data[e.start]:02x}); pass --encoding-errors replace (or ignore) to read it anyway"
        ) from None
    return text.removeprefix("\ufeff")


def _txt_files(folder: Path) -> list[Path]:
    """The `.txt` files under `folder`, recursively, sorted by relative path.

    Hidden files and folders (".ipynb_checkpoints", ".git") are skipped: they hold copies
    or tool state, not the user's corpus.
    """
    found = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() == ".txt" and p.is_file():
            found.append(p)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def load_text(
    name_or_path: str | os.PathLike,
    *,
    encoding_errors: str = "strict",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[Document]:
    """Load text for tokenizing: a named dataset, one text file, or a folder of `.txt` files.

    A string equal to a dataset name means that dataset; write `./the-verdict` for a local
    path that happens to share a name. A folder is read recursively in sorted order (the
    same corpus gives the same token stream on every machine), one Document per file.

    Args:
        name_or_path: dataset name (see `dataset_names()`), file path or folder path.
        encoding_errors: "strict", "replace" or "ignore" for undecodable bytes.
        cache_dir: cache root for named datasets (see `cache_root`).
        progress: show a progress bar if a dataset must be downloaded.

    Returns:
        The documents, in order. A named dataset or a file gives one Document.

    Raises:
        UserError: missing path, a folder without `.txt` files, an empty file, or
            undecodable bytes (with the byte offset).
    """
    _check_encoding_errors(encoding_errors)
    if is_repeats_spec(name_or_path):  # `repeats:CORPUS`: mixed with synthetic repeated spans (synthetic.py)
        opts, base = parse_repeats_spec(name_or_path)
        docs = load_text(base, encoding_errors=encoding_errors, cache_dir=cache_dir, progress=progress)
        return [Document(n, t) for n, t in mix_repeats([(d.name, d.text) for d in docs], **opts)]
    if isinstance(name_or_path, str):
        if name_or_path in EMBEDDED_DATASETS:
            return _embedded_documents(name_or_path)
        if name_or_path in DATASETS:
            path = dataset_path(name_or_path, cache_dir, progress=progress)
            return [Document(name_or_path, read_text_file(path, encoding_errors=encoding_errors))]

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        files = _txt_files(path)
        if not files:
            raise UserError(f"folder {path} holds no .txt files; put your text in *.txt files")
        return [
            Document(f.relative_to(path).as_posix(), read_text_file(f, encoding_errors=encoding_errors))
            for f in files
        ]
    if path.exists():
        return [Document(path.name, read_text_file(path, encoding_errors=encoding_errors))]
    raise UserError(
        f"no such file or folder: {path} (and not a dataset name; datasets: {', '.join(dataset_names())})"
    )
