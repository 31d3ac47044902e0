"""Top-p sampling looks for the nucleus among the top-k candidates first
(`sampling.NUCLEUS_CANDIDATES`) instead of sorting the whole vocabulary; the tokens drawn
must be exactly those of the plain full-vocabulary draw (`reference` below, the code as it
was before), seed for seed, and batched decoding must still equal single decoding."""

import math

import pytest
import torch

from llmscratch.decoding import sampling
from llmscratch.decoding.generate import generate, generate_batch
from llmscratch.decoding.sampling import sample
from llmscratch.models.gpt import GPT, GPTConfig


def reference(logits, temperature, top_k, top_p, generator):
    """The full-vocabulary draw: sort every row, cut at top_p, multinomial over the vocabulary."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    if temperature < sampling.TINY_TEMPERATURE:
        logits = logits.float()
        logits = ((logits - logits.amax(dim=-1, keepdim=True)).double() / temperature).float()
    else:
        logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop[..., 0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@pytest.fixture
def fast_paths(monkeypatch):
    """Count the draws that took the candidate path (so a test knows it exercised it)."""
    calls = {"fast": 0}
    real = sampling._draw_within

    def counting(*a):
        calls["fast"] += 1
        return real(*a)

    monkeypatch.setattr(sampling, "_draw_within", counting)
    return calls


def logits_like(kind, rows, vocab, g):
    """Row logits of different shapes: peaked (a trained model's), flat, tied, with -inf."""
    x = torch.randn(rows, vocab, generator=g)
    if kind == "peaked":  # a few likely tokens, a long tail (zipf-like)
        ranks = torch.argsort(torch.rand(rows, vocab, generator=g), dim=-1).float() + 1
        return -1.2 * torch.log(ranks) * 3 + 0.3 * x
    if kind == "flat":
        return 0.02 * x
    if kind == "ties":  # few distinct values: many tokens tie at every level
        return torch.randint(0, 4, (rows, vocab), generator=g).float() * 2.5
    if kind == "neg-inf":  # most tokens impossible
        out = 4 * x
        out[torch.rand(rows, vocab, generator=g) < 0.9] = float("-inf")
        return out
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["peaked", "flat", "ties", "neg-inf"])
def test_nucleus_draw_equals_the_full_vocabulary_draw(kind, fast_paths, monkeypatch):
    """Every temperature / top_k / top_p edge over a 3000-token vocabulary, candidates of 32
    then 512 tokens (the same logic as 256 / 4096 over 50k, at a fraction of the time)."""
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", (32, 512))
    vocab = 3000
    g = torch.Generator().manual_seed(len(kind))
    cases = 0
    for temperature in (1.0, 0.7, 1.6, 1e-6):
        for top_k in (None, 0, 5, 40, vocab + 10):
            for top_p in (None, 1.0, 0.95, 0.5, 1e-9, 1e-60):
                logits = logits_like(kind, 3, vocab, g)
                for seed in range(2):
                    a = sample(logits, temperature, top_k, top_p, torch.Generator().manual_seed(seed))
                    b = reference(logits, temperature, top_k, top_p, torch.Generator().manual_seed(seed))
                    assert a.tolist() == b.tolist(), (temperature, top_k, top_p, seed)
                    cases += 1
    assert cases == 240
    if kind != "ties":
        assert fast_paths["fast"] > 20  # the candidate path really ran


def test_gpt2_vocabulary_many_seeds_and_the_generator_advances_alike(fast_paths):
    """GPT-2's 50257 tokens, the real candidate sizes: 40 seeds, 3 draws each from one
    generator: same tokens, and the generator's state after each draw is the same (the next
    token's draw does not drift)."""
    g = torch.Generator().manual_seed(0)
    logits = logits_like("peaked", 2, 50257, g)
    for seed in range(40):
        ga, gb = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for top_k, top_p in ((None, 0.9), (100, 0.5), (None, 0.999)):
            a = sample(logits, 0.9, top_k, top_p, ga)
            b = reference(logits, 0.9, top_k, top_p, gb)
            assert a.tolist() == b.tolist()
            assert torch.equal(ga.get_state(), gb.get_state())
    assert fast_paths["fast"] >= 80


def test_ties_across_the_nucleus_boundary_fall_back_to_the_sort(fast_paths):
    """Two likely tokens and a tie at the cut: which tied token stays is the sort's choice,
    so the candidate path must step aside (and the draws still agree)."""
    logits = torch.full((1, 5000), -30.0)
    logits[0, [10, 4000, 2500]] = 2.0  # three tokens of equal mass 1/3 each
    for seed in range(30):
        a = sample(logits, 1.0, None, 0.5, torch.Generator().manual_seed(seed))
        b = reference(logits, 1.0, None, 0.5, torch.Generator().manual_seed(seed))
        assert a.tolist() == b.tolist()
    assert fast_paths["fast"] == 0


def test_nan_logits_fail_as_before():
    logits = torch.full((1, 5000), math.nan)
    with pytest.raises(RuntimeError):
        sample(logits, 1.0, None, 0.9, torch.Generator().manual_seed(0))


def test_batched_equals_single_with_top_p_on_the_candidate_path(monkeypatch, fast_paths):
    """Ragged rows sampled with top-p (candidates of 8 and 32 tokens over a 400-token
    vocabulary, so both the candidate path and the fallback run) give each seed's tokens
    alone."""
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", (8, 32))
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", vocab_size=400, context_length=32, tie_weights=False)).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 400, (n,), generator=g).tolist() for n in (3, 9, 5, 12)]
    settings = dict(temperature=[0.05, 0.1, 1.0, 0.08], top_k=[None, 50, None, None],
                    top_p=[0.9, 0.6, 0.95, 0.3], seed=[1, 2, 3, 4])
    rows = generate_batch(model, prompts, 12, **settings)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        kw = {k: v[i] for k, v in settings.items()}
        assert r.tokens == generate(model, torch.tensor([p]), 12, **kw)[0, len(p):].tolist()
    assert fast_paths["fast"] > 0
