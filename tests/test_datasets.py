"""Tests for llmscratch.data.corpora: registry, downloads (against a local HTTP server), local text."""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import threading
import urllib.parse
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llmscratch.data import corpora as datasets
from llmscratch.data.corpora import (
    DATASETS,
    Document,
    dataset_names,
    dataset_path,
    download_file,
    load_text,
)
from llmscratch.errors import UserError
from llmscratch.utils import sha256_file

# The download machinery is tested on a file we make: 20 KB of the embedded corpus, served
# by a local HTTP server. The registry tests replace each named file by one they make
# (`own_files`), so none of them needs the data folder or a network.
PAYLOAD = datasets.python_docs_text().encode("utf-8")[:20_000]
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No test may read the user's data folder, a mirror, or the real cache."""
    for var in ("LLMSCRATCH_DATA_DIR", "LLMSCRATCH_DOWNLOAD_BASE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LLMSCRATCH_CACHE_DIR", str(tmp_path / "default-cache"))


# --------------------------------------------------------------------------- local HTTP server


class _Handler(BaseHTTPRequestHandler):
    """Serves files from `server.root`; honours `Range: bytes=N-` when `server.honour_range`.

    `server.cut_after` (bytes) makes the next response stop early while promising the full
    Content-Length, like a dropped connection.
    """

    def do_GET(self):  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        srv = self.server
        range_header = self.headers.get("Range")
        srv.requests.append({"path": self.path, "range": range_header})
        file = srv.root / urllib.parse.unquote(self.path.lstrip("/"))
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        start = 0
        if range_header and srv.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:
            body, srv.cut_after = body[: srv.cut_after], None
        self.wfile.write(body)

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path_factory):
    """A local file server on 127.0.0.1 (port chosen by the OS), serving `payload.txt`."""
    root = tmp_path_factory.mktemp("www")
    (root / "payload.txt").write_bytes(PAYLOAD)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.root = root
    httpd.honour_range = True
    httpd.cut_after = None
    httpd.requests = []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()




@pytest.fixture
def own_files(monkeypatch, tmp_path):
    """Every named dataset replaced by a small file this test makes, with its own sha256.

    The registry is a plain dict, so the download, cache, zip and data-folder mechanics run
    on a fresh clone with neither the data folder nor a network. Returns name -> the file.
    """
    import dataclasses

    folder = tmp_path / "own-files"
    folder.mkdir()
    made = {}
    for name, info in list(DATASETS.items()):
        if info.archive_member:  # a TSV like the real one: label<TAB>message lines
            data = "".join(f"{'spam' if i % 5 == 0 else 'ham'}\tmessage {i} for {name}\n" for i in range(50))
        else:
            data = f"{name}\n" + PAYLOAD.decode("utf-8")[:5000]
        path = folder / info.filename
        path.write_text(data, encoding="utf-8")
        monkeypatch.setitem(DATASETS, name, dataclasses.replace(info, sha256=hashlib.sha256(data.encode()).hexdigest()))
        made[name] = path
    return made


# --------------------------------------------------------------------------- downloads


def test_download_verifies_checksum(server, tmp_path):
    dest = download_file(f"{server.url}/payload.txt", tmp_path / "v.txt", PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "v.txt.part").exists()
    assert server.requests[0]["range"] is None


def test_download_resumes_after_dropped_connection(server, tmp_path):
    dest = tmp_path / "v.txt"
    url = f"{server.url}/payload.txt"
    server.cut_after = 5000
    with pytest.raises(UserError, match=re.escape(url)):
        download_file(url, dest, PAYLOAD_SHA, progress=False)
    part = tmp_path / "v.txt.part"
    assert part.stat().st_size == 5000 and not dest.exists()

    download_file(url, dest, PAYLOAD_SHA, progress=False)
    assert server.requests[-1]["range"] == "bytes=5000-"
    assert dest.read_bytes() == PAYLOAD
    assert not part.exists()


def test_download_resumes_truncated_part(server, tmp_path):
    dest = tmp_path / "v.txt"
    (tmp_path / "v.txt.part").write_bytes(PAYLOAD[:1234])
    download_file(f"{server.url}/payload.txt", dest, PAYLOAD_SHA, progress=False)
    assert [r["range"] for r in server.requests] == ["bytes=1234-"]
    assert sha256_file(dest) == PAYLOAD_SHA


def test_server_ignoring_range_restarts(server, tmp_path):
    server.honour_range = False
    dest = tmp_path / "v.txt"
    # Garbage in the .part: appending to it would fail the checksum, restarting must not.
    (tmp_path / "v.txt.part").write_bytes(b"x" * 999)
    download_file(f"{server.url}/payload.txt", dest, PAYLOAD_SHA, progress=False)
    assert server.requests[0]["range"] == "bytes=999-"
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_with_416_is_kept(server, tmp_path):
    dest = tmp_path / "v.txt"
    (tmp_path / "v.txt.part").write_bytes(PAYLOAD)
    download_file(f"{server.url}/payload.txt", dest, PAYLOAD_SHA, progress=False)
    assert len(server.requests) == 1
    assert sha256_file(dest) == PAYLOAD_SHA


def test_wrong_checksum_removes_file(server, tmp_path):
    dest = tmp_path / "v.txt"
    with pytest.raises(UserError) as err:
        download_file(f"{server.url}/payload.txt", dest, "0" * 64, progress=False)
    msg = str(err.value)
    assert "0" * 64 in msg and PAYLOAD_SHA in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []


def test_connection_refused_is_user_error(tmp_path):
    with socket.socket() as s:  # find a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/payload.txt"
    with pytest.raises(UserError, match="LLMSCRATCH_DATA_DIR") as err:
        download_file(url, tmp_path / "v.txt", PAYLOAD_SHA, progress=False)
    assert url in str(err.value)


def test_offline_error_names_the_file_the_data_folder_needs(tmp_path, monkeypatch):
    """sms-spam downloads as a zip but is read as the TSV inside it: the hint names the TSV."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("LLMSCRATCH_DOWNLOAD_BASE", f"http://127.0.0.1:{port}")
    with pytest.raises(UserError, match=r"LLMSCRATCH_DATA_DIR to a folder holding sms_spam_collection\.tsv$"):
        dataset_path("sms-spam", tmp_path, progress=False)
    with pytest.raises(UserError, match=r"folder holding the-verdict\.txt$"):
        dataset_path("the-verdict", tmp_path, progress=False)


def test_http_404_is_user_error(server, tmp_path):
    with pytest.raises(UserError, match="HTTP 404"):
        download_file(f"{server.url}/nope.txt", tmp_path / "nope.txt", PAYLOAD_SHA, progress=False)


def test_dataset_path_downloads_from_mirror_then_uses_cache(server, tmp_path, monkeypatch, own_files):
    shutil.copy(own_files["tinyshakespeare"], server.root / "tinyshakespeare.txt")
    monkeypatch.setenv("LLMSCRATCH_DOWNLOAD_BASE", server.url + "/")
    cache = tmp_path / "cache"
    path = dataset_path("tinyshakespeare", cache, progress=False)
    assert path == cache / "datasets" / "tinyshakespeare.txt"
    assert sha256_file(path) == DATASETS["tinyshakespeare"].sha256
    n = len(server.requests)
    assert dataset_path("tinyshakespeare", cache, progress=False) == path
    assert len(server.requests) == n  # cache hit: no new request


def test_damaged_cache_is_downloaded_again(server, tmp_path, own_files):
    shutil.copy(own_files["the-verdict"], server.root / "the-verdict.txt")
    cache = tmp_path / "cache"
    bad = cache / "datasets" / "the-verdict.txt"
    bad.parent.mkdir(parents=True)
    bad.write_text("not the verdict")
    path = dataset_path("the-verdict", cache, progress=False, url=f"{server.url}/the-verdict.txt")
    assert sha256_file(path) == DATASETS["the-verdict"].sha256 == sha256_file(own_files["the-verdict"])
    assert len(server.requests) == 1


def test_sms_spam_zip_is_extracted_and_verified(server, tmp_path, monkeypatch, own_files):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with zipfile.ZipFile(mirror / "sms+spam+collection.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(own_files["sms-spam"], "SMSSpamCollection")
        zf.writestr("readme", "the UCI readme")
    server.root = mirror
    monkeypatch.setenv("LLMSCRATCH_DOWNLOAD_BASE", server.url)
    cache = tmp_path / "cache"
    path = dataset_path("sms-spam", cache, progress=False)
    assert path.name == "sms_spam_collection.tsv"
    assert sha256_file(path) == DATASETS["sms-spam"].sha256
    assert server.requests[0]["path"] == "/sms+spam+collection.zip"
    assert sorted(p.name for p in path.parent.iterdir()) == ["sms_spam_collection.tsv"]


def test_zip_with_wrong_member_content_is_rejected(server, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with zipfile.ZipFile(mirror / "sms+spam+collection.zip", "w") as zf:
        zf.writestr("SMSSpamCollection", "ham\thello\n")
    server.root = mirror
    monkeypatch.setenv("LLMSCRATCH_DOWNLOAD_BASE", server.url)
    with pytest.raises(UserError, match="checksum mismatch for SMSSpamCollection"):
        dataset_path("sms-spam", tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache" / "datasets").iterdir()) == []


# --------------------------------------------------------------------------- data dir, registry


def test_data_dir_is_used_without_network(monkeypatch, tmp_path, own_files):
    data_dir = tmp_path / "data"  # a folder the user filled by hand, with every named file
    data_dir.mkdir()
    for name, info in DATASETS.items():
        shutil.copy(own_files[name], data_dir / info.filename)
    monkeypatch.setenv("LLMSCRATCH_DATA_DIR", str(data_dir))
    # A mirror that cannot answer proves no download is attempted.
    monkeypatch.setenv("LLMSCRATCH_DOWNLOAD_BASE", "http://127.0.0.1:9")
    for name, info in DATASETS.items():
        assert dataset_path(name, tmp_path / "cache", progress=False) == data_dir / info.filename
    docs = load_text("the-verdict")
    assert docs == [Document("the-verdict", (data_dir / "the-verdict.txt").read_text())]


def test_corrupted_copy_in_data_dir_is_user_error(monkeypatch, tmp_path, own_files):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    copy = data_dir / "the-verdict.txt"
    shutil.copy(own_files["the-verdict"], copy)
    with open(copy, "ab") as f:
        f.write(b"!")
    monkeypatch.setenv("LLMSCRATCH_DATA_DIR", str(data_dir))
    with pytest.raises(UserError) as err:
        dataset_path("the-verdict", tmp_path / "cache")
    msg = str(err.value)
    assert str(copy) in msg and DATASETS["the-verdict"].sha256 in msg and sha256_file(copy) in msg


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError) as err:
        dataset_path("shakespeare")
    for name in dataset_names():
        assert name in str(err.value)


def test_default_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.delenv("LLMSCRATCH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets.cache_root() == tmp_path / "xdg" / "llmscratch"
    monkeypatch.setenv("LLMSCRATCH_CACHE_DIR", str(tmp_path / "mine"))
    assert datasets.cache_root() == tmp_path / "mine"
    assert datasets.cache_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_python_docs_is_embedded(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSCRATCH_DOWNLOAD_BASE", "http://127.0.0.1:9")  # no network needed
    docs = load_text("python-docs")
    assert len(docs) == 1 and docs[0].name == "python-docs"
    assert len(docs[0].text.encode("utf-8")) > 400_000
    assert "assignment statement" in docs[0].text.lower()
    path = dataset_path("python-docs", tmp_path)
    assert path.read_text(encoding="utf-8") == docs[0].text


def test_python_stdlib_is_embedded_deterministic_and_holds_out_files(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSCRATCH_DOWNLOAD_BASE", "http://127.0.0.1:9")  # no network needed
    docs = load_text("python-stdlib")
    names = [d.name for d in docs]
    assert len(names) == len(set(names)) > 200
    assert sum(len(d.text) for d in docs) > 3_000_000  # large enough to train minutes on
    assert "argparse.py" in names and "json/decoder.py" in names
    # no tests, installed packages or generated files
    assert not [n for n in names if "test" in n.split("/")[:-1] or "site-packages" in n]
    assert "token.py" not in names and "encodings/cp1252.py" not in names
    assert "encodings/cp858.py" not in names  # a codec table not marked generated
    assert "pydoc_data/topics.py" not in names  # generated, and it is python-docs
    # training files sorted, then the held-out files sorted, chosen by path hash only
    held = [datasets._held_out(n) for n in names]
    first_held = held.index(True)
    assert not any(held[:first_held]) and all(held[first_held:])
    train, val = names[:first_held], names[first_held:]
    assert train == sorted(train) and val == sorted(val)
    val_share = sum(len(d.text) for d in docs[first_held:]) / sum(len(d.text) for d in docs)
    assert 0.10 <= val_share < 0.2  # a 10% validation tail lies inside held-out files
    assert [d.name for d in load_text("python-stdlib")] == names  # same order every time
    path = dataset_path("python-stdlib", tmp_path)
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"# file: {names[0]}\n") and f"# file: {names[-1]}\n" in text


# --------------------------------------------------------------------------- local text


def test_load_single_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes("h\u00e9llo\r\nworld".encode())
    assert load_text(f) == [Document("a.txt", "h\u00e9llo\r\nworld")]
    assert load_text(str(f)) == [Document("a.txt", "h\u00e9llo\r\nworld")]


def test_load_folder_sorted_recursive(tmp_path):
    (tmp_path / "b.txt").write_text("B")
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("C")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.txt").write_text("ignored")
    docs = load_text(tmp_path)
    assert [(d.name, d.text) for d in docs] == [("a.txt", "A"), ("b.txt", "B"), ("sub/c.txt", "C")]


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        load_text(tmp_path / "nope.txt")


def test_empty_file(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.txt is empty"):
        load_text(f)


def test_folder_without_txt(tmp_path):
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(UserError, match="no .txt files"):
        load_text(tmp_path)


def test_non_utf8_names_byte_offset(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"first line\ncaf\xe9 au lait")
    with pytest.raises(UserError) as err:
        load_text(f)
    msg = str(err.value)
    assert "latin1.txt" in msg and "byte offset 14" in msg and "line 2" in msg
    assert "--encoding-errors replace" in msg and "\n" not in msg


def test_encoding_errors_replace_and_ignore(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"caf\xe9")
    assert load_text(f, encoding_errors="replace")[0].text == "caf\ufffd"
    assert load_text(f, encoding_errors="ignore")[0].text == "caf"
    with pytest.raises(UserError, match="encoding_errors"):
        load_text(f, encoding_errors="latin-1")


def test_bom_is_dropped(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbfhello")
    assert load_text(f)[0].text == "hello"
