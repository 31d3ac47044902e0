"""Context shift (`context_shift=True`, opt-in): past the context window a sequence drops the
oldest half of its window once and decodes cached, instead of re-encoding the whole window
every token. The tokens past the window change, but identically on every path: cached and
uncached `generate`, `stream`, and ragged batches (rows filling the context at different
steps, the cache growing and shifting)."""

import pytest
import torch

from llmscratch.decoding import batching
from llmscratch.decoding.batching import shifted_window
from llmscratch.decoding.engine import Engine
from llmscratch.decoding.generate import generate, generate_batch
from llmscratch.models.gpt import GPT, GPTConfig

V, CTX = 89, 16


@pytest.fixture(scope="module", params=["tiny", "llama-tiny"])
def model(request):
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name(request.param, vocab_size=V, context_length=CTX, tie_weights=False)).eval()


def prompts_of(*lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


def alone(model, p, n, **kw):
    return generate(model, torch.tensor([p]), n, context_shift=True, **kw)[0, len(p):].tolist()


def test_shifted_window():
    assert [shifted_window(c) for c in (1, 2, 7, 16, 1024)] == [1, 1, 4, 8, 512]


def test_cached_equals_uncached_past_the_window(model):
    """40 new tokens after a 10-token prompt in a 16-token context: several shifts."""
    idx = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(0))
    a = generate(model, idx, 40, context_shift=True)
    b = generate(model, idx, 40, context_shift=True, use_cache=False)
    assert torch.equal(a, b)
    # and it is a different rule from sliding the window (the default)
    assert not torch.equal(a, generate(model, idx, 40))
    # within the window nothing changes
    assert torch.equal(generate(model, idx, 6, context_shift=True), generate(model, idx, 6))


def test_uncached_shift_is_what_it_says(model):
    """The uncached loop with context shift sees exactly: the newest 8 tokens after each
    overflow, then one more per step until 16 (checked by re-deriving every token)."""
    p = prompts_of(14, seed=7)[0]
    out = generate(model, torch.tensor([p]), 12, context_shift=True, use_cache=False)[0].tolist()
    seq = list(p)
    for t in out[len(p):]:
        logits = model(torch.tensor([seq]))[0, -1]
        assert int(logits.argmax()) == t
        seq.append(t)
        if len(seq) > CTX:
            seq = seq[-shifted_window(CTX):]


@pytest.mark.parametrize("columns", [128, 4])
def test_batched_rows_equal_each_row_alone(model, columns, monkeypatch):
    monkeypatch.setattr(batching, "INITIAL_COLUMNS", columns)
    prompts = prompts_of(16, 12, 3, 9, seed=3)
    rows = generate_batch(model, prompts, 30, context_shift=True)
    for p, r in zip(prompts, rows):
        assert r.tokens == alone(model, p, 30)
    sampled = generate_batch(model, prompts, 25, temperature=1.0, top_p=0.9, seed=[1, 2, 3, 4],
                             context_shift=True, batch_size=2)
    for i, (p, r) in enumerate(zip(prompts, sampled)):
        assert r.tokens == alone(model, p, 25, temperature=1.0, top_p=0.9, seed=i + 1)


def test_stream_and_cancel_with_context_shift(model):
    eng = Engine(model)
    p = prompts_of(15, seed=9)[0]
    row = eng.row(p, 20)
    with eng.evaluating():
        list(eng.stream(row, context_shift=True))
    assert row.tokens == alone(model, p, 20)
    dec = eng.batch(2, context_shift=True)
    r = eng.row(p, 30)
    with torch.inference_mode():
        dec.add([r])
        for _ in range(5):
            dec.step()
        assert r in dec.windowed and r in dec.own
        dec.cancel(r)
    assert not dec.own and dec.free == 2


def test_past_the_window_costs_half_a_window_per_half_window(model, monkeypatch):
    """Tokens the model encodes for 25 passes past a full window (one after each new token):
    with context shift 3 shifts of 8 plus one token per other pass; sliding, a whole window
    (16) per pass."""
    counted = {"tokens": 0}
    real = model.hidden_states

    def counting(idx, *a, **kw):
        counted["tokens"] += idx.shape[1]
        return real(idx, *a, **kw)

    monkeypatch.setattr(model, "hidden_states", counting)
    idx = torch.tensor([prompts_of(16, seed=2)[0]])
    generate(model, idx, 25)
    sliding, counted["tokens"] = counted["tokens"], 0
    generate(model, idx, 25, context_shift=True)
    shifted = counted["tokens"]
    assert sliding == 16 + 25 * 16
    assert shifted == 16 + 3 * 8 + 22
