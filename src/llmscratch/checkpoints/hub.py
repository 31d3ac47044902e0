"""Checkpoints from the Hugging Face Hub: GPT-2's sizes, modern decoders and BERT.

`download_gpt2("gpt2-124m")` fetches `config.json` and `model.safetensors` of one of the four
GPT-2 sizes into a cache folder and returns it; `load_hf` (or `--model <folder>`) then
loads it. `download_model` does the same for every name in `MODEL_REPOS`, with the files
each family needs (a modern decoder's `tokenizer.json`, a BERT's `vocab.txt`). The
download goes through `download.download_file`, so it resumes a broken transfer, verifies
a checksum and renames only a verified file into place.

Where the checksum comes from: the Hub stores big files with Git LFS and answers a `HEAD`
on a file's `resolve` URL with the file's sha256 in the `X-Linked-Etag` header (a small,
non-LFS file such as `config.json` gets its git blob id, a sha1, in `ETag` instead). We
ask for those headers first and verify the bytes against them. A server that sends
neither (some mirrors) still works, with a warning that nothing was verified.

Environment variables, as `huggingface_hub` reads them:

- `HF_ENDPOINT`: another Hub (a mirror, or a local server in the tests);
- `HF_HUB_OFFLINE=1`: no network at all; only files already downloaded are used.

Example::

    folder = download_gpt2("gpt2-124m")              # ~/.cache/llmscratch/models/gpt2-124m
    model = load_hf(folder)                          # or convert(folder, "runs/gpt2"): convert.py
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..data.corpora import cache_root
from ..data.download import download_file, reject_unless
from ..errors import UserError
from ..hf.common import CONFIG_FILE, SAFETENSORS_FILE
from ..hf.registry import load_hf
from .run import is_run_dir

__all__ = ["GPT2_REPOS", "MODEL_REPOS", "download_gpt2", "download_model", "gpt2_names", "model_names"]

GPT2_REPOS: dict[str, str] = {
    "gpt2-124m": "openai-community/gpt2",
    "gpt2-355m": "openai-community/gpt2-medium",
    "gpt2-774m": "openai-community/gpt2-large",
    "gpt2-1558m": "openai-community/gpt2-xl",
}
"""Our name for each GPT-2 size -> its Hugging Face repository."""

MODEL_REPOS: dict[str, str] = {
    **GPT2_REPOS,
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",  # gated: accept Meta's licence on the Hub first
    "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "bert-base-uncased": "google-bert/bert-base-uncased",  # an encoder
}
"""Every checkpoint `download_model` knows: GPT-2's sizes, the modern decoders whose
shapes are presets (`GPTConfig.from_name`) and BERT."""

# The Hub's own names are accepted too ("gpt2-medium", "openai-community/gpt2-medium",
# "Qwen/Qwen3-0.6B"), in any case.
_ALIASES: dict[str, str] = {
    alias.lower(): name
    for name, repo in MODEL_REPOS.items()
    for alias in (repo, repo.split("/", 1)[1])
}

DEFAULT_ENDPOINT = "https://huggingface.co"
ENV_ENDPOINT = "HF_ENDPOINT"
ENV_OFFLINE = "HF_HUB_OFFLINE"
# The files of a checkpoint, in download order: the small config first, so a wrong
# endpoint or revision fails in a second instead of after a gigabyte.
HUB_FILES = (CONFIG_FILE, SAFETENSORS_FILE)
# A modern decoder also needs its own tokenizer and chat template (GPT-2's is built in).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# A BERT needs its WordPiece vocabulary and its casing.
BERT_FILES = ("vocab.txt", "tokenizer_config.json")

_TIMEOUT_S = 60
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_SHA1_RE = re.compile(r"[0-9a-f]{40}")


def gpt2_names() -> list[str]:
    """The names `download_gpt2` accepts (besides the Hub's own repository names)."""
    return list(GPT2_REPOS)


def model_names() -> list[str]:
    """Every name `download_model` accepts (besides the Hub's own repository names)."""
    return list(MODEL_REPOS)


def _canonical_name(name: str, known: dict[str, str] = MODEL_REPOS) -> str:
    key = str(name).strip().lower()
    key = key if key in known else _ALIASES.get(key, key)
    if key in known:
        return key
    kind = "GPT-2 model" if known is GPT2_REPOS else "model"
    raise UserError(f"unknown {kind} {name!r}; valid names: {', '.join(known)}")


def _offline() -> bool:
    """`HF_HUB_OFFLINE` set to a true value, spelled as huggingface_hub accepts it."""
    return os.environ.get(ENV_OFFLINE, "").strip().upper() in ("1", "ON", "YES", "TRUE")


# --------------------------------------------------------------------------- checksums


@dataclass(frozen=True)
class _Expected:
    """What the server says a file's bytes hash to (either, or neither, may be known)."""

    sha256: str | None = None  # LFS files: X-Linked-Etag
    git_sha1: str | None = None  # regular git files: ETag is the git blob id


def _etag_value(raw: str | None) -> str:
    """`W/"abc"` -> `abc`; lower-case hex or whatever else the header held."""
    if not raw:
        return ""
    raw = raw.strip()
    if raw.startswith("W/"):
        raw = raw[2:]
    return raw.strip('"').strip().lower()


class _KeepHeadRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects keeping the HEAD method, and remembers every hop's headers.

    urllib turns a redirected HEAD into a GET, which would start downloading the
    gigabyte we only wanted the headers of. And the Hub puts `X-Linked-Etag` on its own
    redirect to the CDN, not on the CDN's final answer, so the hops' headers matter.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hops: list = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.hops.append(headers)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.method = req.get_method()
        return new


def _expected_checksum(url: str) -> _Expected:
    """HEAD `url` (following redirects) and read the file's checksum from its ETags.

    Raises:
        UserError: the server cannot be reached or answers with an HTTP error.
    """
    redirects = _KeepHeadRedirects()
    opener = urllib.request.build_opener(redirects)
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "llmscratch"})
    try:
        with opener.open(request, timeout=_TIMEOUT_S) as response:
            hops = [*redirects.hops, response.headers]
    except urllib.error.HTTPError as e:
        hint = " (check the model name, the revision and the endpoint)" if e.code in (401, 403, 404) else ""
        raise UserError(f"could not download {url}: HTTP {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or str(e) or type(e).__name__
        raise UserError(
            f"could not reach {url}: {reason}; set {ENV_OFFLINE}=1 to use files already "
            f"downloaded, or {ENV_ENDPOINT} to a mirror"
        ) from None
    # Linked etags (the LFS sha256) win over plain ones, earlier hops over later: the
    # first hop is the Hub itself, later ones a CDN whose ETag is its own business.
    candidates = [_etag_value(h.get("X-Linked-Etag")) for h in hops]
    candidates += [_etag_value(h.get("ETag")) for h in hops]
    for value in candidates:
        if _SHA256_RE.fullmatch(value):
            return _Expected(sha256=value)
    first = _etag_value(hops[0].get("ETag"))
    if _SHA1_RE.fullmatch(first):
        return _Expected(git_sha1=first)
    return _Expected()


def _git_blob_sha1(path: Path) -> str:
    """Git's id for a file's contents: sha1 of `b"blob <size>\\0"` + the bytes."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _download_verified(url: str, dest: Path, *, progress: bool) -> None:
    """Download `url` to `dest`, checked against the checksum the server advertises."""
    expected = _expected_checksum(url)
    if expected.sha256:
        download_file(url, dest, expected.sha256, progress=progress)
        return
    if expected.git_sha1:
        # download_file checks only sha256s: land the file under another name, check its
        # git id, and only then give it the final name, so `dest` is always verified.
        staging = dest.with_name(dest.name + ".unverified")
        download_file(url, staging, None, progress=progress)
        reject_unless(staging, "git sha1", expected.git_sha1, _git_blob_sha1(staging),
                      f"{dest.name} downloaded from {url}")
        os.replace(staging, dest)
        return
    warnings.warn(
        f"{url}: the server sent no sha256 or git ETag, so {dest.name} is downloaded without a checksum",
        stacklevel=3,
    )
    download_file(url, dest, None, progress=progress)


# --------------------------------------------------------------------------- download


def _tokenizer_files(name: str) -> tuple[str, ...]:
    """The files beside the weights that checkpoint `name` needs: none for GPT-2 (its
    tokenizer is built in), the vocabulary for BERT, `tokenizer.json` for the others."""
    if name in GPT2_REPOS:
        return ()
    return BERT_FILES if name.startswith("bert-") else TOKENIZER_FILES


def _model_folder(name: str, revision: str) -> Path:
    """`<cache>/models/<name>`; another revision than main gets its own folder."""
    if revision == "main":
        return cache_root() / "models" / name
    return cache_root() / "models" / f"{name}@{re.sub(r'[^A-Za-z0-9._-]', '-', revision)}"


def download_gpt2(name: str, out: str | os.PathLike | None = None, **kwargs) -> Path:
    """Download one of OpenAI's GPT-2 checkpoints: `download_model` restricted to GPT-2."""
    _canonical_name(name, GPT2_REPOS)
    return download_model(name, out, **kwargs)


def download_model(
    name: str,
    out: str | os.PathLike | None = None,
    *,
    endpoint: str | None = None,
    revision: str = "main",
    progress: bool = True,
) -> Path:
    """Download a checkpoint from the Hugging Face Hub: one of OpenAI's GPT-2 sizes, or a
    modern decoder (Llama 3.2, Qwen3, SmolLM2) with its `tokenizer.json` and chat template.

    Files already complete in the folder are not fetched again (a file gets its final
    name only once it is complete and verified), so a second call makes no requests. A
    broken download resumes from its `.part` file.

    Args:
        name: a key of `MODEL_REPOS` (`gpt2-124m`, `qwen3-0.6b`, ...) or its Hub repository
            id (`gpt2-medium`, `openai-community/gpt2-xl`, `Qwen/Qwen3-0.6B`, ...).
        out: the folder to fill; default `<cache root>/models/<name>` (see
            `datasets.cache_root`; `$LLMSCRATCH_CACHE_DIR` moves it).
        endpoint: the Hub's URL; default `$HF_ENDPOINT`, else https://huggingface.co.
        revision: branch, tag or commit of the repository.
        progress: show a progress bar per file.

    Returns:
        The folder, holding `config.json` and `model.safetensors` (and for a modern decoder
        `tokenizer.json` + `tokenizer_config.json`, for BERT `vocab.txt` +
        `tokenizer_config.json`); load it with `load_hf(folder)`.

    Raises:
        UserError: unknown name, `HF_HUB_OFFLINE` set while files are missing, a network
            or HTTP error, a checksum mismatch, or files that do not load as the model named.
    """
    canonical = _canonical_name(name)
    repo = MODEL_REPOS[canonical]
    revision = str(revision).strip()
    if not revision:
        raise UserError("revision must not be empty (use 'main' for the latest)")
    folder = Path(out).expanduser() if out is not None else _model_folder(canonical, revision)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder")
    if is_run_dir(folder):
        raise UserError(f"{folder}: is an llmscratch run folder; download {canonical} into another folder")

    files = HUB_FILES + _tokenizer_files(canonical)
    missing = [f for f in files if not (folder / f).is_file()]
    if not missing:
        return folder
    if _offline():
        raise UserError(
            f"{ENV_OFFLINE} is set (offline mode) and {folder} lacks {', '.join(missing)}; "
            f"download {canonical} once with network access (unset {ENV_OFFLINE}), "
            "or pass a local Hugging Face checkpoint folder instead"
        )

    base = (endpoint or os.environ.get(ENV_ENDPOINT) or DEFAULT_ENDPOINT).strip().rstrip("/")
    if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
        raise UserError(f"endpoint {base!r} is not an http(s) URL")
    for file in missing:
        url = f"{base}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/{file}"
        _download_verified(url, folder / file, progress=progress)

    try:
        # On the meta device: every tensor's name and shape is checked against config.json
        # without holding the weights in memory (GPT-2 XL is 6 GB in float32).
        load_hf(folder, device="meta")
    except UserError as e:
        raise UserError(
            f"{folder}: the downloaded files are not a usable "
            f"{'GPT-2' if canonical in GPT2_REPOS else canonical} checkpoint ({e}); "
            "delete the folder and check the endpoint and revision"
        ) from None
    return folder
