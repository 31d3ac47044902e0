"""The decoding engine (`llmscratch.decoding.engine`): its three ways of decoding give a row
the same tokens, and every row ends with one `finish_reason`."""

from __future__ import annotations

import pytest
import torch

from llmscratch import Engine, Sampling, generate, get_tokenizer
from llmscratch.decoding.sampling import SamplingError
from llmscratch.models.gpt import GPT, GPTConfig

TOK = get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name("tiny", context_length=32, tie_weights=False)).eval()


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.0, top_k=40, seed=3)])
def test_stream_and_ragged_rows_give_generates_tokens(model, sampling):
    engine = Engine(model, TOK)
    prompts = [TOK.encode("The sea is"), TOK.encode("Once"), TOK.encode("A long prompt about many things")]
    want = [generate(model, torch.tensor([p]), 12, sampling.temperature, sampling.top_k, seed=sampling.seed)
            [0, len(p):].tolist() for p in prompts]
    alone = [engine.row(p, 12, sampling) for p in prompts]
    texts = ["".join(engine.stream(r)) for r in alone]
    batch = engine.run([engine.row(p, 12, sampling) for p in prompts], batch_size=2)
    assert [r.tokens for r in alone] == [r.tokens for r in batch] == want
    assert texts == [r.text for r in batch] == [TOK.decode(w) for w in want]
    assert {r.finish_reason for r in alone + batch} == {"length"}


def test_eos_ends_a_row_without_text_and_is_not_counted(model):
    engine = Engine(model, TOK)
    prompt = TOK.encode("Hello")
    free = engine.run([engine.row(prompt, 10)])[0]
    i = next(i for i, t in enumerate(free.tokens) if t not in free.tokens[:i] and i >= 1)
    eos = free.tokens[i]  # pretend this token is the end of text
    (row,) = engine.run([engine.row(prompt, 10, eos_id=eos)])
    assert row.finish_reason == "stop" and row.tokens == free.tokens[:i + 1] and row.n_tokens == i
    assert row.text == TOK.decode(free.tokens[:i])
    streamed = engine.row(prompt, 10, eos_id=eos)
    assert "".join(engine.stream(streamed)) == row.text and streamed.finish_reason == "stop"
    (none,) = engine.run([engine.row(prompt, 0)])
    assert none.tokens == [] and none.finish_reason == "length"


def test_sampling_is_checked_once_when_made():
    with pytest.raises(SamplingError, match="top_k"):
        Sampling(temperature=1.0, top_k=-1)
    assert Sampling(temperature=0.5).generator("cpu") is None
    a, b = Sampling(seed=7).generator("cpu"), Sampling(seed=7).generator("cpu")
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
