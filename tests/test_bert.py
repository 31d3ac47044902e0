"""The BERT encoder: logits equal transformers' BertForMaskedLM / BertModel /
BertForSequenceClassification on random tiny configs both ways; bidirectional attention;
padding; run folders of an encoder."""

from __future__ import annotations

import logging

import pytest
import torch

from llmscratch.models.bert import Bert, BertConfig, embed
from llmscratch.errors import UserError
from llmscratch.hf.bert import is_hf_bert_dir, load_hf_bert, save_hf_bert

transformers = pytest.importorskip("transformers")

HF_KW = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=48, max_position_embeddings=40, type_vocab_size=2, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0)


def _inputs(seed=0, B=3, T=12, vocab=99):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, vocab, (B, T), generator=g)
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, T // 2:] = 1
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, -4:] = False  # a padded row
    return idx, types, mask


def _hf(cls_name, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(**{**HF_KW, **kw})
    return getattr(transformers, cls_name)(cfg).eval()


def _randomise(model):
    """transformers inits LayerNorms at (1, 0) and biases at 0: perturb everything so a
    swapped name or a missing transpose cannot hide."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "BertModel", "BertForSequenceClassification"])
def test_load_matches_transformers(tmp_path, cls_name):
    hf = _randomise(_hf(cls_name, num_labels=3))
    hf.save_pretrained(tmp_path)
    assert is_hf_bert_dir(tmp_path)
    ours, missing = load_hf_bert(tmp_path)
    idx, types, mask = _inputs()
    with torch.no_grad():
        out = hf(input_ids=idx, token_type_ids=types, attention_mask=mask.long())
        h = ours.hidden_states(idx, types, mask)
        if cls_name == "BertForMaskedLM":
            assert sorted(missing) == ["pooler.bias", "pooler.weight"]
            real = mask.unsqueeze(-1).expand_as(out.logits)
            torch.testing.assert_close(ours.mlm_logits(h)[real], out.logits[real], atol=1e-4, rtol=0)
        elif cls_name == "BertModel":
            assert all(m.startswith("mlm.") for m in missing)
            torch.testing.assert_close(h[mask], out.last_hidden_state[mask], atol=1e-4, rtol=0)
            torch.testing.assert_close(ours.pooled(h), out.pooler_output, atol=1e-4, rtol=0)
        else:
            torch.testing.assert_close(ours.class_logits(idx, types, mask), out.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["BertForMaskedLM", "BertModel", "BertForSequenceClassification"])
def test_save_loads_in_transformers_without_warnings(tmp_path, arch, caplog):
    torch.manual_seed(0)
    ours = _randomise(Bert(BertConfig(vocab_size=99, context_length=40, n_embd=32, n_layer=2, n_head=4)))
    if arch == "BertForSequenceClassification":
        ours.add_classifier(2)
    ours.eval()
    save_hf_bert(ours, tmp_path, architecture=arch, labels=["ham", "spam"] if ours.classifier else None)
    with caplog.at_level(logging.WARNING):
        hf = getattr(transformers, arch).from_pretrained(tmp_path).eval()
    assert not [r for r in caplog.records if "newly initialized" in r.getMessage() or "not used" in r.getMessage()
                or "MISSING" in r.getMessage() or "UNEXPECTED" in r.getMessage()], caplog.text
    idx, types, mask = _inputs(1)
    with torch.no_grad():
        out = hf(input_ids=idx, token_type_ids=types, attention_mask=mask.long())
        h = ours.hidden_states(idx, types, mask)
        if arch == "BertForMaskedLM":
            torch.testing.assert_close(ours(idx, types, mask)[mask], out.logits[mask], atol=1e-4, rtol=0)
        elif arch == "BertModel":
            torch.testing.assert_close(ours.pooled(h), out.pooler_output, atol=1e-4, rtol=0)
        else:
            torch.testing.assert_close(ours.class_logits(idx, types, mask), out.logits, atol=1e-4, rtol=0)
            assert hf.config.id2label == {0: "ham", 1: "spam"}
    back, _ = load_hf_bert(tmp_path)  # and back into ours, bit for bit
    for k, v in back.state_dict().items():
        if arch == "BertForMaskedLM" and k.startswith("pooler."):
            continue
        if arch != "BertForMaskedLM" and k.startswith("mlm.") and k != "mlm.decoder.weight":
            continue
        assert torch.equal(v, ours.state_dict()[k]), k


def test_bidirectional_and_padding():
    torch.manual_seed(0)
    model = Bert(BertConfig.from_name("bert-tiny", vocab_size=50, context_length=16)).eval()
    idx = torch.randint(5, 50, (1, 8))
    h = model.hidden_states(idx)
    changed = idx.clone()
    changed[0, -1] = 4
    h2 = model.hidden_states(changed)
    assert not torch.allclose(h[0, 0], h2[0, 0])  # the first token sees the last one (no causal mask)
    padded = torch.cat([idx, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.arange(13)[None] < 8
    torch.testing.assert_close(model.hidden_states(padded, key_mask=mask)[:, :8], h, atol=1e-5, rtol=0)
    e = embed(model, padded, mask)
    torch.testing.assert_close(e, embed(model, idx), atol=1e-5, rtol=0)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(1))
    with pytest.raises(UserError, match="exceeds the encoder's 16 positions"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_presets_and_config_errors():
    assert BertConfig.from_name("bert-mini").n_layer == 4
    assert BertConfig.from_name("bert-small").n_embd == 512
    assert BertConfig.from_name("bert-base").n_head == 12
    tiny = BertConfig.from_name("bert-tiny")
    assert (tiny.n_layer, tiny.n_embd, tiny.n_head, tiny.ffn_dim) == (2, 128, 2, 512)
    with pytest.raises(UserError, match="unknown encoder preset"):
        BertConfig.from_name("bert-huge")
    with pytest.raises(UserError, match="divisible"):
        BertConfig(n_embd=30, n_head=4)


def test_load_errors(tmp_path):
    hf = _hf("BertForMaskedLM", hidden_act="gelu_new")
    hf.save_pretrained(tmp_path / "act")
    with pytest.raises(UserError, match="hidden_act 'gelu_new' is not supported"):
        load_hf_bert(tmp_path / "act")
    ours = Bert(BertConfig(vocab_size=99, context_length=40, n_embd=32, n_layer=2, n_head=4))
    save_hf_bert(ours, tmp_path / "bad")
    import json

    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    cfg["hidden_size"] = 64
    cfg["num_attention_heads"] = 4
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="has shape"):
        load_hf_bert(tmp_path / "bad")


# --------------------------------------------------------------------------- download and convert


@pytest.fixture()
def bert_hub(tmp_path, monkeypatch):
    """The fake Hub of test_hub.py serving a tiny random BertForMaskedLM (with vocab.txt) as
    google-bert/bert-base-uncased."""
    import threading
    from http.server import ThreadingHTTPServer

    from test_hub import _HubHandler

    from llmscratch.tokenizer import WordPieceTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    folder = tmp_path / "src"
    hf = _randomise(_hf("BertForMaskedLM"))
    hf.save_pretrained(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]
    WordPieceTokenizer(vocab).save_vocab(folder)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
    server.repo, server.revision = "google-bert/bert-base-uncased", "main"
    server.files = {f: (folder / f).read_bytes()
                    for f in ("config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json")}
    server.sha256, server.git_sha1, server.etags, server.redirect, server.requests = {}, {}, True, False, []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, hf
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_bert_base_uncased(bert_hub, tmp_path):
    from llmscratch.checkpoints.run import load_model
    from llmscratch.checkpoints.hub import download_model

    server, hf = bert_hub
    out = download_model("bert-base-uncased", tmp_path / "bert", endpoint=server.url, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json",
                                                     "vocab.txt"]
    assert download_model("google-bert/bert-base-uncased", tmp_path / "bert", endpoint=server.url,
                          progress=False) == out  # the Hub's name too; nothing fetched again
    model, tok = load_model(str(out))
    assert isinstance(model, Bert) and tok.vocab_size == 99
    idx, types, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(idx, types, mask)[mask], hf(input_ids=idx, token_type_ids=types,
                                   attention_mask=mask.long()).logits[mask], atol=1e-4, rtol=0)


def test_convert_both_ways(tmp_path):
    from llmscratch.checkpoints.run import is_run_dir, load_model
    from llmscratch.cli.main import main
    from llmscratch.tokenizer import WordPieceTokenizer

    hf = _randomise(_hf("BertForMaskedLM"))
    hf.save_pretrained(tmp_path / "hf")
    WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"W{i}" for i in range(94)],
                       lowercase=False).save_vocab(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    assert is_run_dir(tmp_path / "run")
    run_model, tok = load_model(str(tmp_path / "run"))
    assert tok.lowercase is False and tok.tokens[5] == "W0"  # vocab and casing carried over
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    back = transformers.BertForMaskedLM.from_pretrained(tmp_path / "back").eval()
    idx, types, mask = _inputs()
    with torch.no_grad():
        expected = hf(input_ids=idx, token_type_ids=types, attention_mask=mask.long()).logits[mask]
        torch.testing.assert_close(run_model(idx, types, mask)[mask], expected, atol=1e-4, rtol=0)
        got = back(input_ids=idx, token_type_ids=types, attention_mask=mask.long()).logits[mask]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (tmp_path / "back" / "vocab.txt").read_text() == (tmp_path / "hf" / "vocab.txt").read_text()
