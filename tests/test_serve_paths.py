"""Serving paths nothing else runs: int8 and bf16 weights through ragged batches and the
server, `/v1/embeddings` behind an API key, and `llmscratch serve` on an encoder from the
command line on a non-local address (the warning it prints)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")

from llmscratch import get_tokenizer  # noqa: E402
from llmscratch.checkpoints.run import load_model, save_model  # noqa: E402
from llmscratch.decoding.engine import Engine as Decoding  # noqa: E402
from llmscratch.decoding.sampling import GREEDY  # noqa: E402
from llmscratch.serve import BackgroundServer, create_app, load_engine  # noqa: E402

TOK = get_tokenizer("gpt2")
PROMPTS = ["Once upon a time", "The", "A long time ago in a galaxy far", "Hello there"]


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


@pytest.mark.parametrize("dtype", ["int8", torch.bfloat16])
def test_low_precision_ragged_rows_equal_each_row_alone(run_dir, dtype):
    """Rows of four lengths decoded together (left-aligned, own positions, a key mask) give
    each row's tokens decoded alone, in int8 and in bf16 weights."""
    model, _ = load_model(str(run_dir), dtype=dtype)
    dec = Decoding(model)
    rows = dec.run([dec.row(TOK.encode(p), 8, GREEDY) for p in PROMPTS], batch_size=4)
    alone = [dec.run([dec.row(TOK.encode(p), 8, GREEDY)])[0] for p in PROMPTS]
    assert [r.tokens for r in rows] == [a.tokens for a in alone]
    # and the model really is in that precision
    if dtype == "int8":
        assert getattr(model, "quantized", None) == "int8"
    else:
        assert model.wte.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ["int8", torch.bfloat16])
def test_low_precision_through_the_server(run_dir, dtype):
    """Four concurrent greedy requests to a batching server of int8 / bf16 weights: each
    reply is the library's greedy decoding of that prompt on the same weights."""
    import asyncio

    model, _ = load_model(str(run_dir), dtype=dtype)
    dec = Decoding(model)
    expected = [TOK.decode([t for t in dec.run([dec.row(TOK.encode(p), 8, GREEDY)])[0].tokens if t != TOK.eot_id])
                for p in PROMPTS]
    engine = load_engine(str(run_dir), device="cpu", dtype=dtype, max_tokens_limit=8, max_batch_size=4)

    async def ask(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            rs = await asyncio.gather(*[c.post("/v1/completions", json={"prompt": p, "max_tokens": 8, "temperature": 0})
                                        for p in PROMPTS])
            return [r.json()["choices"][0]["text"] for r in rs]

    with BackgroundServer(create_app(engine)) as s:
        assert asyncio.run(ask(s.url)) == expected


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, docs_text):
    from llmscratch.models.bert import Bert, BertConfig
    from llmscratch.tokenizer import WordPieceTokenizer

    tok = WordPieceTokenizer.from_corpus([docs_text[:5000]], 200)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("enc")
    save_model(Bert(BertConfig.from_name("bert-tiny", vocab_size=tok.vocab_size, context_length=32)), out, tok)
    return out


def test_embeddings_behind_an_api_key(encoder_dir):
    from llmscratch.decoding.encoder import embed_texts

    model, tok = load_model(str(encoder_dir))
    expected = embed_texts(model, tok, ["the function returns"])[0]
    with BackgroundServer(create_app(load_engine(str(encoder_dir), model_name="enc"), api_key="s3cret")) as s:
        body = {"input": "the function returns", "encoding_format": "float"}
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            r = httpx.post(s.url + "/v1/embeddings", json=body, headers=headers, timeout=60)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        r = httpx.post(s.url + "/v1/embeddings", json=body, headers={"authorization": "Bearer s3cret"}, timeout=60)
        assert r.status_code == 200
        torch.testing.assert_close(torch.tensor(r.json()["data"][0]["embedding"]), expected, atol=1e-5, rtol=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_an_encoder_on_a_non_local_host_with_a_warning(encoder_dir):
    """`llmscratch serve --model ENCODER --host 0.0.0.0` without a key: it warns that anyone
    who can reach it can use the model, and serves embeddings (chat is a 400)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LLMSCRATCH_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "llmscratch", "serve", "--model", str(encoder_dir),
                             "--host", "0.0.0.0", "--port", str(port), "--device", "cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                httpx.get(url + "/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        r = httpx.post(url + "/v1/embeddings", json={"input": ["a b", "c"]}, timeout=60)
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=60)
        assert r.status_code == 400
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "listening on 0.0.0.0 without an API key" in out, out
    assert "Traceback" not in out
