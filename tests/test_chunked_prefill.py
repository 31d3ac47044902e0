"""Chunked prefill (`BatchDecoder(prefill_chunk=...)`): a long prompt joining a running batch
is encoded a chunk per step between the running rows' decode passes, and every row's tokens
stay those of the unchunked prefill (and of the row decoded alone)."""

import pytest
import torch

from llmscratch.decoding.batching import BatchDecoder, DecodeRow
from llmscratch.decoding.engine import Engine
from llmscratch.decoding.generate import generate
from llmscratch.models.gpt import GPT, GPTConfig

V, CTX = 97, 64


@pytest.fixture(scope="module", params=["tiny", "llama-tiny"])
def model(request):
    """Learned positions (GPT-2) and rotary ones with GQA (Llama)."""
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name(request.param, vocab_size=V, context_length=CTX, tie_weights=False)).eval()


def prompt(n, seed):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model, p, n, **kw):
    return generate(model, torch.tensor([p]), n, **kw)[0, len(p):].tolist()


@pytest.mark.parametrize("chunk", [None, 7, 16])
def test_chunked_equals_unchunked_and_alone(model, chunk):
    """Prompts shorter than, equal to and longer than the chunk, one filling the context
    (it then slides its window): greedy and seeded-sampled tokens as decoded alone."""
    prompts = [prompt(n, s) for n, s in ((3, 1), (40, 2), (64, 3), (16, 4), (23, 5))]
    settings = [dict(), dict(), dict(), dict(temperature=0.9, top_p=0.9, seed=5), dict(temperature=1.0, seed=6)]
    rows = [DecodeRow(p, 10, **kw) for p, kw in zip(prompts, settings)]
    Engine(model).run(rows, batch_size=3, prefill_chunk=chunk)
    for p, r, kw in zip(prompts, rows, settings):
        assert r.tokens == alone(model, p, 10, **kw)


def test_a_long_prompt_does_not_stall_the_running_rows(model):
    """Three short rows decoding; a 60-token prompt joins with chunks of 16: every step
    still gives each short row its next token (the prompt takes 4 steps to encode), the
    short rows' tokens are unchanged, and the long row equals itself alone."""
    dec = BatchDecoder(model, 4, prefill_chunk=16)
    short = [DecodeRow(prompt(n, 10 + n), 20) for n in (4, 7, 2)]
    with torch.inference_mode():
        dec.add(short)
        for _ in range(3):
            dec.step()
        long = DecodeRow(prompt(60, 99), 8)
        dec.add([long])
        assert dec.active == 4 and dec.free == 0 and not long.tokens
        for i in range(4):  # 60 tokens = chunks of 16, 16, 16, 12
            events = dec.step()
            assert sorted(id(r) for r, _, _ in events) == sorted(id(r) for r in short)
            assert not long.tokens
        events = dec.step()  # encoded: its first token comes with the short rows' next ones
        assert long in [r for r, _, _ in events] and len(long.tokens) == 1
        while dec.active:
            dec.step()
    for r in short:
        assert r.tokens == alone(model, r.prompt, 20)
    assert long.tokens == alone(model, long.prompt, 8)


def test_unchunked_prefill_stalls_nothing_but_takes_one_pass(model):
    """prefill_chunk=None: the long prompt is encoded in `add` itself (the old behaviour),
    so the very next step samples its first token."""
    dec = BatchDecoder(model, 2, prefill_chunk=None)
    long = DecodeRow(prompt(60, 99), 3)
    with torch.inference_mode():
        dec.add([long])
        dec.step()
    assert len(long.tokens) == 1


def test_cancel_while_prefilling_frees_the_slot(model):
    dec = BatchDecoder(model, 1, prefill_chunk=8)
    long = DecodeRow(prompt(30, 1), 5)
    with torch.inference_mode():
        dec.add([long])
        dec.step()
        assert dec.free == 0
        dec.cancel(long)
        assert dec.free == 1 and long.finish_reason == "cancelled"
        short = DecodeRow(prompt(3, 2), 4)
        dec.add([short])
        while dec.active:
            dec.step()
    assert short.tokens == alone(model, short.prompt, 4)


def test_bad_chunk_setting(model):
    with pytest.raises(ValueError, match="prefill_chunk"):
        BatchDecoder(model, 2, prefill_chunk=-1)
