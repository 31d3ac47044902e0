"""Ragged batches (`llmscratch.decoding.batching`): every row decodes as it would alone.

The reference is always `generate` (or `stream_text`) on one prompt by itself: greedy rows
give the same tokens, seeded sampled rows the same tokens as that seed alone, whatever the
other rows are doing — finishing earlier, joining mid-way, overflowing the context.
"""

import pytest
import torch

from llmscratch import get_tokenizer
from llmscratch.decoding import batching
from llmscratch.decoding.batching import BatchDecoder, DecodeRow, kv_bytes_per_row
from llmscratch.decoding.generate import generate, generate_batch, stream_text
from llmscratch.decoding.sampling import SamplingError
from llmscratch.models.gpt import GPT, GPTConfig

V = 101


@pytest.fixture(scope="module", params=["tiny", "llama-tiny"])
def model(request):
    """GPT-2's block (learned positions) and the modern one (rotary positions, GQA)."""
    torch.manual_seed(0)
    # untied head: a tiny tied model's greedy output just repeats its last token
    return GPT(GPTConfig.from_name(request.param, vocab_size=V, context_length=24, tie_weights=False)).eval()


def prompts_of(*lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


def alone(model, prompt, n, **kw):
    """New tokens of `generate` on this prompt by itself."""
    return generate(model, torch.tensor([prompt]), n, **kw)[0, len(prompt):].tolist()


def test_greedy_ragged_rows_equal_each_row_alone(model):
    prompts = prompts_of(7, 3, 12, 1, 5)
    rows = generate_batch(model, prompts, 10)
    for p, r in zip(prompts, rows):
        assert r.tokens == alone(model, p, 10)
        assert r.finish_reason == "length"


def test_rows_finishing_at_different_times(model):
    """Per-row max_new_tokens and an eos that only some rows produce, early or late: the
    rows still running after others left keep their own tokens."""
    prompts = prompts_of(4, 9, 2, 6, seed=2)
    free = [alone(model, p, 12) for p in prompts]
    eos = free[1][3]  # row 1 produces it at its 4th token; others maybe later or never
    rows = generate_batch(model, prompts, [12, 12, 3, 12], eos_id=eos)
    for p, r, m in zip(prompts, rows, [12, 12, 3, 12]):
        expect = alone(model, p, m, eos_id=eos)
        if eos in expect:
            expect = expect[: expect.index(eos) + 1]  # generate pads a finished row with eos
        assert r.tokens == expect
    assert rows[1].tokens[-1] == eos and rows[1].finish_reason == "stop" and len(rows[1].tokens) <= 4
    assert rows[2].finish_reason == "length" and len(rows[2].tokens) == 3
    assert len({len(r.tokens) for r in rows}) > 1  # they really did finish at different times


@pytest.fixture(params=[128, 4], ids=["full-cache", "growing-cache"])
def columns(request, monkeypatch):
    """The cache allocated at once (128 >= the 24-token context), or starting at 4 columns
    and growing (4, 8, 16, 24) and shifting as rows need more."""
    monkeypatch.setattr(batching, "INITIAL_COLUMNS", request.param)
    return request.param


def test_context_overflow_slides_the_window_per_row(model, columns):
    """Prompts near or at the 24-token context and 16 new tokens: rows hit the end of the
    cache at different steps, the cache shifts, full rows slide their window — and each
    row still equals `generate` alone (which slides its window the same way)."""
    prompts = prompts_of(24, 20, 3, 11, seed=3)
    rows = generate_batch(model, prompts, 16)
    for p, r in zip(prompts, rows):
        assert r.tokens == alone(model, p, 16)


def test_continuous_batching_rows_join_as_others_leave(model, columns):
    """More prompts than slots: a finished row's slot goes to the next prompt mid-way."""
    prompts = prompts_of(5, 2, 8, 3, 6, 1, 4, seed=4)
    lengths = [3, 9, 5, 12, 2, 7, 6]
    rows = generate_batch(model, prompts, lengths, batch_size=3)
    for p, r, m in zip(prompts, rows, lengths):
        assert r.tokens == alone(model, p, m)


def test_seeded_sampling_per_row_equals_the_seed_alone(model):
    prompts = prompts_of(3, 8, 5, seed=5)
    settings = dict(temperature=[1.0, 0.7, 1.3], top_k=[None, 20, 5], top_p=[0.9, None, None], seed=[11, 12, 13])
    rows = generate_batch(model, prompts, 15, **settings)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        kw = {k: v[i] for k, v in settings.items()}
        assert r.tokens == alone(model, p, 15, **kw)
    again = generate_batch(model, prompts, 15, **settings)
    assert [r.tokens for r in again] == [r.tokens for r in rows]
    # a greedy row beside sampled ones stays greedy
    mixed = generate_batch(model, prompts, 15, temperature=[0.0, 1.0, 0.0], seed=[None, 3, None])
    assert mixed[0].tokens == alone(model, prompts[0], 15)
    assert mixed[1].tokens == alone(model, prompts[1], 15, temperature=1.0, seed=3)


def test_stop_strings_end_each_row_as_alone():
    tok = get_tokenizer("gpt2")
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_name("tiny", tie_weights=False)).eval()
    texts = ["The sea is", "Once upon a time there was a", "1, 2, 3,"]
    prompts = [tok.encode(t) for t in texts]
    free = [tok.decode(alone(m, p, 12)) for p in prompts]
    stop = free[0][len(free[0]) // 2: len(free[0]) // 2 + 3]  # text row 0 writes mid-way
    assert stop
    rows = generate_batch(m, prompts, 12, stop=[stop], tokenizer=tok)
    for t, r in zip(texts, rows):
        expect = "".join(stream_text(m, tok, t, 12, stop=[stop], stop_at_eos=False))
        assert r.text == expect
    assert rows[0].finish_reason == "stop" and stop not in rows[0].text
    assert len(rows[0].tokens) < 12


def test_decoder_join_leave_and_cancel_mid_batch(model, columns):
    """Drive the decoder by hand: a row decodes alone, a longer one joins mid-way (the
    cache shifts right), a short one joins, one is cancelled; all free their slots."""
    a, b, c = prompts_of(2, 10, 4, seed=6)
    dec = BatchDecoder(model, max_rows=3)
    ra = DecodeRow(a, 8)
    dec.add([ra])
    for _ in range(3):
        dec.step()
    rb, rc = DecodeRow(b, 6), DecodeRow(c, 50)
    dec.add([rb])  # prompt longer than the cursor: everything shifts right
    dec.add([rc])  # shorter: it starts after stale columns, masked off
    assert dec.active == 3 and dec.free == 0
    for _ in range(4):
        dec.step()
    dec.cancel(rc)
    assert rc.finish_reason == "cancelled" and dec.active == 2
    while dec.active:
        dec.step()
    assert ra.tokens == alone(model, a, 8)
    assert rb.tokens == alone(model, b, 6)
    assert rc.tokens == alone(model, c, 4)  # four steps before it was cancelled
    assert dec.active == 0 and dec.pos == 0
    with pytest.raises(ValueError, match="free slots"):
        dec.add([DecodeRow(a, 1)] * 4)


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate_batch(model, [[1], []], 3)
    with pytest.raises(ValueError, match="3 prompts"):
        generate_batch(model, [[1], [2], [3]], 3, seed=[1, 2])
    with pytest.raises(ValueError, match="tokenizer"):
        generate_batch(model, [[1]], 3, stop=["x"])
    with pytest.raises(SamplingError, match="top_p"):  # when the row is made, before any batch
        DecodeRow([1], 3, temperature=1.0, top_p=1.5)
    with pytest.warns(UserWarning, match="longer than the context"):
        long = prompts_of(30)[0]
        (row,) = generate_batch(model, [long], 4)
    assert row.tokens == alone(model, long[-24:], 4)
    assert generate_batch(model, [[1, 2]], 0)[0].tokens == []


def test_kv_bytes_per_row_from_the_shape():
    with torch.device("meta"):
        m = GPT(GPTConfig.from_name("gpt2-124m"))
    # 12 layers x (keys + values) x 1024 positions x 768 x 4 bytes
    assert kv_bytes_per_row(m) == 12 * 2 * 1024 * 768 * 4  # a meta model: nothing allocated
    assert kv_bytes_per_row(m, torch.bfloat16) == 12 * 2 * 1024 * 768 * 2


def test_instruct_test_responses_in_a_batch_equal_one_at_a_time():
    """`finetune instruct` writes its test responses with `respond_batch`: the same replies
    as `respond` gives one conversation at a time."""
    from llmscratch.finetune.instruct import TEMPLATES, respond, respond_batch

    tok = get_tokenizer("gpt2")
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_name("tiny", tie_weights=False)).eval()
    convs = [[{"role": "user", "content": c}] for c in
             ("Name a fruit.", "Write a very long poem about the sea and its many moods, please.", "Hi")]
    replies = respond_batch(m, tok, TEMPLATES["alpaca"], convs, 10, batch_size=2)
    assert replies == [respond(m, tok, TEMPLATES["alpaca"], c, 10) for c in convs]
    assert any(replies)


def test_eval_instruct_generate_answers_in_batches(tmp_path, capsys):
    """`eval instruct --generate` answers a responses file's prompts anew with --model, in
    batches of --batch-size: the replies `respond` gives one at a time."""
    import json

    from llmscratch.checkpoints.run import save_model
    from llmscratch.cli import main
    from llmscratch.evaluation.lm import generate_responses
    from llmscratch.finetune.instruct import TEMPLATES, respond

    tok = get_tokenizer("gpt2")
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_name("tiny", tie_weights=False)).eval()
    save_model(m, tmp_path / "run", tok)
    records = [{"instruction": f"Say {w}.", "input": "", "output": w, "response": "old"}
               for w in ("fig", "a long word like extraordinary", "yes")]
    got = generate_responses(m, tok, TEMPLATES["plain"], records, 6, batch_size=2)
    for rec, new in zip(records, got):
        assert new["response"] == respond(m, tok, TEMPLATES["plain"], [{"role": "user", "content": rec["instruction"],
                                                                      "input": ""}], 6)
    (tmp_path / "responses.json").write_text(json.dumps(records))
    assert main(["eval", "instruct", "--responses", str(tmp_path / "responses.json"), "--model",
                 str(tmp_path / "run"), "--generate", "--max-new-tokens", "6", "--batch-size", "2"]) == 0
    assert "answered anew" in capsys.readouterr().out
    assert main(["eval", "instruct", "--responses", str(tmp_path / "responses.json"), "--generate"]) == 2
    assert "--generate needs --model" in capsys.readouterr().err
