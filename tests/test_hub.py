"""GPT-2 downloads (against a local server that answers like the Hub) and format conversion.

The server serves a tiny random `GPT2LMHeadModel` the tests save with transformers, under
`/{repo}/resolve/{revision}/{file}`, with the headers the Hub sends: `X-Linked-Etag` (the
sha256) on the LFS file, the git blob sha1 as `ETag` on `config.json`. It records every
request, so the tests can count them.
"""

from __future__ import annotations

import hashlib
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from llmscratch.checkpoints import hub  # noqa: E402
from llmscratch.checkpoints.run import is_run_dir, load_model, save_model  # noqa: E402
from llmscratch.errors import UserError  # noqa: E402
from llmscratch.checkpoints.convert import convert
from llmscratch.checkpoints.hub import download_gpt2  # noqa: E402
from llmscratch.models.gpt import GPT, GPTConfig  # noqa: E402
from llmscratch.tokenizer import GPT2Tokenizer, WordTokenizer, load_tokenizer  # noqa: E402
from llmscratch.hf.gpt2 import is_hf_gpt2_dir, load_hf_gpt2  # noqa: E402

REPO = "openai-community/gpt2"  # what gpt2-124m maps to
TINY = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
# The tiny model's 100 ids are fewer than GPT-2's tokenizer has; convert warns about that
# (checked once, in the round-trip test).
VOCAB_WARNING = "tokenizer has 50257 ids but the model only 100"
pytestmark = pytest.mark.filterwarnings(f"ignore:.*{VOCAB_WARNING}")


# --------------------------------------------------------------------------- a tiny checkpoint


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> tuple[Path, GPT2LMHeadModel]:
    """(folder, model): a random tiny GPT-2 saved by transformers, perturbed so no tensor is trivial."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(bos_token_id=99, eos_token_id=99, **TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(folder)
    return folder, model


def _ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))


def _assert_same_logits(ours: GPT, theirs: GPT2LMHeadModel) -> None:
    idx = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(idx), theirs.eval()(idx).logits, rtol=1e-5, atol=1e-5)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# --------------------------------------------------------------------------- a fake Hub


class _HubHandler(BaseHTTPRequestHandler):
    """GET/HEAD of `/{repo}/resolve/{rev}/{file}`, with Hub-like ETags and `Range: bytes=N-`.

    Server attributes the tests change: `files` (file name -> bytes), `sha256` (file name
    -> the sha256 to advertise, overriding the true one), `etags` (False: send no ETags),
    `redirect` (True: answer LFS files with a 302 carrying X-Linked-Etag to `/cdn/<file>`,
    like the Hub's redirect to its CDN, whose own ETag is not a sha256).
    """

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def do_HEAD(self):  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        self._serve(body=False)

    def do_GET(self):  # noqa: N802
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        srv = self.server
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        srv.requests.append((self.command, path, self.headers.get("Range")))
        name = path.rsplit("/", 1)[-1]
        on_cdn = path.startswith("/cdn/")
        valid = on_cdn or path.startswith(f"/{srv.repo}/resolve/{srv.revision}/")
        if not valid or name not in srv.files:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = srv.files[name]
        lfs = name.endswith(".safetensors")
        sha = srv.sha256.get(name, _sha256(data))
        if srv.redirect and lfs and not on_cdn:
            self.send_response(302)
            self.send_header("Location", f"/cdn/{name}")
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        range_header = self.headers.get("Range")
        if range_header and body:
            start = int(range_header.removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        if srv.etags and on_cdn:
            self.send_header("ETag", f'"{hashlib.md5(data).hexdigest()}"')  # a CDN's own etag
        elif srv.etags and lfs:
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("ETag", f'"{sha}"')
        elif srv.etags:
            self.send_header("ETag", f'"{srv.git_sha1.get(name, _git_sha1(data))}"')
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if body:
            self.wfile.write(data[start:])


@pytest.fixture()
def fake_hub(hf_model, monkeypatch):
    """A local Hub serving the tiny checkpoint as `openai-community/gpt2` at revision main."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    folder, _ = hf_model
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
    server.repo, server.revision = REPO, "main"
    server.files = {f: (folder / f).read_bytes() for f in ("config.json", "model.safetensors")}
    server.sha256, server.git_sha1 = {}, {}
    server.etags, server.redirect = True, False
    server.requests = []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def _gets(server, name: str) -> list:
    return [r for r in server.requests if r[0] == "GET" and r[1].endswith("/" + name)]


# --------------------------------------------------------------------------- download_gpt2


def test_download_loads_and_matches_transformers(fake_hub, hf_model, tmp_path):
    out = download_gpt2("gpt2-124m", tmp_path / "gpt2", endpoint=fake_hub.url, progress=False)
    assert out == tmp_path / "gpt2"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    _assert_same_logits(load_hf_gpt2(out), hf_model[1])
    # Each file: one HEAD for its checksum, one GET for its bytes, at the Hub's URL layout.
    assert sorted(fake_hub.requests) == sorted(
        (method, f"/{REPO}/resolve/main/{f}", None)
        for method in ("HEAD", "GET")
        for f in ("config.json", "model.safetensors")
    )


def test_download_reads_hf_endpoint_and_defaults_to_the_cache(fake_hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url + "/")
    monkeypatch.setenv("LLMSCRATCH_CACHE_DIR", str(tmp_path / "cache"))
    out = download_gpt2("gpt2-124m", progress=False)
    assert out == tmp_path / "cache" / "models" / "gpt2-124m"
    assert is_hf_gpt2_dir(out)
    # the Hub's own names are accepted and land in the same folder
    assert download_gpt2("openai-community/gpt2", progress=False) == out
    assert download_gpt2("GPT2", progress=False) == out


def test_second_call_downloads_nothing(fake_hub, tmp_path):
    download_gpt2("gpt2-124m", tmp_path / "m", endpoint=fake_hub.url, progress=False)
    assert len(_gets(fake_hub, "model.safetensors")) == 1
    fake_hub.requests.clear()
    download_gpt2("gpt2-124m", tmp_path / "m", endpoint=fake_hub.url, progress=False)
    assert fake_hub.requests == []


def test_only_the_missing_file_is_fetched(fake_hub, tmp_path):
    out = download_gpt2("gpt2-124m", tmp_path / "m", endpoint=fake_hub.url, progress=False)
    (out / "config.json").unlink()
    fake_hub.requests.clear()
    download_gpt2("gpt2-124m", out, endpoint=fake_hub.url, progress=False)
    assert _gets(fake_hub, "model.safetensors") == []
    assert len(_gets(fake_hub, "config.json")) == 1


def test_truncated_part_resumes_with_range(fake_hub, hf_model, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    data = fake_hub.files["model.safetensors"]
    half = len(data) // 2
    (out / "model.safetensors.part").write_bytes(data[:half])
    download_gpt2("gpt2-124m", out, endpoint=fake_hub.url, progress=False)
    assert [r[2] for r in _gets(fake_hub, "model.safetensors")] == [f"bytes={half}-"]
    assert (out / "model.safetensors").read_bytes() == data
    assert not (out / "model.safetensors.part").exists()
    _assert_same_logits(load_hf_gpt2(out), hf_model[1])


def test_wrong_sha256_is_an_error_and_leaves_no_file(fake_hub, tmp_path):
    fake_hub.sha256["model.safetensors"] = "0" * 64
    out = tmp_path / "m"
    with pytest.raises(UserError, match="checksum mismatch.*model.safetensors"):
        download_gpt2("gpt2-124m", out, endpoint=fake_hub.url, progress=False)
    assert not (out / "model.safetensors").exists()
    assert not (out / "model.safetensors.part").exists()


def test_wrong_git_sha1_of_config_is_an_error(fake_hub, tmp_path):
    fake_hub.git_sha1["config.json"] = "1" * 40
    out = tmp_path / "m"
    with pytest.raises(UserError, match="checksum mismatch.*config.json"):
        download_gpt2("gpt2-124m", out, endpoint=fake_hub.url, progress=False)
    assert [p.name for p in out.iterdir()] == []


def test_hub_redirect_keeps_head_and_reads_the_linked_etag(fake_hub, hf_model, tmp_path):
    fake_hub.redirect = True
    out = download_gpt2("gpt2-124m", tmp_path / "m", endpoint=fake_hub.url, progress=False)
    _assert_same_logits(load_hf_gpt2(out), hf_model[1])
    cdn = [r[0] for r in fake_hub.requests if r[1] == "/cdn/model.safetensors"]
    assert cdn == ["HEAD", "GET"]  # the redirected HEAD stayed a HEAD: one download only
    # the sha256 came from the redirect (the CDN's ETag is an md5): a wrong one is caught
    fake_hub.sha256["model.safetensors"] = "f" * 64
    with pytest.raises(UserError, match="checksum mismatch"):
        download_gpt2("gpt2-124m", tmp_path / "m2", endpoint=fake_hub.url, progress=False)


def test_no_etag_downloads_with_a_warning(fake_hub, hf_model, tmp_path):
    fake_hub.etags = False
    with pytest.warns(UserWarning, match="without a checksum"):
        out = download_gpt2("gpt2-124m", tmp_path / "m", endpoint=fake_hub.url, progress=False)
    _assert_same_logits(load_hf_gpt2(out), hf_model[1])


def test_files_that_do_not_load_are_an_error(fake_hub, tmp_path):
    cfg = GPT2Config(**{**TINY, "n_embd": 48}).to_json_string().encode()
    fake_hub.files["config.json"] = cfg
    with pytest.raises(UserError, match="not a usable GPT-2 checkpoint.*shape"):
        download_gpt2("gpt2-124m", tmp_path / "m", endpoint=fake_hub.url, progress=False)


def test_http_errors_are_user_errors(fake_hub, tmp_path):
    with pytest.raises(UserError, match="HTTP 404.*revision"):
        download_gpt2("gpt2-124m", tmp_path / "m", endpoint=fake_hub.url, revision="nope", progress=False)
    with pytest.raises(UserError, match="HTTP 404"):
        download_gpt2("gpt2-355m", tmp_path / "m", endpoint=fake_hub.url, progress=False)
    with pytest.raises(UserError, match="not an http"):
        download_gpt2("gpt2-124m", tmp_path / "m", endpoint="ftp://example", progress=False)


def test_unreachable_server_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
    port = server.server_address[1]
    server.server_close()  # nothing listens on the port now
    with pytest.raises(UserError, match="could not reach.*HF_HUB_OFFLINE"):
        download_gpt2("gpt2-124m", tmp_path / "m", endpoint=f"http://127.0.0.1:{port}", progress=False)


def test_offline_without_files_is_an_error(fake_hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE.*offline.*model.safetensors"):
        download_gpt2("gpt2-124m", tmp_path / "m", endpoint=fake_hub.url, progress=False)
    assert fake_hub.requests == []


def test_offline_with_complete_files_needs_no_requests(fake_hub, hf_model, monkeypatch, tmp_path):
    out = download_gpt2("gpt2-124m", tmp_path / "m", endpoint=fake_hub.url, progress=False)
    fake_hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download_gpt2("gpt2-124m", out, endpoint=fake_hub.url, progress=False) == out
    assert fake_hub.requests == []
    _assert_same_logits(load_hf_gpt2(out), hf_model[1])


def test_unknown_name_lists_the_valid_ones():
    valid = "gpt2-124m, gpt2-355m, gpt2-774m, gpt2-1558m"
    with pytest.raises(UserError, match=f"unknown GPT-2 model 'gpt3'.*{valid}"):
        download_gpt2("gpt3")


def test_download_refuses_a_run_folder_or_file(tmp_path):
    save_model(GPT(GPTConfig.from_name("tiny", vocab_size=50)), tmp_path / "run")
    with pytest.raises(UserError, match="run folder"):
        download_gpt2("gpt2-124m", tmp_path / "run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        download_gpt2("gpt2-124m", tmp_path / "file")


# --------------------------------------------------------------------------- convert


def test_convert_round_trip_keeps_the_logits(hf_model, tmp_path):
    src, reference = hf_model
    with pytest.warns(UserWarning, match=VOCAB_WARNING):
        run = convert(src, tmp_path / "run")
    assert run == tmp_path / "run" and is_run_dir(run)
    model, tokenizer = load_model(str(run))
    assert isinstance(tokenizer, GPT2Tokenizer)
    _assert_same_logits(model, reference)

    back = convert(run, tmp_path / "hf")
    assert is_hf_gpt2_dir(back) and not is_run_dir(back)
    _assert_same_logits(load_hf_gpt2(back), reference)
    theirs = GPT2LMHeadModel.from_pretrained(back).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(_ids()).logits, reference(_ids()).logits, rtol=1e-5, atol=1e-5)


def test_convert_run_with_own_tokenizer_warns_and_keeps_it(tmp_path):
    tok = WordTokenizer.from_text("the cat sat on the mat and the dog sat on the log")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", vocab_size=tok.vocab_size))
    save_model(model, tmp_path / "run", tok)
    with pytest.warns(UserWarning, match="word tokenizer, which transformers' AutoTokenizer cannot load"):
        hf = convert(tmp_path / "run", tmp_path / "hf")
    copied = (hf / "llmscratch_tokenizer.json").read_bytes()
    assert copied == (tmp_path / "run" / "tokenizer.json").read_bytes()
    # and back: the run folder gets the word tokenizer again, not GPT-2's
    run2 = convert(hf, tmp_path / "run2")
    assert load_tokenizer(run2).encode("the cat") == tok.encode("the cat")
    again, _ = load_model(str(run2))
    idx = torch.randint(0, tok.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(idx), model.eval()(idx))


def test_convert_to_forces_the_format(hf_model, tmp_path):
    src, reference = hf_model
    hf = convert(src, tmp_path / "hf", to="hf")  # a re-write: still a HF folder
    assert is_hf_gpt2_dir(hf) and not is_run_dir(hf)
    _assert_same_logits(load_hf_gpt2(hf), reference)
    with pytest.raises(UserError, match="'hf' or 'run'"):
        convert(src, tmp_path / "x", to="gguf")


def test_convert_into_an_empty_folder_works_but_not_a_full_one(hf_model, tmp_path):
    src, _ = hf_model
    (tmp_path / "empty").mkdir()
    assert is_run_dir(convert(src, tmp_path / "empty"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        convert(src, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no leftovers


def test_convert_bad_src_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        convert(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="got a file"):
        convert(tmp_path / "file", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither an llmscratch run folder nor a Hugging Face"):
        convert(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(UserError, match="model_type is 't5'"):
        convert(tmp_path / "t5", tmp_path / "out")
    (tmp_path / "bert").mkdir()  # BERT is supported (test_bert.py); a folder without weights is not
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UserError, match="config.json lacks 'vocab_size'"):
        convert(tmp_path / "bert", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_public_names():
    assert hub.gpt2_names() == ["gpt2-124m", "gpt2-355m", "gpt2-774m", "gpt2-1558m"]
    hf_names = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
    assert list(hub.GPT2_REPOS.values()) == [f"openai-community/{n}" for n in hf_names]
