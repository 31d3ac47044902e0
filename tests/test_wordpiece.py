"""WordPiece: ids equal transformers' BertTokenizerFast on a vocab.txt the test trains;
vocab.txt validation; pairs and token types; truncation; save/load."""

from __future__ import annotations

import pytest

from llmscratch.errors import UserError
from llmscratch.tokenizer import WordPieceTokenizer, load_tokenizer
from llmscratch.tokenizer.wordpiece import basic_tokenize, read_vocab, train_vocab, wordpiece

MIXED = [
    "Hello, World! It's 3:45pm -- isn't it?",
    "Café déjà vu: naïve façade, Ångström, São Paulo, Zürich.",
    "東京は日本の首都です。北京欢迎你！",
    "I love pizza 🍕🍕 and 😀 emoji 👍🏽!",
    "Tabs\tand\nnewlines\r\nand\u00a0nbsp\u200b zero-width\u0007 bell",
    "Punctuation: (a) [b] {c} <d> «e» “f” — g… $100 ^_^ @user #tag",
    "UPPER lower MiXeD CaSe WORDS and unaffable unknowablewords",
    "The capital of France is [MASK].",
    "xyzzyplugh qwertyuiopasdf " + "a" * 120,
]


@pytest.fixture(scope="module")
def training_texts(docs_text):
    start = docs_text.index("The ")
    return [docs_text[start:start + 30_000], *MIXED[:6]]


@pytest.fixture(scope="module", params=[True, False], ids=["uncased", "cased"])
def vocab_dir(request, tmp_path_factory, training_texts):
    lowercase = request.param
    tok = WordPieceTokenizer.from_corpus(training_texts, 800, lowercase=lowercase)
    folder = tmp_path_factory.mktemp("uncased" if lowercase else "cased")
    tok.save_vocab(folder)
    return folder, lowercase


def test_ids_equal_bert_tokenizer_fast(vocab_dir):
    from transformers import BertTokenizerFast

    folder, lowercase = vocab_dir
    ours = WordPieceTokenizer.from_vocab_file(folder / "vocab.txt", lowercase=lowercase)
    theirs = BertTokenizerFast.from_pretrained(folder, do_lower_case=lowercase)
    assert theirs.backend_tokenizer.get_vocab_size() == ours.vocab_size
    unk_seen = False
    for text in MIXED:
        ids, types = ours.encode_input(text)
        expected = theirs(text)
        assert ids == expected["input_ids"], text
        assert types == expected["token_type_ids"]
        assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(expected["input_ids"])
        unk_seen |= ours.unk_id in ids
    assert unk_seen  # some text really exercised [UNK]
    # pairs: token types 0 then 1
    ids, types = ours.encode_input(MIXED[0], MIXED[1])
    expected = theirs(MIXED[0], MIXED[1])
    assert (ids, types) == (expected["input_ids"], expected["token_type_ids"])
    assert set(types) == {0, 1}


def test_casing_changes_the_words():
    assert basic_tokenize("Héllo, WORLD!") == ["hello", ",", "world", "!"]
    assert basic_tokenize("Héllo, WORLD!", lowercase=False) == ["Héllo", ",", "WORLD", "!"]
    assert basic_tokenize("東京abc") == ["東", "京", "abc"]
    assert basic_tokenize("a\u0000b\ufffdc\u0007d") == ["abcd"]


def test_greedy_longest_match_first():
    vocab = {t: i for i, t in enumerate(["[UNK]", "un", "##aff", "##able", "una", "##ff"])}
    # "una" is longer than "un", then "##ff", then "able" has no "##able"-compatible rest? it does
    assert wordpiece("unaffable", vocab) == ["una", "##ff", "##able"]
    assert wordpiece("unx", vocab) == ["[UNK]"]  # one failing remainder makes the whole word unknown
    assert wordpiece("u" * 101, {"u": 0, "##u": 1}) == ["[UNK]"]


def test_special_tokens_in_text_and_decode(vocab_dir):
    folder, lowercase = vocab_dir
    tok = WordPieceTokenizer.from_vocab_file(folder, lowercase=lowercase)
    ids = tok.encode("the [MASK] is")
    assert tok.mask_id in ids
    text = "The function returns a Value"  # capitals: an uncased vocabulary lowercases them
    assert tok.decode(tok.encode_input(text)[0]) == (text.lower() if lowercase else text)


def test_truncation_warns_longest_first(vocab_dir):
    folder, lowercase = vocab_dir
    tok = WordPieceTokenizer.from_vocab_file(folder, lowercase=lowercase)
    long_a, short_b = "the value " * 20, "the end"
    with pytest.warns(UserWarning, match="truncated to 16"):
        ids, types = tok.encode_input(long_a, short_b, max_length=16)
    assert len(ids) == len(types) == 16
    assert ids[-len(tok.encode(short_b)) - 1:-1] == tok.encode(short_b)  # the short text survives


def test_vocab_validation(tmp_path):
    good = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "##b"]
    (tmp_path / "ok.txt").write_text("\n".join(good) + "\n", encoding="utf-8")
    assert read_vocab(tmp_path / "ok.txt") == good
    (tmp_path / "dup.txt").write_text("\n".join(good + ["a"]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"'a' appears twice \(lines 6 and 8\)"):
        read_vocab(tmp_path / "dup.txt")
    (tmp_path / "nomask.txt").write_text("\n".join(good[:4] + good[5:]), encoding="utf-8")
    with pytest.raises(UserError, match=r"missing special token\(s\) \[MASK\]"):
        WordPieceTokenizer.from_vocab_file(tmp_path / "nomask.txt")
    with pytest.raises(UserError, match="vocab file not found"):
        read_vocab(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n".join(good[:3] + [""] + good[3:]), encoding="utf-8")
    with pytest.raises(UserError, match="line 4 is empty"):
        read_vocab(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("\n".join(good + ["caf\u00e9"]).encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.txt: not UTF-8 text"):
        read_vocab(tmp_path / "latin1.txt")


def test_bad_tokenizer_config_beside_vocab(tmp_path):
    good = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "A", "##b"]
    (tmp_path / "vocab.txt").write_text("\n".join(good) + "\n", encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": false,', encoding="utf-8")
    with pytest.raises(UserError, match=r"tokenizer_config\.json:1: malformed JSON"):
        WordPieceTokenizer.from_vocab_file(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[false]", encoding="utf-8")
    with pytest.raises(UserError, match=r"tokenizer_config\.json.*a JSON object"):
        WordPieceTokenizer.from_vocab_file(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": false}', encoding="utf-8")
    assert WordPieceTokenizer.from_vocab_file(tmp_path).lowercase is False


def test_save_load_json_round_trip(tmp_path, vocab_dir):
    folder, lowercase = vocab_dir
    tok = WordPieceTokenizer.from_vocab_file(folder, lowercase=lowercase)
    tok.save(tmp_path / "tokenizer.json")
    back = load_tokenizer(tmp_path)
    assert isinstance(back, WordPieceTokenizer) and back.lowercase == lowercase
    assert back.tokens == tok.tokens and back.encode(MIXED[1]) == tok.encode(MIXED[1])


def test_train_vocab_has_specials_first_and_word_starts():
    vocab = train_vocab(["low lower lowest newer newest wider"] * 5, 60)
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = WordPieceTokenizer(vocab)
    ids = tok.encode("lowest newest")
    starts = tok.word_starts(ids)
    assert starts[0] and sum(starts) == 2
    with pytest.raises(UserError, match="needs more than 5"):
        train_vocab(["a b"], 5)


def test_a_vocabulary_that_stops_short_says_its_real_size():
    from llmscratch.tokenizer import BPETokenizer

    text = "the cat sat on the mat. the cat sat."
    with pytest.warns(UserWarning, match=r"WordPiece vocabulary stopped at \d+ pieces of the 8,192 asked") as got:
        tok = WordPieceTokenizer.from_corpus([text], 8192)
    assert f"stopped at {tok.vocab_size:,} pieces" in str(got[0].message)
    with pytest.warns(UserWarning, match=r"BPE vocabulary stopped at \d+ tokens of the 8,192 asked") as got:
        bpe = BPETokenizer().train(text, 8192)
    assert f"stopped at {bpe.vocab_size:,} tokens" in str(got[0].message)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        WordPieceTokenizer.from_corpus([text], 12)  # reached: no warning
