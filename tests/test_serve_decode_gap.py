"""The server's side of chunked prefill and context shift (`serve --prefill-chunk`,
`--context-shift`): settings reach the batching scheduler, a long prompt joining running
requests is prefilled in chunks while they keep streaming, and every request still gets the
tokens it gets alone."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("httpx")

from conftest import generate_alone  # noqa: E402
from llmscratch import get_tokenizer  # noqa: E402
from llmscratch.errors import UserError  # noqa: E402
from llmscratch.serve import SamplingParams, load_engine  # noqa: E402

TOK = get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def run_dir(untied_tiny_run):
    return untied_tiny_run


def alone(engine, ids, n, **kw):
    return TOK.decode(generate_alone(engine.model, ids, n, TOK.eot_id, **kw))


async def never() -> bool:
    return False


async def collect(engine, ids, p, log=None, name=""):
    text = []
    async for ev in engine.run(ids, p, never):
        assert ev.kind != "error", ev.text
        if ev.kind == "text":
            text.append(ev.text)
            if log is not None:
                log.append(name)
    return "".join(text)


def test_a_long_prompt_is_prefilled_in_chunks_while_others_stream(run_dir):
    engine = load_engine(str(run_dir), device="cpu", max_batch_size=3, prefill_chunk=16)
    dec = engine.decoding
    short = TOK.encode("The history of the sea")
    long = (TOK.encode(" storms and harbours") * 40)[:100]  # 7 chunks of 16
    chunks = []

    async def main():
        engine.startup()
        sched = engine.scheduler.decoder
        assert sched.prefill_chunk == 16
        real = sched.step

        def step():  # record how many prompts were waiting for their chunks at each step
            chunks.append(len(sched.prefilling))
            return real()

        sched.step = step
        try:
            log: list[str] = []
            first = asyncio.create_task(collect(engine, short, SamplingParams(40, temperature=0.0), log, "short"))
            while not log:
                await asyncio.sleep(0.01)
            second = asyncio.create_task(collect(engine, long, SamplingParams(5, temperature=0.0), log, "long"))
            return await first, await second, log
        finally:
            engine.shutdown()

    a, b, log = asyncio.run(main())
    assert a == alone(engine, short, 40) and b == alone(engine, long, 5)
    assert sum(1 for c in chunks if c) >= 6  # the long prompt was read over several steps
    assert dec is engine.decoding and engine.rows_in_use == 0


def test_context_shift_reaches_the_scheduler(run_dir):
    engine = load_engine(str(run_dir), device="cpu", max_batch_size=2, context_shift=True)
    ctx = engine.context_length
    ids = (TOK.encode(" tide and wind") * ctx)[: ctx - 2]

    async def main():
        engine.startup()
        try:
            assert engine.scheduler.decoder.context_shift
            return await collect(engine, ids, SamplingParams(12, temperature=0.0))
        finally:
            engine.shutdown()

    text = asyncio.run(main())
    assert text == alone(engine, ids, 12, context_shift=True)
    assert engine.rows_in_use == 0


def test_bad_prefill_chunk(capsys):
    from llmscratch.cli import main

    assert main(["serve", "--model", "tiny", "--prefill-chunk", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--prefill-chunk" in err and "Traceback" not in err
    with pytest.raises(UserError, match="prefill chunk"):
        load_engine("tiny", device="cpu", prefill_chunk=-5)
