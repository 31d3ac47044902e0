"""`evaluate_lm`: the library's language-model evaluation (what `llmscratch eval` prints)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmscratch.data.corpora import Document
from llmscratch.errors import UserError
from llmscratch.evaluation.lm import evaluate_lm
from llmscratch.models.gpt import GPT, GPTConfig
from llmscratch.tokenizer import BPETokenizer


@pytest.fixture(scope="module")
def text(corpus_file) -> str:
    return corpus_file.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tok(text) -> BPETokenizer:
    return BPETokenizer().train(text[:6000], 300)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name("tiny", vocab_size=tok.vocab_size)).eval()


def test_loss_is_the_mean_next_token_loss_over_windows_in_order(model, tok, text):
    T = 32
    r = evaluate_lm(model, tok, [Document("docs", text)], batch_size=4, context_length=T, progress=False)
    ids = torch.tensor(tok.encode(text))  # one document: no separator
    n = (len(ids) - 1) // T
    x, y = ids[: n * T].view(n, T), ids[1 : n * T + 1].view(n, T)
    with torch.no_grad():
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert r["loss"] == pytest.approx(loss, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    n_bytes = len(text.encode("utf-8"))
    assert r["bpb"] == pytest.approx(loss / math.log(2) / (n_bytes / len(ids)), rel=1e-5)
    assert (r["tokens"], r["bytes"], r["windows"], r["context_length"]) == (len(ids), n_bytes, n, T)


def test_a_file_path_gives_what_its_documents_give(model, tok, text, corpus_file):
    by_path = evaluate_lm(model, tok, str(corpus_file), batch_size=4, context_length=32, progress=False)
    by_docs = evaluate_lm(model, tok, [text], batch_size=4, context_length=32, progress=False)
    assert by_path["loss"] == pytest.approx(by_docs["loss"], rel=1e-6)
    assert by_path["tokens"] == by_docs["tokens"]


def test_max_batches_and_the_model_context_cap(model, tok, text):
    r = evaluate_lm(model, tok, [text], batch_size=4, context_length=32, max_batches=2, progress=False)
    assert r["windows"] == 8
    big = evaluate_lm(model, tok, [text], batch_size=2, context_length=10_000, max_batches=1, progress=False)
    assert big["context_length"] == model.config.context_length


def test_too_little_text_is_a_user_error(model, tok):
    with pytest.raises(UserError, match="fewer than one window of 128"):
        evaluate_lm(model, tok, ["just a few words"], progress=False)
