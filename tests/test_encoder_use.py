"""Using an encoder: fill-mask, embed, /v1/embeddings through the openai client, and the
one-line refusals (no [MASK], a GPT given to fill-mask, an encoder given to generate/chat)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from llmscratch.models.bert import Bert, BertConfig
from llmscratch.checkpoints.run import load_model, save_model
from llmscratch.cli.main import main
from llmscratch.decoding.encoder import embed_texts, fill_mask
from llmscratch.errors import UserError
from llmscratch.tokenizer import WordPieceTokenizer


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory, docs_text):
    tok = WordPieceTokenizer.from_corpus([docs_text[:20_000]], 300)
    torch.manual_seed(0)
    model = Bert(BertConfig.from_name("bert-tiny", vocab_size=tok.vocab_size, context_length=32))
    out = tmp_path_factory.mktemp("enc")
    save_model(model, out, tok)
    return out


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    from llmscratch.models.gpt import GPT, GPTConfig
    from llmscratch.tokenizer import get_tokenizer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("gpt")
    save_model(GPT(GPTConfig.from_name("tiny")), out, get_tokenizer("gpt2"))
    return out


def test_fill_mask_cli(encoder_run, capsys):
    assert main(["fill-mask", "--model", str(encoder_run), "--top-k", "3", "the [MASK] of a [MASK] is"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[MASK] 1:" and lines[4] == "[MASK] 2:"
    probs = [float(l.split("\t")[0]) for l in lines if "\t" in l]
    assert len(probs) == 6 and probs[:3] == sorted(probs[:3], reverse=True) and sum(probs[:3]) <= 1
    model, tok = load_model(str(encoder_run))
    top = fill_mask(model, tok, "the [MASK] of a [MASK] is", top_k=3)
    assert [t for t, _ in top[0]] == [l.split("\t")[1] for l in lines[1:4]]


@pytest.mark.parametrize("argv,message", [
    (["fill-mask", "--model", "{enc}", "no mask here"], "has no [MASK] to fill"),
    (["fill-mask", "--model", "{gpt}", "a [MASK]"], "fill-mask needs an encoder"),
    (["embed", "--model", "{gpt}", "a text"], "embed needs an encoder"),
    (["generate", "--model", "{enc}", "--prompt", "hello"], "generate needs a decoder"),
    (["embed", "--model", "{enc}"], "give a text to embed"),
    (["fill-mask", "--model", "bert-tiny", "a [MASK]"], "an encoder preset has no vocabulary of its own"),
    (["embed", "--model", "nope", "x"], "encoder: bert-tiny, bert-mini"),
    (["pretrain", "--model", "nope", "--out", "{enc}/x"], "unknown model preset 'nope'; choose one of: GPT: gpt2-124m"),
    (["eval", "tasks", "--model", "{enc}", "--tasks", "pattern"], "eval tasks (log-likelihood scoring) needs a decoder"),
])
def test_bad_input_is_one_line(encoder_run, gpt_run, corpus_file, capsys, argv, message):
    argv = [a.format(enc=encoder_run, gpt=gpt_run, data=corpus_file) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_info_describes_an_encoder(encoder_run, capsys):
    assert main(["info", "--model", str(encoder_run)]) == 0
    out = capsys.readouterr().out
    assert "encoder (BERT)" in out and "model_type" in out
    model, _ = load_model(str(encoder_run))
    assert f"parameters   {model.num_params():,}" in out


def test_chat_refuses_an_encoder(encoder_run):
    from llmscratch.decoding.chat import load_chat

    with pytest.raises(UserError, match="chat needs a decoder"):
        load_chat(str(encoder_run))


def test_embed_cli_and_truncation_warning(encoder_run, tmp_path, capsys):
    long_text = "the value of the function " * 20
    assert main(["embed", "--model", str(encoder_run), "first text", long_text, "--out", str(tmp_path / "e.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "truncated to 32" in err
    rows = [json.loads(l) for l in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["first text", long_text]
    v = torch.tensor([r["embedding"] for r in rows])
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(2), atol=1e-4, rtol=0)
    model, tok = load_model(str(encoder_run))
    with pytest.warns(UserWarning):
        expected = embed_texts(model, tok, ["first text", long_text])
    torch.testing.assert_close(v, expected, atol=1e-5, rtol=0)
    assert main(["embed", "--model", str(encoder_run), "--pooling", "cls", "--no-normalize", "x"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert abs(torch.tensor(row["embedding"]).norm().item() - 1) > 1e-3


def test_hf_bert_folder_fill_mask(encoder_run, tmp_path, capsys):
    from llmscratch.hf.bert import save_hf_bert

    model, tok = load_model(str(encoder_run))
    save_hf_bert(model, tmp_path / "hf", tokenizer=tok)
    assert (tmp_path / "hf" / "vocab.txt").is_file()
    assert main(["fill-mask", "--model", str(tmp_path / "hf"), "a [MASK] b"]) == 0
    hf_lines = capsys.readouterr().out
    assert main(["fill-mask", "--model", str(encoder_run), "a [MASK] b"]) == 0
    assert capsys.readouterr().out == hf_lines


def test_embeddings_endpoint_with_openai_client(encoder_run, gpt_run):
    openai = pytest.importorskip("openai")
    from llmscratch.serve import BackgroundServer, create_app, load_engine

    engine = load_engine(str(encoder_run), model_name="enc")
    model, tok = load_model(str(encoder_run))
    texts = ["the function returns", "a value of the object"]
    expected = embed_texts(model, tok, texts)
    with BackgroundServer(create_app(engine)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0, timeout=60)
        r = c.embeddings.create(model="enc", input=texts)  # the client asks for base64
        got = torch.tensor([d.embedding for d in r.data])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens > 0
        r = c.embeddings.create(model="enc", input="the function returns", encoding_format="float")
        torch.testing.assert_close(torch.tensor(r.data[0].embedding), expected[0], atol=1e-5, rtol=0)
        ids = tok.encode_input("the function returns")[0]
        r = c.embeddings.create(model="enc", input=ids, encoding_format="float")
        torch.testing.assert_close(torch.tensor(r.data[0].embedding), expected[0], atol=1e-5, rtol=0)
        with pytest.raises(openai.BadRequestError, match="is an encoder"):
            c.completions.create(model="enc", prompt="hello")
        with pytest.raises(openai.BadRequestError, match="dimensions"):
            c.embeddings.create(model="enc", input="x", dimensions=3)
        with pytest.raises(openai.NotFoundError):
            c.embeddings.create(model="other", input="x")
    gpt = load_engine(str(gpt_run), model_name="gpt", max_batch_size=1)
    with BackgroundServer(create_app(gpt)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="embeddings need an encoder"):
            c.embeddings.create(model="gpt", input="x")


def test_finetune_classify_an_encoder(tmp_path, sms_tsv, capsys):
    """`finetune classify` on an encoder run: pooled [CLS] head, the same outputs, the same
    `classify` command; the reloaded folder gives the in-memory model's predictions."""
    from conftest import synthetic_sms
    from llmscratch.finetune.classify import ClassifyConfig, classify_texts, finetune_classify, load_classifier

    rows = synthetic_sms()
    tok = WordPieceTokenizer.from_corpus([t for _, t in rows], 200)
    torch.manual_seed(0)
    enc = tmp_path / "enc"
    save_model(Bert(BertConfig(vocab_size=tok.vocab_size, context_length=48, n_embd=32, n_layer=2, n_head=2)),
               enc, tok)
    out = tmp_path / "clf"
    result = finetune_classify(ClassifyConfig(model=str(enc), data=str(sms_tsv), out=str(out), epochs=3,
                                              text_column="1", label_column="0",  # default: all layers
                                              batch_size=8, lr=3e-3, progress=False, seed=1))
    assert result.metrics["settings"]["trainable"] == "all"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "loss.png", "confusion.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_accuracy"] >= 0.9 and metrics["test_accuracy"] >= 0.8  # spam words are easy
    model, tok2, labels, max_length = load_classifier(out)
    assert isinstance(model, Bert) and labels == ["ham", "spam"]
    texts = [t for _, t in rows[:6]] + [t for _, t in rows[-4:]]
    preds = classify_texts(out, texts)
    again = classify_texts((result.model.eval(), tok2, labels, max_length), texts)
    assert [l for l, _ in preds] == [l for l, _ in again]
    assert [p for _, p in preds] == pytest.approx([p for _, p in again], abs=1e-5)
    capsys.readouterr()
    assert main(["classify", "--model", str(out), texts[0]]) == 0
    assert capsys.readouterr().out.split("\t")[0] == preds[0][0]


def test_classify_defaults_follow_the_model_kind(encoder_run, gpt_run, tmp_path):
    """An encoder trains all layers at 1e-3 when small (bert-tiny stalls at chance with a
    GPT's last-1 at 5e-5), at 5e-5 when BERT-base sized; a GPT keeps the book's last-1 at
    5e-5; what the user sets is kept."""
    from llmscratch.finetune.classify import ClassifyConfig, resolve_defaults

    def resolved(model, **kw):
        cfg = ClassifyConfig(model=str(model), **kw)
        resolve_defaults(cfg)
        return cfg.trainable, cfg.lr

    assert resolved(encoder_run) == ("all", 1e-3)
    assert resolved("bert-tiny") == ("all", 1e-3)
    assert resolved(gpt_run) == ("last-1", 5e-5)
    assert resolved("small") == ("last-1", 5e-5)
    assert resolved(encoder_run, trainable="last-2", lr=3e-4) == ("last-2", 3e-4)
    base = tmp_path / "bert-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768,
                                                  "num_hidden_layers": 12, "vocab_size": 30522}))
    assert resolved(base) == ("all", 5e-5)


def test_eval_on_an_encoder_reports_masked_token_figures(tmp_path, corpus_file, capsys):
    """`eval --model <encoder run>` reports held-out masked-token loss and accuracy: on the
    run's own validation text, the figures its pretraining reported at the end."""
    from llmscratch.train import TrainConfig, pretrain

    out = tmp_path / "bert"
    pretrain(TrainConfig(model="bert-tiny", data=str(corpus_file), tokenizer="wordpiece:300", context_length=34,
                         batch_size=4, max_steps=4, eval_every=4, eval_batches=100, warmup_steps=1,
                         sample_tokens=0, precision="fp32", progress=False, seed=3, out=str(out)))
    last = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in l][-1]
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--no-progress", "--batch-size", "4"]) in (0, None)
    text = capsys.readouterr().out
    loss = float(re.search(r"masked-token loss\s+([\d.]+)", text).group(1))
    acc = float(re.search(r"masked-token accuracy\s+([\d.]+)%", text).group(1))
    assert loss == pytest.approx(last["val_loss"], abs=1e-3)
    assert acc == pytest.approx(100 * last["val_mlm_acc"], abs=0.01)
