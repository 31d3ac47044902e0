"""The server against hostile input: every request answered with a 4xx and OpenAI's error
body (never a 500), one request never failing another, the queue bound held under a burst,
an abandoned request's slot given back, and a schema-driven fuzz of every route.

Every server serves a tiny random model on 127.0.0.1 from a background thread.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from llmscratch import get_tokenizer  # noqa: E402
from llmscratch.checkpoints.run import save_model  # noqa: E402
from llmscratch.decoding.batching import BatchDecoder, DecodeRow  # noqa: E402
from llmscratch.decoding.engine import Engine as Decoding  # noqa: E402
from llmscratch.serve import BackgroundServer, create_app, load_engine  # noqa: E402

TOK = get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def srv(run_dir):
    engine = load_engine(str(run_dir), device="cpu", max_tokens_limit=8, max_batch_size=4, model_name="m")
    with BackgroundServer(create_app(engine)) as s:
        yield s


def post(srv, path: str, body: bytes | dict, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(srv.url + path, content=content, headers={"content-type": "application/json"},
                      timeout=60, **kw)


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# ------------------------------------------------------------------ sampling that underflows
def test_tiny_top_p_and_temperature_sample_the_likeliest_token(srv):
    """top_p 1e-50 is 0 in float32 and logits / 1e-300 overflow: both used to fail
    `multinomial` (a 500); both now keep only the likeliest token: greedy's reply."""
    greedy = post(srv, "/v1/completions", {"prompt": "Once upon", "max_tokens": 8, "temperature": 0})
    assert greedy.status_code == 200, greedy.text
    for extra in ({"top_p": 1e-50}, {"temperature": 1e-300}, {"temperature": 5e-324, "top_p": 1e-300},
                  {"temperature": 1e-40}):
        r = post(srv, "/v1/completions", {"prompt": "Once upon", "max_tokens": 8, "seed": 1, **extra})
        assert r.status_code == 200, (extra, r.text)
        assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"], extra


def test_a_row_whose_draw_fails_ends_alone(run_dir, monkeypatch):
    """One row failing to sample ends that row ("error") and no other: the rest of the batch
    decodes exactly what it decodes without it."""
    from llmscratch.checkpoints.run import load_model
    from llmscratch.decoding import sampling

    model, _ = load_model(str(run_dir))
    dec = Decoding(model.eval())
    prompts = [TOK.encode("Once upon a time"), TOK.encode("The cat"), TOK.encode("Hello")]

    def decode(bad: bool):
        rows = [DecodeRow(p, 10, temperature=0.7 if i == 1 and bad else 0.0, seed=0) for i, p in enumerate(prompts)]
        b = BatchDecoder(dec.model, len(rows))
        b.add(rows)
        while b.active:
            b.step()
        return rows

    alone = decode(bad=False)
    real = sampling._draw

    def failing(logits, temperature, *a):
        if temperature == 0.7:
            raise RuntimeError("invalid multinomial distribution")
        return real(logits, temperature, *a)

    monkeypatch.setattr(sampling, "_draw", failing)
    rows = decode(bad=True)
    assert rows[1].finish_reason == "error" and "multinomial" in rows[1].error
    for i in (0, 2):
        assert rows[i].tokens == alone[i].tokens and rows[i].finish_reason == alone[i].finish_reason


def test_a_failing_request_does_not_end_the_others_streams(srv, monkeypatch):
    """Four concurrent streams and one request whose draw fails in the same batch: the
    four finish with their whole text, the one gets a 500."""
    from llmscratch.decoding import sampling

    real = sampling._draw

    def failing(logits, temperature, *a):
        if temperature == 0.625:
            raise RuntimeError("invalid multinomial distribution")
        return real(logits, temperature, *a)

    monkeypatch.setattr(sampling, "_draw", failing)
    body = {"prompt": "Once upon", "max_tokens": 8, "temperature": 0}
    expected = post(srv, "/v1/completions", body).json()["choices"][0]["text"]

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            async def stream():
                text = ""
                async with c.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            ev = json.loads(line[6:])
                            assert "error" not in ev, ev
                            text += ev["choices"][0]["text"]
                return text

            bad = c.post("/v1/completions", json=dict(body, temperature=0.625))
            return await asyncio.gather(bad, *[stream() for _ in range(4)])

    bad, *texts = asyncio.run(main())
    assert_openai_error(bad, 500)
    assert texts == [expected] * 4


# ------------------------------------------------------------------ hostile bodies
@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,                     # RecursionError in json.loads
    b'{"prompt": "hi", "max_tokens": ' + b"7" * 5000 + b"}",  # int over Python's digit limit
    b'{"prompt": ' + b"[" * 900 + b"]" * 900 + b"}",     # deep, but parses: the schema refuses
])
def test_hostile_json_is_a_400(srv, body):
    assert_openai_error(post(srv, "/v1/completions", body), 400)
    assert post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_a_lone_surrogate_in_the_model_name_is_a_404_in_valid_json(srv):
    for path, body in (("/v1/completions", b'{"model": "\\ud800", "prompt": "hi"}'),
                       ("/v1/chat/completions", b'{"model": "x\\udfff", "messages": [{"role": "user", "content": "hi"}]}')):
        err = assert_openai_error(post(srv, path, body), 404)
        assert err["code"] == "model_not_found" and "\ud800" in err["message"] + "\ud800"
    r = httpx.get(srv.url + "/v1/models/%ED%A0%80", timeout=60)  # the UTF-8 bytes of a surrogate
    assert r.status_code == 404 and r.json()["error"]
    r = post(srv, "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800 hi"}], "max_tokens": 2}')
    assert r.status_code == 200, r.text


def test_a_405_names_the_allowed_methods(srv):
    r = httpx.get(srv.url + "/v1/completions", timeout=60)
    assert_openai_error(r, 405)
    assert r.headers["allow"] == "POST"
    r = httpx.delete(srv.url + "/v1/models", timeout=60)
    assert r.status_code == 405 and r.headers["allow"] == "GET"


def test_chat_on_an_encoder_server_is_a_400(tmp_path, docs_text):
    from llmscratch.models.bert import Bert, BertConfig
    from llmscratch.tokenizer import WordPieceTokenizer

    tok = WordPieceTokenizer.from_corpus([docs_text[:5000]], 200)
    save_model(Bert(BertConfig.from_name("bert-tiny", vocab_size=tok.vocab_size, context_length=32)), tmp_path, tok)
    with BackgroundServer(create_app(load_engine(str(tmp_path), model_name="enc"))) as s:
        for _ in range(2):
            err = assert_openai_error(post(s, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}), 400)
            assert err["code"] == "unsupported_model" and "encoder" in err["message"]


# ------------------------------------------------------------------ the queue and abandoned requests
class Gate:
    """Hold every decoding step until opened (`BatchDecoder.step` patched), or slow it."""

    def __init__(self, monkeypatch, delay: float = 0.0):
        self.open, self.delay = threading.Event(), delay
        real = BatchDecoder.step
        gate = self

        def step(dec):
            gate.open.wait(60)
            time.sleep(gate.delay)
            return real(dec)

        monkeypatch.setattr(BatchDecoder, "step", step)


def health(s) -> dict:
    return httpx.get(s.url + "/health", timeout=60).json()


def test_max_queue_holds_under_a_burst(run_dir, monkeypatch):
    """A burst of 24 requests (half streamed) at a server of 2 slots and a queue of 3: 5
    are taken, 19 answered 429 at once, and the 5 complete once decoding resumes."""
    gate = Gate(monkeypatch)
    engine = load_engine(str(run_dir), device="cpu", max_tokens_limit=8, max_batch_size=2, max_queue=3)
    body = {"prompt": "Once upon", "max_tokens": 4}

    async def one(c, i):
        if i % 2:
            async with c.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
                text = [ln async for ln in r.aiter_lines() if ln] if r.status_code == 200 else None
                return r.status_code, text
        r = await c.post("/v1/completions", json=body)
        return r.status_code, r.json()

    async def burst(s):
        async with httpx.AsyncClient(base_url=s.url, timeout=60,
                                     limits=httpx.Limits(max_connections=64)) as c:
            tasks = [asyncio.create_task(one(c, i)) for i in range(24)]
            deadline = time.monotonic() + 30
            while sum(t.done() for t in tasks) < 19 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            waiting = health(s)
            gate.open.set()
            return waiting, await asyncio.gather(*tasks)

    with BackgroundServer(create_app(engine)) as s:
        waiting, results = asyncio.run(burst(s))
        assert waiting["active"] == 2 and waiting["queued"] == 3
        codes = sorted(code for code, _ in results)
        assert codes.count(429) == 19 and codes.count(200) == 5, codes
        for code, out in results:
            if code == 200 and isinstance(out, list):
                assert out[-1] == "data: [DONE]"
        assert health(s)["active"] == 0 and engine.rows_in_use == 0


def test_an_abandoned_request_stops_decoding(run_dir, monkeypatch):
    """A non-streamed client that gives up after half a second: its generation (n=2 rows,
    20 s of decoding) stops within a few seconds and its slots are free."""
    gate = Gate(monkeypatch, delay=0.1)
    gate.open.set()
    engine = load_engine(str(run_dir), device="cpu", max_tokens_limit=200, max_batch_size=4)
    with BackgroundServer(create_app(engine)) as s:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 200, "n": 2}, timeout=0.5)
        assert engine.rows_in_use == 2  # still decoding right after the client left
        deadline = time.monotonic() + 5
        while (health(s)["active"] or engine.rows_in_use) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert health(s)["active"] == 0 and engine.rows_in_use == 0


# ------------------------------------------------------------------ the OpenAPI document and a fuzz
def test_openapi_document_describes_the_request_bodies(srv, run_dir):
    jsonschema = pytest.importorskip("jsonschema")
    doc = httpx.get(srv.url + "/openapi.json", timeout=60).json()
    assert doc["openapi"].startswith("3.")
    schemas = doc["components"]["schemas"]
    for path, name in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatRequest"),
                       ("/v1/embeddings", "EmbeddingRequest")):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{name}"}
    # each schema is valid JSON Schema, its references resolve within the document, and it
    # accepts a request the server accepts and refuses one it refuses
    for schema in schemas.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    registry_doc = {"components": {"schemas": schemas}}

    def validator(name):
        return jsonschema.Draft202012Validator(
            dict(schemas[name], components=registry_doc["components"]))

    assert validator("ChatRequest").is_valid({"messages": [{"role": "user", "content": "hi"}], "top_p": 0.5})
    assert not validator("ChatRequest").is_valid({"messages": [{"role": "robot", "content": "hi"}]})
    assert validator("CompletionRequest").is_valid({"prompt": [1, 2, 3]})
    assert not validator("CompletionRequest").is_valid({"prompt": "x", "n": 99})
    with BackgroundServer(create_app(load_engine(str(run_dir), device="cpu"), api_key="k")) as s:
        assert httpx.get(s.url + "/openapi.json", timeout=60).status_code == 401
        r = httpx.get(s.url + "/openapi.json", headers={"authorization": "Bearer k"}, timeout=60)
        assert r.status_code == 200 and "/v1/completions" in r.json()["paths"]


def hostile_json():
    """Any JSON value, leaning to the edges: huge and tiny numbers, NaN, lone surrogates,
    nesting."""
    scalars = st.one_of(
        st.none(), st.booleans(),
        st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([1e-50, 1e-300, 5e-324, 1e-38, 1e-46, 0.0, -0.0, 2.0, 2.0000001, 1.0, 1e308]),
        st.text(max_size=20), st.sampled_from(["\ud800", "a\udfffb", "<|endoftext|>", "", "user", "text"]),
    )
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=10)


def body_from_schema(schemas: dict, name: str):
    """A request body for the component `name`: each property absent, a value of its own
    kind (from the schema's enums and message shapes), or any hostile JSON value."""
    props = schemas[name]["properties"]
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]),
                                     "content": st.one_of(st.text(max_size=30), hostile_json())})
    plausible = {"messages": st.lists(message, min_size=0, max_size=3),
                 "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 60000), max_size=5)),
                 "input": st.one_of(st.text(max_size=30), st.lists(st.text(max_size=10), max_size=3)),
                 "max_tokens": st.integers(-2, 12), "n": st.integers(-1, 20),
                 "temperature": st.floats(-1, 3), "top_p": st.floats(-1, 2), "top_k": st.integers(-2, 99)}
    fields = {k: st.one_of(st.just(None), plausible.get(k, hostile_json()), hostile_json()) for k in props}
    return st.fixed_dictionaries({}, optional=fields).map(lambda d: {k: v for k, v in d.items() if v is not None})


def test_fuzzed_requests_get_no_5xx_and_well_formed_errors(srv):
    """Bodies built from the served OpenAPI document's request schemas, sent over one
    keep-alive connection: never a 5xx, every error in OpenAI's shape, the connection kept."""
    schemas = httpx.get(srv.url + "/openapi.json", timeout=60).json()["components"]["schemas"]
    routes = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatRequest",
              "/v1/embeddings": "EmbeddingRequest"}
    client = httpx.Client(base_url=srv.url, timeout=60)
    seen: set[int] = set()

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.sampled_from(sorted(routes)).flatmap(
        lambda path: st.tuples(st.just(path), body_from_schema(schemas, routes[path]))), st.booleans())
    def check(route_body, stream):
        path, body = route_body
        if stream:
            body["stream"] = True
        content = json.dumps(body).encode()  # ASCII escapes: lone surrogates, NaN as JSON allows
        r = client.post(path, content=content, headers={"content-type": "application/json"})
        seen.add(r.status_code)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert_openai_error(r, r.status_code)
        elif not stream or "text/event-stream" not in r.headers.get("content-type", ""):
            assert "choices" in r.json() or "data" in r.json()
        else:
            assert '"server_error"' not in r.text and r.text.rstrip().endswith("data: [DONE]")

    try:
        check()
    finally:
        client.close()
    assert 200 in seen and 400 in seen  # the fuzz reached the decoder, not only the checks
    assert health(srv)["active"] == 0
