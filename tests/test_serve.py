"""The OpenAI-compatible server, driven by the real `openai` client (and raw httpx for what
the client cannot send: malformed JSON, wrong types, dropped connections).

Every server here serves a tiny random model on 127.0.0.1 from a background thread; its
greedy output is compared with the library's own `generate`, so the API adds nothing and
loses nothing on the way.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from llmscratch import GPT, GPTConfig, UserError, generate, get_tokenizer  # noqa: E402
from llmscratch.checkpoints.run import load_model, save_model  # noqa: E402
from llmscratch.serve import (  # noqa: E402
    BackgroundServer,
    Engine,
    FairLimiter,
    create_app,
    encode_chat,
    format_chat,
    load_engine,
    read_template,
)

TOK = get_tokenizer("gpt2")


def make_run(path, template: str | None = None):
    """A tiny random GPT saved as a run folder (with a chat template if given)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny"))  # 2 layers, 64 wide, context 128
    save_model(model, path, TOK, extra={"template": template} if template else None)
    return path


def client(srv, key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def alpaca_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("alpaca-run"), template="alpaca")


@pytest.fixture(scope="module")
def srv(alpaca_dir):
    engine = load_engine(str(alpaca_dir), device="cpu", max_concurrency=2, max_tokens_limit=64)
    with BackgroundServer(create_app(engine)) as s:
        yield s


@pytest.fixture(scope="module")
def model_id(srv):
    return client(srv).models.list().data[0].id


def library_greedy(run_dir, prompt_ids, n):
    model, _ = load_model(str(run_dir))
    out = generate(model, torch.tensor([prompt_ids]), n, temperature=0.0, eos_id=TOK.eot_id)
    new = out[0, len(prompt_ids):].tolist()
    if TOK.eot_id in new:
        new = new[: new.index(TOK.eot_id)]
    return TOK.decode(new), len(new)


# ------------------------------------------------------------------ the template of a run

def test_template_is_read_from_config_json(tmp_path, alpaca_dir):
    assert read_template(alpaca_dir) == "alpaca"
    assert read_template(make_run(tmp_path / "base")) is None
    assert read_template("tiny") is None  # a preset: plain LM
    (tmp_path / "odd").mkdir()
    save_model(GPT(GPTConfig.from_name("tiny")), tmp_path / "odd", TOK, extra={"template": "chatml"})
    with pytest.raises(UserError, match="chatml.*--template"):
        load_engine(str(tmp_path / "odd"))
    assert load_engine(str(tmp_path / "odd"), template="phi3").template == "phi3"


# --------------------------------------------------------------------------- fair queueing

def test_fair_limiter_admits_in_arrival_order_and_survives_cancellation():
    async def main():
        lim = FairLimiter(1)
        order = []

        async def user(name, hold):
            await lim.acquire()
            order.append(name)
            await asyncio.sleep(hold)
            lim.release()

        await lim.acquire()  # occupy the slot so everyone queues
        tasks = [asyncio.create_task(user(n, 0.01)) for n in "abcd"]
        await asyncio.sleep(0.01)
        tasks[1].cancel()  # "b" gives up while queued: it must leave no hole behind
        await asyncio.sleep(0.01)
        assert lim.queued == 3
        lim.release()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert order == ["a", "c", "d"]
        assert lim.active == 0 and lim.queued == 0

    asyncio.run(main())


# ----------------------------------------------------------------- the API, via openai

def test_models_and_health(srv, alpaca_dir):
    models = client(srv).models.list().data
    assert [m.id for m in models] == [alpaca_dir.name]
    health = httpx.get(srv.url + "/health").json()
    assert health["status"] == "ok" and health["active"] == 0 and health["max_concurrency"] == 2


def test_completion_equals_library_greedy_decoding(srv, alpaca_dir, model_id):
    prompt = "The quick brown fox"
    r = client(srv).completions.create(model=model_id, prompt=prompt, max_tokens=12, temperature=0)
    expected, n = library_greedy(alpaca_dir, TOK.encode(prompt), 12)
    assert r.choices[0].text == expected
    assert r.usage.prompt_tokens == len(TOK.encode(prompt))
    assert r.usage.completion_tokens == n and r.usage.total_tokens == r.usage.prompt_tokens + n
    assert r.choices[0].finish_reason == ("length" if n == 12 else "stop")
    assert r.object == "text_completion" and r.id.startswith("cmpl-")


def test_streamed_completion_arrives_in_pieces_and_equals_the_whole(srv, model_id):
    c = client(srv)
    whole = c.completions.create(model=model_id, prompt="Once upon a time", max_tokens=10, temperature=0)
    chunks = list(c.completions.create(model=model_id, prompt="Once upon a time", max_tokens=10,
                                       temperature=0, stream=True))
    pieces = [ch.choices[0].text for ch in chunks if ch.choices]
    assert sum(bool(p) for p in pieces) >= 3  # token by token, not one blob at the end
    assert "".join(pieces) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_sampling_with_a_seed_is_reproducible(srv, model_id):
    c = client(srv)
    kw = dict(model=model_id, prompt="Hello", max_tokens=16, temperature=1.0, top_p=0.9, seed=1234,
              extra_body={"top_k": 50})
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text and a.usage.completion_tokens > 0


def test_stop_sequence_cuts_the_text(srv, model_id):
    c = client(srv)
    kw = dict(model=model_id, prompt="In the beginning", max_tokens=24, temperature=0)
    full = c.completions.create(**kw).choices[0].text
    assert len(full) > 12
    stop = full[6:9]
    expected = full[: full.index(stop)]
    r = c.completions.create(stop=[stop, "\x00never"], **kw)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(stop=stop, stream=True, **kw)
                       if ch.choices)
    assert streamed == expected


def test_chat_uses_the_template_and_streams(srv, model_id):
    c = client(srv)
    msgs = [{"role": "user", "content": "Name three colours."}]
    r = c.chat.completions.create(model=model_id, messages=msgs, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    # the prompt the model saw is the Alpaca prompt from config.json's "template"
    assert r.usage.prompt_tokens == len(TOK.encode(format_chat(msgs, "alpaca"))) == len(encode_chat(TOK, msgs, "alpaca"))
    chunks = list(c.chat.completions.create(model=model_id, messages=msgs, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens  # the include_usage chunk
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == [r.choices[0].finish_reason]


def test_concurrent_requests_all_complete(srv, model_id):
    c = client(srv)
    results, errors = [], []

    def one(i):
        try:
            r = c.completions.create(model=model_id, prompt=f"Request {i}", max_tokens=8, temperature=0)
            results.append(r.usage.completion_tokens)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]  # 2 run, 4 queue
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 6


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("body, status, param, code", [
    (b'{"prompt": "hi", "max_tokens": ', 400, None, "invalid_json"),
    (b'["not", "an", "object"]', 400, None, "invalid_json"),
    (b'{"prompt": "hi", "max_tokens": "ten"}', 400, "max_tokens", "invalid_type"),
    (b'{"prompt": "hi", "temperature": "hot"}', 400, "temperature", "invalid_type"),
    (b'{"prompt": "hi", "stream": "yes"}', 400, "stream", "invalid_type"),
    (b'{"prompt": 42}', 400, "prompt", "invalid_type"),
    (b'{"max_tokens": 3}', 400, "prompt", None),
    (b'{"prompt": "hi", "max_tokens": 65}', 400, "max_tokens", "invalid_value"),
    (b'{"prompt": "hi", "top_p": 1.5}', 400, "top_p", "invalid_value"),
    (b'{"prompt": [50257]}', 400, "prompt", "invalid_value"),
    (b'{"prompt": "hi", "model": "gpt-4"}', 404, "model", "model_not_found"),
    (json.dumps({"prompt": "word " * 200}).encode(), 400, "prompt", "context_length_exceeded"),
])
def test_bad_requests_get_openai_errors(srv, body, status, param, code):
    r = httpx.post(srv.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and err["code"] == code


def test_errors_through_the_openai_client_and_the_server_survives(srv, model_id):
    c = client(srv)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="limit of 64"):
        c.completions.create(model=model_id, prompt="hi", max_tokens=1000)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "many words " * 100}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model=model_id, messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("other")
    assert c.models.retrieve(model_id).id == model_id
    r = httpx.get(srv.url + "/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 2})
    assert r.status_code == 200 and httpx.get(srv.url + "/health").json()["status"] == "ok"


def test_a_failing_generation_is_a_500_and_the_server_keeps_serving(tmp_path, monkeypatch):
    engine = load_engine(str(make_run(tmp_path / "m")), device="cpu", max_concurrency=1)
    # the LM head runs once per forward pass, whichever entry point generation uses
    real_forward = engine.model.lm_head.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # the 3rd forward pass of every request blows up
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RuntimeError("boom")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(engine.model.lm_head, "forward", flaky)
    with BackgroundServer(create_app(engine)) as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 10})
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        calls["n"] = 0
        with httpx.stream("POST", s.url + "/v1/completions",
                          json={"prompt": "hi", "max_tokens": 10, "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-2])["error"]["type"] == "server_error" and events[-1] == "[DONE]"
        monkeypatch.setattr(engine.model.lm_head, "forward", real_forward)
        ok = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 10})
        assert ok.status_code == 200 and httpx.get(s.url + "/health").json()["active"] == 0


# ------------------------------------------------------------ disconnects and the key

def test_a_client_that_disconnects_mid_stream_frees_its_slot(tmp_path):
    engine = load_engine(str(make_run(tmp_path / "m")), device="cpu", max_concurrency=1, max_tokens_limit=100_000)
    with BackgroundServer(create_app(engine)) as s:
        body = {"prompt": "Tell me everything", "max_tokens": 100_000, "temperature": 1.0, "stream": True}
        with httpx.Client(timeout=30) as h:
            with h.stream("POST", s.url + "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                got = [next(lines) for _ in range(6)]  # a few events, then hang up
        assert any(g.startswith("data: {") for g in got)
        deadline = time.monotonic() + 10
        while httpx.get(s.url + "/health").json()["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(s.url + "/health").json() == {"status": "ok", "model": "m", "active": 0, "queued": 0,
                                                      "max_concurrency": 1}
        # the only slot is free again: the next request is served at once
        r = client(s).completions.create(model="m", prompt="hi", max_tokens=3, timeout=10)
        assert r.usage.completion_tokens >= 1


def test_api_key_guards_every_endpoint(tmp_path):
    engine = load_engine(str(make_run(tmp_path / "base")), device="cpu")  # no template: plain LM
    with BackgroundServer(create_app(engine, api_key="s3cret")) as s:
        for bad in ("wrong", ""):
            with pytest.raises(openai.AuthenticationError) as e:
                client(s, key=bad or "x").models.list()
            assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        assert httpx.get(s.url + "/v1/models").status_code == 401
        health = httpx.get(s.url + "/health")  # health checks carry no key; it names no model then
        assert health.status_code == 200 and health.json()["status"] == "ok" and "model" not in health.json()
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/").status_code == 200  # the static page; it asks for the key
        msgs = [{"role": "user", "content": "Hello there"}]
        r = client(s, key="s3cret").chat.completions.create(model="base", messages=msgs, max_tokens=4, temperature=0)
        # plain-LM fallback: "User: ...\nAssistant:"
        assert r.usage.prompt_tokens == len(TOK.encode("User: Hello there\nAssistant:"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_serve_reads_the_key_from_the_environment(tmp_path):
    run = make_run(tmp_path / "cli-run")
    port = free_port()
    env = dict(os.environ, LLMSCRATCH_API_KEY="from-env")
    proc = subprocess.Popen([sys.executable, "-m", "llmscratch", "serve", "--model", str(run), "--port", str(port),
                             "--device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                r = httpx.get(url + "/health", headers={"Authorization": "Bearer from-env"})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        assert r.status_code == 200
        assert httpx.get(url + "/health").status_code == 200  # no key needed for health checks
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert proc.returncode in (0, -15)


def test_cli_serve_bad_arguments_are_one_line_errors(tmp_path, capsys):
    from llmscratch.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert main(["serve", "--model", "tiny", "--max-concurrency", "0"]) == 2
    assert "--max-concurrency" in capsys.readouterr().err


def test_engine_rejects_a_bad_limit():
    model = GPT(GPTConfig.from_name("tiny"))
    with pytest.raises(UserError):
        Engine(model, TOK, "m", max_tokens_limit=0)
