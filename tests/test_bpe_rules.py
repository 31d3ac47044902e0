"""The one rule that numbers BPE merges (`MergeVocab.add`), and that every way of building a
BPE tokenizer — training, our tokenizer.json, GPT-2's encoder.json + vocab.bpe — follows it,
including the rare case where two different pairs spell the same bytes."""

from __future__ import annotations

import json

import pytest

from llmscratch.errors import UserError
from llmscratch.tokenizer import BPETokenizer, load_tokenizer
from llmscratch.tokenizer.bpe import BYTE_ENCODER, MergeVocab

A, B = ord("a"), ord("b")
# ("a","b") -> 256 "ab", ("a","a") -> 257 "aa", ("a","ab") -> 258 "aab", and ("aa","b") spells
# "aab" again: it must reuse 258, not make a 259.
MERGES = [(b"a", b"b"), (b"a", b"a"), (b"a", b"ab"), (b"aa", b"b")]
EXPECTED = {(A, B): 256, (A, A): 257, (A, 256): 258, (257, B): 258}


def test_merge_vocab_gives_new_bytes_the_next_id_and_known_bytes_their_id():
    v = MergeVocab()
    assert len(v) == 256 and v.tokens[A] == b"a" and v.ids[b"b"] == B
    assert v.add(b"ab") == 256
    assert v.add(b"aa") == 257
    assert v.add(b"aab") == 258
    assert v.add(b"aab") == 258 and len(v) == 259  # the same bytes: the same id, nothing added
    assert v.add(b"a") == A


def test_merge_vocab_follows_a_permuted_byte_order():
    order = list(reversed(range(256)))  # byte b has id 255 - b
    v = MergeVocab(order)
    assert v.ids[b"a"] == 255 - A and v.tokens[255 - A] == b"a"
    assert v.add(b"ab") == 256


def _tokenizer_json(path, merges, specials):
    """A tokenizer.json with `merges` (byte pairs) in GPT-2's printable form."""
    def printable(token: bytes) -> str:
        return "".join(BYTE_ENCODER[b] for b in token)

    data = {"type": "bpe", "version": 1, "vocab_size": 0, "pattern": r"\S+|\s+",
            "special_tokens": specials, "byte_tokens": "".join(BYTE_ENCODER[b] for b in range(256)),
            "merges": [f"{printable(a)} {printable(b)}" for a, b in merges]}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_tokenizer_json_replays_the_rule_with_a_reused_id(tmp_path):
    tok = load_tokenizer(_tokenizer_json(tmp_path / "t.json", MERGES, {"<|endoftext|>": 259}))
    assert tok.merges == EXPECTED
    assert tok.vocab_size == 260 and tok.vocab[258] == b"aab"
    assert tok.encode("aab") == [258]
    tok.save(tmp_path / "again.json")
    assert load_tokenizer(tmp_path / "again.json").merges == EXPECTED


def test_gpt2_files_replay_the_rule_with_a_reused_id(tmp_path):
    encoder = {BYTE_ENCODER[b]: b for b in range(256)}
    encoder.update({"ab": 256, "aa": 257, "aab": 258, "<|endoftext|>": 259})
    (tmp_path / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(
        f"{a.decode()} {b.decode()}" for a, b in MERGES) + "\n", encoding="utf-8")
    tok = BPETokenizer.from_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    assert tok.merges == EXPECTED
    assert tok.special_tokens == {"<|endoftext|>": 259}


def test_gpt2_files_that_number_against_the_rule_are_refused(tmp_path):
    encoder = {BYTE_ENCODER[b]: b for b in range(256)}
    encoder.update({"ab": 257, "aa": 256})  # the merges say "ab" is 256
    (tmp_path / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text("a b\na a\n", encoding="utf-8")
    with pytest.raises(UserError, match="disagree: token 'ab'"):
        BPETokenizer.from_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")


def test_a_merge_of_an_unknown_token_is_a_user_error(tmp_path):
    path = _tokenizer_json(tmp_path / "bad.json", [(b"a", b"bc")], {})
    with pytest.raises(UserError, match="'a' 'bc' uses a token not defined before it"):
        load_tokenizer(path)


def test_training_and_loading_agree_on_every_id(tmp_path):
    text = "aab ab aa aaab abab aabaab " * 20
    tok = BPETokenizer().train(text, vocab_size=270)
    tok.save(tmp_path / "t.json")
    loaded = load_tokenizer(tmp_path / "t.json")
    assert loaded.merges == tok.merges and loaded.vocab == tok.vocab
    assert loaded.special_tokens == tok.special_tokens == {"<|endoftext|>": len(tok.vocab)}
