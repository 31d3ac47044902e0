"""Every tokenizer on arbitrary Unicode, surrogates included: one behaviour for all.

A Python string may hold surrogate code points that UTF-8 cannot encode (a lone "\\ud800"
from a JSON body, a file decoded with `surrogateescape`). tiktoken turns them into valid text
(a high+low pair into its character, a lone one into U+FFFD); every tokenizer of ours does the
same (`tokenizer.base.valid_unicode`) instead of raising from deep inside.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmscratch.tokenizer import BPETokenizer, WordPieceTokenizer, WordTokenizer, get_tokenizer
from llmscratch.tokenizer.base import valid_unicode
from llmscratch.tokenizer.gpt2 import gpt2_files

# Any code point at all: hypothesis leaves out surrogates (category Cs) unless asked.
ANY_TEXT = st.text(alphabet=st.characters(blacklist_categories=()), max_size=40)
SURROGATE_TEXT = st.lists(st.sampled_from(["a", " ", "é", "😀", "\ud800", "\udfff", "\ud83d", "\ude00",
                                           "<|endoftext|>", "[MASK]", "\n"]), max_size=20).map("".join)


def test_valid_unicode_follows_tiktokens_rule():
    assert valid_unicode("a\ud800b") == "a\ufffdb"
    assert valid_unicode("\ud83d\ude00") == "😀"  # a surrogate pair is the character it encodes
    assert valid_unicode("\ude00\ud83d") == "\ufffd\ufffd"  # the wrong order is two lone ones
    text = "plain text, é 中 😀"
    assert valid_unicode(text) is text  # valid text is not copied


@pytest.fixture(scope="module")
def tokenizers(docs_text):
    text = docs_text[:20_000]
    hf = pytest.importorskip("tokenizers")
    backend = hf.Tokenizer(hf.models.BPE())
    backend.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = hf.decoders.ByteLevel()
    backend.train_from_iterator([text], hf.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet()))
    from llmscratch.tokenizer.hf import HFTokenizer

    return {
        "bpe": BPETokenizer().train(text, 300),
        "gpt2": get_tokenizer("gpt2"),
        "gpt2-files": BPETokenizer.from_gpt2_files(*gpt2_files()),
        "word": WordTokenizer.from_text(text),
        "wordpiece": WordPieceTokenizer.from_corpus([text], 400),
        "hf": HFTokenizer(backend.to_str()),
    }


BYTE_LEVEL = ["bpe", "gpt2", "gpt2-files", "hf"]  # lossless: decode(encode(t)) gives t back


@pytest.mark.parametrize("name", ["bpe", "gpt2", "gpt2-files", "word", "wordpiece", "hf"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(ANY_TEXT, SURROGATE_TEXT))
def test_every_tokenizer_encodes_any_unicode(name, text, tokenizers):
    tok = tokenizers[name]
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.encode(text) == tok.encode(valid_unicode(text))  # the same as the repaired text
    if name in BYTE_LEVEL:
        assert tok.decode(ids) == valid_unicode(text)
        assert tok.decode(tok.encode_ordinary(text)) == valid_unicode(text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(ANY_TEXT, SURROGATE_TEXT))
def test_our_gpt2_bpe_equals_tiktoken_on_surrogates(text, tokenizers):
    ours, theirs = tokenizers["gpt2-files"], tokenizers["gpt2"]  # the latter is tiktoken itself
    assert ours.encode(text) == theirs.encode(text)
    assert ours.encode_ordinary(text) == theirs.encode_ordinary(text)
