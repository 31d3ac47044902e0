"""Fetching one URL into one verified file: resumable, checksummed, atomic.

Used for the named datasets (`datasets.dataset_path`) and GPT-2's weights (`hub`). A broken
download resumes with an HTTP `Range` request; only a file whose sha256 matches is renamed
into place, so a path that exists is always a complete file. Plain `urllib`, no client
library.
"""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path


from ..errors import UserError
from ..utils import atomic_write, progress_bar, sha256_file

__all__ = ["ENV_DATA_DIR", "download_file", "extract_member", "reject_unless"]

# A folder already holding the dataset files: what a failed download suggests for offline use.
ENV_DATA_DIR = "LLMSCRATCH_DATA_DIR"
_CHUNK = 1 << 16  # download read size: big enough to be fast, small enough for a live bar
_TIMEOUT_S = 60  # per socket operation; a stalled server becomes a clear error, not a hang


def _network_error(url: str, offline_name: str, reason: object) -> UserError:
    return UserError(
        f"could not download {url}: {reason}; to work offline, set {ENV_DATA_DIR} to a "
        f"folder holding {offline_name}"
    )


def download_file(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None,
    *,
    progress: bool = True,
    offline_name: str | None = None,
) -> Path:
    """Download `url` to `dest`, resuming a broken download, and verify its sha256.

    Bytes stream into `dest + ".part"`. When a `.part` is already there (an earlier run was
    interrupted), we ask for the rest with `Range: bytes=N-`; a server that ignores the
    header answers 200 with the whole file, and we start over. Only a verified file is
    renamed to `dest` (atomic within one folder), so `dest` is always complete.

    Args:
        url: http(s) or file URL.
        dest: final path; its folder is created.
        sha256: expected hex digest, or None to skip the check (used for a zip whose
            member, not the zip, carries the pinned checksum).
        progress: show a tqdm bar.
        offline_name: the file a user would put in the data folder instead of downloading,
            named in the error when the network fails (default: `dest`'s name; for a zip,
            the member the product reads).

    Returns:
        `dest` as a Path.

    Raises:
        UserError: on a network or HTTP error (the `.part` stays, so the next call resumes),
            or on a checksum mismatch (the bad file is removed; both hashes are named).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        _fetch_into(url, part, progress=progress, desc=dest.name)
    except urllib.error.HTTPError as e:
        if e.code == 416 and part.exists():
            # "Range not satisfiable": the .part is probably already complete (a crash
            # between the last byte and the rename). Verify it; if it is bad, start over.
            if sha256 is not None and sha256_file(part) != sha256:
                part.unlink()
                return download_file(url, dest, sha256, progress=progress, offline_name=offline_name)
        else:
            raise _network_error(url, offline_name or dest.name, f"HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise _network_error(url, offline_name or dest.name, e.reason) from e
    except (OSError, http.client.HTTPException) as e:
        # Connection reset, timeout, or a body cut short (IncompleteRead) mid-transfer.
        raise _network_error(url, offline_name or dest.name, str(e) or type(e).__name__) from e

    if sha256 is not None:
        # a resumed download can never repair a bad .part: remove it, start clean next time
        reject_unless(part, "sha256", sha256, sha256_file(part), f"{dest.name} downloaded from {url}")
    os.replace(part, dest)
    return dest


def reject_unless(path: Path, kind: str, expected: str, got: str, what: str) -> None:
    """Remove `path` and raise a UserError naming both digests unless `got == expected`.

    Every download checks its file this way (sha256 here and for an extracted zip member,
    a git blob id for the Hub's small files), so a bad file never stays behind to be found
    and trusted by the next run.

    Args:
        path: the file just written.
        kind: the digest's name for the message ("sha256", "git sha1").
        expected, got: the pinned and the computed digest.
        what: the file and where it came from, e.g. "config.json downloaded from URL".
    """
    if got != expected:
        path.unlink()
        raise UserError(f"checksum mismatch for {what}: expected {kind} {expected}, got {got}; "
                        "the file was removed, try again or check the URL")


def _fetch_into(url: str, part: Path, *, progress: bool, desc: str) -> None:
    """Stream `url` into `part`, appending from its current size when the server allows.

    Raises urllib / http.client / OSError exceptions; `download_file` turns them into
    UserErrors.
    """
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "llmscratch"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
        status = getattr(response, "status", 200)
        if have and status != 206:
            # The server ignored Range and sends the whole file from byte 0: overwrite.
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        mode = "ab" if have else "wb"
        with (
            open(part, mode) as f,
            progress_bar(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            while block := response.read(_CHUNK):
                f.write(block)
                bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
        if total is not None and part.stat().st_size < total:
            # urllib does not always raise on a short body (e.g. HTTP/1.0 without
            # chunking); report it so the .part is kept and resumed next time.
            raise http.client.IncompleteRead(b"", total - part.stat().st_size)


def extract_member(archive: Path, member: str, dest: Path) -> None:
    """Extract one member of a zip to `dest`, atomically."""
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src:
            with atomic_write(dest, "wb") as out:
                while block := src.read(_CHUNK):
                    out.write(block)
    except KeyError as e:
        raise UserError(f"{archive} has no member {member!r}; the download is not the expected zip") from e
    except zipfile.BadZipFile as e:
        raise UserError(f"{archive} is not a valid zip file ({e}); delete it and try again") from e
