"""The checkpoint API from the top of the package: `llmscratch.load_hf` / `save_hf` /
`load_model`, the one family table they dispatch on, the one run-folder loader (decoders
and encoders alike) and `convert`'s all-or-nothing output folder."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmscratch
from llmscratch import GPT, GPTConfig, UserError, load_hf, load_model, save_hf
from llmscratch.checkpoints.convert import convert, staged_folder
from llmscratch.checkpoints.run import load_run_model, save_model
from llmscratch.hf import HF_FAMILIES, HFFamily, register_hf_family
from llmscratch.models.bert import Bert, BertConfig


def _same_weights(a, b, skip: tuple[str, ...] = ()):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert name.startswith(skip) or torch.equal(sa[name], sb[name]), name


def test_the_checkpoint_api_is_importable_from_the_top():
    for name in ("load_hf", "save_hf", "load_model", "load_hf_gpt2", "save_hf_gpt2"):
        assert name in llmscratch.__all__ and callable(getattr(llmscratch, name))


@pytest.mark.parametrize("make", [
    lambda: GPT(GPTConfig.from_name("tiny", vocab_size=64)),  # GPT-2's block
    lambda: GPT(GPTConfig.from_name("llama-tiny", vocab_size=64)),  # Llama's
    lambda: GPT(GPTConfig.from_name("llama-tiny", vocab_size=64, qk_norm=True)),  # Qwen3's
    lambda: Bert(BertConfig.from_name("bert-tiny", vocab_size=64)),  # an encoder
], ids=["gpt2", "llama", "qwen3", "bert"])
def test_a_tiny_model_round_trips_through_save_hf_and_load_hf(make, tmp_path):
    torch.manual_seed(0)
    model = make().eval()
    folder = save_hf(model, tmp_path / "hf")
    back = load_hf(folder)
    assert type(back) is type(model)
    if isinstance(model, GPT):  # (a BERT config reads intermediate_size=0 back as its value)
        assert back.config == model.config
    _same_weights(model, back, skip=("pooler.",) if isinstance(model, Bert) else ())  # a BertForMaskedLM has none


def test_every_family_is_in_the_one_table():
    assert list(HF_FAMILIES) == ["gpt2", "llama", "qwen3", "mistral", "bert"]
    assert {f.name for f in HF_FAMILIES.values()} == {"gpt2", "llama", "bert"}


def test_save_hf_refuses_a_model_no_family_claims():
    with pytest.raises(UserError, match="save_hf needs a llmscratch model of a Hugging Face family"):
        save_hf(torch.nn.Linear(2, 2), "unused")


def test_a_registered_family_is_reached_by_load_hf_and_save_hf(tmp_path):
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.arange(3.0))

    def save(model, path, tokenizer=None, labels=None):
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "toy"}))
        save_file({"w": model.w.detach()}, str(path / "model.safetensors"))
        return path

    def load(path, dtype=None, device=None):
        model = Toy()
        model.w.data = load_file(str(path / "model.safetensors"))["w"]
        return model

    family = HFFamily(name="toy", model_types=("toy",), load=load, save=save,
                      claims=lambda m: isinstance(m, Toy), tokenizer=lambda folder: None)
    register_hf_family(family)
    try:
        toy = Toy()
        toy.w.data += 1
        back = load_hf(save_hf(toy, tmp_path / "toy"))
        assert torch.equal(back.w, toy.w)
    finally:
        del HF_FAMILIES["toy"]


def test_load_model_from_the_top_takes_a_preset_and_a_run_folder(tmp_path):
    model, tokenizer = load_model("tiny")
    assert isinstance(model, GPT) and tokenizer.name == "gpt2"
    save_model(model, tmp_path / "run", tokenizer)
    again, _ = load_model(str(tmp_path / "run"))
    _same_weights(model, again)


def test_one_run_folder_loader_checks_an_encoder_as_strictly_as_a_decoder(tmp_path):
    torch.manual_seed(0)
    encoder = Bert(BertConfig.from_name("bert-tiny", vocab_size=64)).eval()
    save_model(encoder, tmp_path / "run")
    back = load_run_model(tmp_path / "run")
    assert isinstance(back, Bert) and back.mlm.decoder.weight is back.wte.weight  # tied again
    _same_weights(encoder, back)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    cfg["model"]["n_embd"] *= 2  # the weights no longer fit the config
    cfg["model"]["intermediate_size"] = 4 * cfg["model"]["n_embd"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="has shape .* config needs"):
        load_run_model(tmp_path / "run")


def test_staged_folder_leaves_nothing_half_written(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_folder(dst) as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("interrupted")
    assert not dst.exists() and list(tmp_path.iterdir()) == []
    with staged_folder(dst) as tmp:
        (tmp / "done").write_text("x")
    umask = os.umask(0)
    os.umask(umask)
    assert (dst / "done").is_file() and dst.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


def test_convert_an_encoder_both_ways_through_the_one_convert(tmp_path):
    torch.manual_seed(0)
    encoder = Bert(BertConfig.from_name("bert-tiny", vocab_size=64)).eval()
    from llmscratch.tokenizer import WordPieceTokenizer

    tok = WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)])
    save_model(encoder, tmp_path / "run", tok)
    hf = convert(tmp_path / "run", tmp_path / "hf")
    assert (hf / "vocab.txt").is_file() and not (hf / "llmscratch_tokenizer.json").exists()
    run = convert(hf, tmp_path / "run2")
    _same_weights(encoder, load_run_model(run), skip=("pooler.",))  # a BertForMaskedLM has none


def test_a_llama_folder_without_its_tokenizer_loads_only_through_convert(tmp_path):
    folder = save_hf(GPT(GPTConfig.from_name("llama-tiny", vocab_size=64)), tmp_path / "hf")
    with pytest.raises(UserError, match="no tokenizer.json \\(the model's tokenizer\\)"):
        load_model(str(folder))
    with pytest.warns(UserWarning, match="gpt2 tokenizer has 50257 ids but the model only 64"):
        run = convert(folder, tmp_path / "run")  # as before: GPT-2's, with a warning
    assert load_model(str(run))[1].name == "gpt2"
