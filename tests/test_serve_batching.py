"""Continuous batching in `serve`: requests join and leave one running batch at token
boundaries, and each still gets exactly the tokens it would get alone.

The engine is driven directly (asyncio, no HTTP) where timing must be controlled, and
through a background server for the wire format (n > 1, 429 on a full queue,
disconnects). Every test ends by checking that no slot leaked.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

httpx = pytest.importorskip("httpx")

from conftest import generate_alone  # noqa: E402
from llmscratch import get_tokenizer  # noqa: E402
from llmscratch.serve import BackgroundServer, SamplingParams, create_app, load_engine  # noqa: E402

TOK = get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def run_dir(untied_tiny_run):
    return untied_tiny_run


def alone(engine, ids, n, **kw):
    """What the library generates for this prompt by itself: (text, completion tokens)."""
    out = generate_alone(engine.model, ids, n, TOK.eot_id, **kw)
    return TOK.decode(out), len(out)


async def never() -> bool:
    return False


async def collect(engine, ids, p, started: asyncio.Event | None = None, after: int = 0):
    """Run one request through the engine; set `started` once `after` pieces arrived."""
    texts = [[] for _ in range(p.n)]
    finish, tokens = [None] * p.n, [0] * p.n
    async for ev in engine.run(ids, p, never):
        assert ev.kind != "error", ev.text
        if ev.kind == "text":
            texts[ev.index].append(ev.text)
            if started is not None and sum(map(len, texts)) >= after:
                started.set()
        else:
            finish[ev.index], tokens[ev.index] = ev.finish_reason, ev.completion_tokens
    return ["".join(t) for t in texts], finish, tokens


def watch_batch(engine) -> list[int]:
    """Record the number of rows at every decoding step of the engine's scheduler."""
    sizes: list[int] = []
    dec = engine.scheduler.decoder
    real_step = dec.step

    def step():
        sizes.append(dec.active)
        return real_step()

    dec.step = step
    return sizes


def test_requests_joining_and_leaving_mid_batch_get_their_own_tokens(run_dir):
    """A long request runs; others join while it decodes (a shorter and a longer prompt,
    a seeded sampled one, one whose prompt fills the whole context), finish at different
    times and leave; each one's text equals generating it alone."""
    engine = load_engine(str(run_dir), device="cpu", max_batch_size=4)
    ctx = engine.context_length
    prompts = [TOK.encode("The history of the sea"), TOK.encode("Hi"),
               TOK.encode("A much longer prompt about ships, storms, harbours and the people who"),
               TOK.encode("Once"), (TOK.encode(" tide") * ctx)[:ctx]]
    params = [SamplingParams(60, temperature=0.0), SamplingParams(5, temperature=0.0),
              SamplingParams(25, temperature=0.0), SamplingParams(30, temperature=1.0, top_k=40, seed=7),
              SamplingParams(6, temperature=0.0)]

    async def main():
        engine.startup()
        sizes = watch_batch(engine)
        try:
            first_going = asyncio.Event()
            tasks = [asyncio.create_task(collect(engine, prompts[0], params[0], first_going, after=5))]
            await first_going.wait()  # the first request is mid-way: the others join it
            for ids, p in zip(prompts[1:], params[1:]):
                tasks.append(asyncio.create_task(collect(engine, ids, p)))
                await asyncio.sleep(0.01)
            results = await asyncio.gather(*tasks)
        finally:
            engine.shutdown()
        return results, sizes

    results, sizes = asyncio.run(main())
    for ids, p, (texts, finish, tokens) in zip(prompts, params, results):
        kw = {"temperature": p.temperature, "top_k": p.top_k, "seed": p.seed}
        text, n = alone(engine, ids, p.max_tokens, **kw)
        assert texts[0] == text and tokens[0] == n
        assert finish[0] == ("length" if n == p.max_tokens else "stop")
    assert sizes[0] == 1 and max(sizes) >= 3  # it started alone and others joined it
    assert engine.rows_in_use == 0 and engine.limiter.active == 0 and engine.limiter.queued == 0


def test_a_failing_request_fails_alone(run_dir):
    """A request whose settings slipped past the checks fails with an error event when it
    would join the batch; the request already decoding is untouched."""
    engine = load_engine(str(run_dir), device="cpu", max_batch_size=4)
    ids = TOK.encode("The sea")

    async def main():
        engine.startup()
        try:
            going = asyncio.Event()
            good = asyncio.create_task(collect(engine, ids, SamplingParams(20, temperature=0.0), going, after=3))
            await going.wait()
            bad = [ev async for ev in engine.run(ids, SamplingParams(5, temperature=-1.0), never)]
            return await good, bad
        finally:
            engine.shutdown()

    (texts, finish, _), bad = asyncio.run(main())
    assert [ev.kind for ev in bad] == ["error"] and "temperature" in bad[0].text
    assert texts[0] == alone(engine, ids, 20)[0]
    assert engine.rows_in_use == 0 and engine.limiter.active == 0


def test_n_choices_are_rows_of_one_batch(run_dir):
    engine = load_engine(str(run_dir), device="cpu", max_batch_size=4, max_tokens_limit=64)
    ids = TOK.encode("Fact number 3: the sea")
    with BackgroundServer(create_app(engine)) as s:
        body = {"prompt": "Fact number 3: the sea", "max_tokens": 12, "temperature": 1.0, "seed": 10}
        three = httpx.post(s.url + "/v1/completions", json=dict(body, n=3), timeout=60).json()
        assert [c["index"] for c in three["choices"]] == [0, 1, 2]
        for i, c in enumerate(three["choices"]):  # choice i samples with seed + i
            assert c["text"] == alone(engine, ids, 12, temperature=1.0, seed=10 + i)[0]
        one = httpx.post(s.url + "/v1/completions", json=body, timeout=60).json()
        assert one["choices"][0]["text"] == three["choices"][0]["text"]
        assert three["usage"]["completion_tokens"] == sum(
            alone(engine, ids, 12, temperature=1.0, seed=10 + i)[1] for i in range(3))

        chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "n": 2, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=chat, timeout=60) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: {")]
        text = {0: "", 1: ""}
        for e in events:
            for c in e["choices"]:
                text[c["index"]] += c["delta"].get("content") or ""
        assert text[0] == text[1]  # greedy: the same reply twice
        assert [e for e in events if e.get("usage")] == events[-1:]  # usage once, after both ended
        too_many = httpx.post(s.url + "/v1/completions", json=dict(body, n=5), timeout=60)
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
    assert engine.rows_in_use == 0


def test_a_disconnect_mid_stream_frees_its_row_and_the_others_are_unaffected(run_dir):
    engine = load_engine(str(run_dir), device="cpu", max_batch_size=4, max_tokens_limit=100_000)
    with BackgroundServer(create_app(engine)) as s:
        sizes = watch_batch(engine)
        endless = {"prompt": "Tell me everything", "max_tokens": 100_000, "temperature": 1.0, "stream": True}
        other = {"prompt": "The sea", "max_tokens": 40, "temperature": 0}
        with httpx.Client(timeout=60) as h:
            with h.stream("POST", s.url + "/v1/completions", json=endless) as r:
                lines = r.iter_lines()
                got = [next(lines) for _ in range(4)]  # it is decoding
                done = h.post(s.url + "/v1/completions", json=other).json()  # runs beside it
            # the stream is closed here: the client hung up mid-way
        assert any(g.startswith("data: {") for g in got)
        assert done["choices"][0]["text"] == alone(engine, TOK.encode("The sea"), 40)[0]
        assert max(sizes) == 2  # they really shared the batch
        deadline = time.monotonic() + 10
        while (engine.rows_in_use or engine.limiter.active) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.rows_in_use == 0 and engine.limiter.active == 0
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200


def test_a_burst_against_the_queue_limit_gets_429_with_retry_after(run_dir):
    """200 requests at once against 2 rows and a queue of 3: the rest are turned away at
    once with 429 and Retry-After (not left hanging), the admitted ones complete, and
    afterwards every slot is free."""
    engine = load_engine(str(run_dir), device="cpu", max_batch_size=2, max_queue=3)

    async def burst(url):
        async with httpx.AsyncClient(base_url=url, timeout=120,
                                     limits=httpx.Limits(max_connections=200)) as h:
            async def one(i):
                body = {"prompt": f"Request {i}", "max_tokens": 8, "temperature": 0}
                if i % 2:
                    body["stream"] = True
                return await h.post("/v1/completions", json=body)

            return await asyncio.gather(*(one(i) for i in range(200)))

    with BackgroundServer(create_app(engine)) as s:
        t0 = time.monotonic()
        replies = asyncio.run(burst(s.url))
        assert time.monotonic() - t0 < 100
        codes = [r.status_code for r in replies]
        assert set(codes) == {200, 429} and codes.count(200) >= 5
        for r in replies:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
            elif "text/event-stream" in r.headers["content-type"]:
                assert r.text.rstrip().endswith("data: [DONE]")
        assert engine.rows_in_use == 0 and engine.limiter.active == 0 and engine.limiter.queued == 0
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_max_batch_size_1_is_the_unbatched_engine(run_dir):
    engine = load_engine(str(run_dir), device="cpu", max_batch_size=1, max_concurrency=2)
    with BackgroundServer(create_app(engine)) as s:
        assert engine.scheduler is None and engine.slots == 2
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "The sea", "max_tokens": 10, "temperature": 0})
        assert r.json()["choices"][0]["text"] == alone(engine, TOK.encode("The sea"), 10)[0]
        for stream in (False, True):
            r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "n": 2, "stream": stream})
            assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"
    assert engine.rows_in_use == 0


def test_cli_serve_batching_flags_are_checked(capsys):
    from llmscratch.cli import main

    assert main(["serve", "--model", "tiny", "--max-batch-size", "0"]) == 2
    assert "--max-batch-size" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny", "--max-queue", "-1"]) == 2
    assert "--max-queue" in capsys.readouterr().err
