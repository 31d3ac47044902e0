"""Converted folders carry a tokenizer transformers loads: `AutoTokenizer` on a run folder
converted to Hugging Face format gives our ids on tricky text, for our byte-level BPE, GPT-2's
BPE and WordPiece, and its chat template lays a conversation out as `chat` does."""

from __future__ import annotations

import json

import pytest
import torch

from llmscratch import GPT, GPTConfig
from llmscratch.checkpoints.convert import convert
from llmscratch.checkpoints.run import save_model
from llmscratch.cli.main import main
from llmscratch.decoding.prompts import TEMPLATES, format_chat
from llmscratch.tokenizer import BPETokenizer, WordPieceTokenizer, WordTokenizer, get_tokenizer
from llmscratch.tokenizer.hf_export import to_hf_tokenizer

transformers = pytest.importorskip("transformers")

TRICKY = [
    "Hello world<|endoftext|>  tabs\t\tand\n\n\nnewlines   ",
    "Ünïcödé café naïve 日本語 テキスト 🤖🎉 x",
    "it's they'll I'VE  x = f(a,b)**2 # comment",
    "[MASK] is [CLS] x [SEP]",
    "\u200bzero\u00a0nbsp\r\nctl\x07 end",
    "   leading and trailing   ",
    "a" * 150,
]
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Add 2+2", "input": "numbers"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "and 3+3?"}]


@pytest.fixture(scope="module")
def tokenizers(docs_text):
    text = docs_text[:40_000]
    return {"bpe": BPETokenizer().train(text, 600),
            "wordpiece": WordPieceTokenizer.from_corpus([text], 400),
            "wordpiece-cased": WordPieceTokenizer.from_corpus([text], 400, lowercase=False),
            "gpt2": get_tokenizer("gpt2")}


def _assert_same_ids(ours, folder, docs_text):
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in TRICKY + [docs_text[:2000]]:
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
    return theirs


@pytest.mark.parametrize("name", ["bpe", "wordpiece", "wordpiece-cased", "gpt2"])
def test_every_tokenizer_exports_with_equal_ids(name, tokenizers, tmp_path, docs_text):
    ours = tokenizers[name]
    to_hf_tokenizer(ours).save_hf(tmp_path)
    theirs = _assert_same_ids(ours, tmp_path, docs_text)
    assert theirs.convert_tokens_to_ids(theirs.eos_token) == ours.eot_id


@pytest.mark.parametrize("preset,name", [("llama-tiny", "bpe"), ("llama-tiny", "wordpiece"), ("tiny", "bpe")])
def test_a_converted_run_folder_loads_in_autotokenizer(preset, name, tokenizers, tmp_path, docs_text):
    ours = tokenizers[name]
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(preset, vocab_size=ours.vocab_size))
    save_model(model, tmp_path / "run", ours, extra={"template": "alpaca"})
    with _no_warnings():
        assert main(["convert", str(tmp_path / "run"), str(tmp_path / "hf")]) in (0, None)
    hf = tmp_path / "hf"
    theirs = _assert_same_ids(ours, hf, docs_text)
    # the chat template is the layout the run was tuned on (alpaca), eos as ours
    rendered = theirs.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert rendered == format_chat(CONVERSATION, "alpaca").replace("<|endoftext|>", theirs.eos_token)
    assert "### Instruction:" in rendered
    # and the folder converts back to a run whose tokenizer gives the same ids
    back = convert(hf, tmp_path / "run2")
    from llmscratch.tokenizer import load_tokenizer
    assert load_tokenizer(back).encode(TRICKY[1]) == ours.encode(TRICKY[1])


def test_every_template_renders_in_transformers_as_ours(tokenizers, tmp_path):
    for name in ("alpaca", "phi3", "plain"):
        folder = tmp_path / name
        to_hf_tokenizer(tokenizers["gpt2"], TEMPLATES[name].jinja()).save_hf(folder)
        theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
        for conv in (CONVERSATION, CONVERSATION[1:2], [{"role": "user", "content": "x", "input": "  "}]):
            rendered = theirs.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            assert rendered == format_chat(conv, name), name
    assert TEMPLATES["model"].jinja() is None


def test_a_word_tokenizer_says_autotokenizer_cannot_load_it(tmp_path):
    tok = WordTokenizer.from_text("the cat sat on the mat")
    save_model(GPT(GPTConfig.from_name("tiny", vocab_size=tok.vocab_size)), tmp_path / "run", tok)
    with pytest.warns(UserWarning, match="word tokenizer, which transformers' AutoTokenizer cannot load"):
        hf = convert(tmp_path / "run", tmp_path / "hf")
    assert not (hf / "tokenizer.json").exists() and (hf / "llmscratch_tokenizer.json").is_file()
    assert json.loads((hf / "llmscratch_tokenizer.json").read_text())["type"] == "word"


class _no_warnings:
    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)
