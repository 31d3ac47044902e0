"""BERT's WordPiece tokenizer, from scratch: basic tokenization, then greedy WordPiece.

Two stages, as in BERT:

1. **Basic tokenization** (`basic_tokenize`): drop NUL, U+FFFD and control characters and
   turn every whitespace character into a space; put spaces around CJK ideographs (each
   becomes a word of its own); for an uncased vocabulary, strip accents (NFD, then drop the
   combining marks) and lower-case; split on whitespace and around every punctuation
   character (ASCII symbols count as punctuation too, e.g. `$` and `^`).
2. **WordPiece** (`wordpiece`): each word is cut greedily into the longest vocabulary
   entries from the left; pieces after the first carry the `##` prefix. A word with no
   such cut (or longer than 100 characters) becomes `[UNK]` as a whole.

Ids equal `transformers`' `BertTokenizerFast` on the same `vocab.txt`
(`tests/test_wordpiece.py`). `encode_input` adds `[CLS] ... [SEP] (... [SEP])` and the
token-type ids of a single text or a pair.

Training a vocabulary (`train_vocab`) is from scratch too. Google never published the
algorithm that built BERT's vocabulary; like `tokenizers`' WordPiece trainer, this one
merges the most frequent adjacent pieces (BPE on words, pieces after the first written
with `##`). It is written here rather than taken from `tokenizers` because that trainer
breaks ties between equally frequent pairs in hash order, so the same corpus gave a
different vocabulary on each run, and a pretraining run must be reproducible from its
seed.
"""

from __future__ import annotations

import os
import unicodedata
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..utils import read_json, read_text
from .base import Tokenizer, valid_unicode

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIALS = (PAD, UNK, CLS, SEP, MASK)
"""The five special tokens every BERT vocabulary holds."""

MAX_WORD_CHARS = 100
"""Words longer than this become `[UNK]` without trying WordPiece (BERT's limit)."""


# ------------------------------------------------------------------ character classes


def _is_whitespace(ch: str) -> bool:
    """Unicode White_Space (what BERT's normaliser maps to a space)."""
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs" or ch in "\u2028\u2029"


def _is_control(ch: str) -> bool:
    """Control and format characters ("C*" categories), except tab and newlines."""
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    """Unicode punctuation, plus every non-alphanumeric printable ASCII character."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    """A CJK Unified Ideograph (the blocks BERT splits one character per word)."""
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


# ------------------------------------------------------------------ basic tokenization


def normalize(text: str, lowercase: bool = True) -> str:
    """Clean the text, space out CJK ideographs and (uncased) strip accents and lower-case."""
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        if _is_whitespace(ch):
            out.append(" ")
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    text = "".join(out)
    if lowercase:
        # accents first, then case (BERT's order): "É" -> "E" + U+0301 -> "E" -> "e"
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        text = text.lower()
    return text


def basic_tokenize(text: str, lowercase: bool = True) -> list[str]:
    """BERT's words: normalised text split on whitespace and around each punctuation mark.

    Example: `basic_tokenize("Héllo, WORLD!")` -> `["hello", ",", "world", "!"]`.
    """
    words: list[str] = []
    for chunk in normalize(text, lowercase).split():
        start = 0
        for i, ch in enumerate(chunk):
            if _is_punctuation(ch):
                if i > start:
                    words.append(chunk[start:i])
                words.append(ch)
                start = i + 1
        if start < len(chunk):
            words.append(chunk[start:])
    return words


def wordpiece(word: str, vocab: dict[str, int], unk: str = UNK) -> list[str]:
    """Greedy longest-match-first WordPiece of one word: `"unaffable"` -> `["un", "##aff",
    "##able"]`; `[unk]` if some remainder starts no vocabulary entry."""
    if len(word) > MAX_WORD_CHARS:
        return [unk]
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:  # shrink from the right until the piece is in the vocabulary
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                break
            end -= 1
        if end == start:  # not even one character matched: the whole word is unknown
            return [unk]
        pieces.append(piece)
        start = end
    return pieces


# ------------------------------------------------------------------ vocab.txt


def read_vocab(path: str | os.PathLike) -> list[str]:
    """The tokens of a `vocab.txt` (one per line, the line number is the id), validated:
    no duplicates, no empty lines, all five special tokens present."""
    if not Path(path).exists():
        raise UserError(f"{path}: vocab file not found")
    lines = read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    tokens = [line.rstrip("\r") for line in lines]
    validate_vocab(tokens, str(path))
    return tokens


def validate_vocab(tokens: list[str], where: str = "vocabulary") -> None:
    """UserError on an empty token, a duplicate, or a missing special token."""
    seen: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok == "" or tok.strip() != tok:
            raise UserError(f"{where}: line {i + 1} is empty or has surrounding whitespace")
        if tok in seen:
            raise UserError(f"{where}: token {tok!r} appears twice (lines {seen[tok] + 1} and {i + 1})")
        seen[tok] = i
    missing = [s for s in SPECIALS if s not in seen]
    if missing:
        raise UserError(f"{where}: missing special token(s) {', '.join(missing)} (a BERT vocabulary "
                        f"needs {', '.join(SPECIALS)})")


# ------------------------------------------------------------------ the tokenizer


class WordPieceTokenizer(Tokenizer):
    """BERT's tokenizer: `encode` gives the WordPiece ids of a text (special tokens written
    in it, such as `[MASK]`, become their ids); `encode_input` adds `[CLS]`/`[SEP]` and
    token types for a model input."""

    type_name = "wordpiece"

    def __init__(self, vocab: Iterable[str], lowercase: bool = True):
        """Args:
            vocab: the tokens in id order (a `vocab.txt`'s lines); validated.
            lowercase: an uncased vocabulary (lower-case and strip accents before WordPiece).
        """
        tokens = list(vocab)
        validate_vocab(tokens)
        self.tokens = tokens
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.lowercase = bool(lowercase)
        self.special_tokens = {s: self.vocab[s] for s in SPECIALS}

    # ---------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def eot_id(self) -> int:
        """`[SEP]`: what separates documents in a pretraining stream (GPT's `<|endoftext|>`)."""
        return self.vocab[SEP]

    @property
    def pad_id(self) -> int:
        return self.vocab[PAD]

    @property
    def unk_id(self) -> int:
        return self.vocab[UNK]

    @property
    def cls_id(self) -> int:
        return self.vocab[CLS]

    @property
    def sep_id(self) -> int:
        return self.vocab[SEP]

    @property
    def mask_id(self) -> int:
        return self.vocab[MASK]

    # ---------------------------------------------------------------- encode / decode

    def tokenize(self, text: str) -> list[str]:
        """The WordPiece strings of `text` (no special tokens recognised)."""
        return [p for w in basic_tokenize(valid_unicode(text), self.lowercase) for p in wordpiece(w, self.vocab)]

    def encode_ordinary(self, text: str) -> list[int]:
        return [self.vocab[p] for p in self.tokenize(text)]

    def word_starts(self, ids: Iterable[int]) -> list[bool]:
        """For each id, whether it starts a word (is not a `##` continuation piece): the
        unit of whole-word masking."""
        return [not self.tokens[i].startswith("##") for i in ids]

    def encode_input(self, text: str, pair: str | None = None, max_length: int | None = None,
                     ) -> tuple[list[int], list[int]]:
        """A model input: `[CLS] text [SEP]` (type 0), then `pair [SEP]` (type 1) if given.

        Args:
            text, pair: the text(s); special tokens written in them are recognised.
            max_length: if the input is longer, it is truncated (the longer of the two
                texts first, as `transformers`' "longest_first") with a warning.

        Returns:
            `(input_ids, token_type_ids)`.
        """
        a = self.encode(text)
        b = self.encode(pair) if pair is not None else None
        n_special = 3 if b is not None else 2
        if max_length is not None:
            excess = len(a) + (len(b) if b is not None else 0) + n_special - max_length
            if excess > 0:
                if max_length < n_special + (2 if b is not None else 1):
                    raise UserError(f"max_length {max_length} leaves no room for text")
                warnings.warn(f"input of {excess + max_length} tokens truncated to {max_length}",
                              stacklevel=2)
                for _ in range(excess):
                    if b is not None and len(b) > len(a):
                        b.pop()
                    else:
                        a.pop()
        ids = [self.cls_id, *a, self.sep_id]
        types = [0] * len(ids)
        if b is not None:
            ids += [*b, self.sep_id]
            types += [1] * (len(b) + 1)
        return ids, types

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.tokens):
                raise UserError(f"token id {i} is not in the vocabulary (size {len(self.tokens)})")
            out.append(self.tokens[i])
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Pieces joined back into words (`##` continuations glued on), special tokens
        dropped unless `skip_special=False`. Lower-casing and accents are not undone."""
        toks = self.convert_ids_to_tokens(ids)
        if skip_special:
            toks = [t for t in toks if t not in (PAD, CLS, SEP)]
        return " ".join(toks).replace(" ##", "")

    # ---------------------------------------------------------------- training

    def train(self, text: str, vocab_size: int, verbose: bool = False) -> WordPieceTokenizer:
        """Learn a new vocabulary of `vocab_size` entries from `text` (`train_vocab`),
        keeping this tokenizer's casing."""
        self.__init__(train_vocab([text], vocab_size, self.lowercase, verbose), self.lowercase)
        return self

    @classmethod
    def from_corpus(cls, texts: Iterable[str], vocab_size: int, lowercase: bool = True) -> WordPieceTokenizer:
        """A tokenizer whose vocabulary is trained on `texts`."""
        return cls(train_vocab(texts, vocab_size, lowercase), lowercase)

    # ---------------------------------------------------------------- files

    @classmethod
    def from_vocab_file(cls, path: str | os.PathLike, lowercase: bool | None = None) -> WordPieceTokenizer:
        """Load a `vocab.txt` (or a folder holding one). `lowercase` None reads
        `do_lower_case` from a `tokenizer_config.json` beside it, default True (uncased)."""
        path = Path(path)
        if path.is_dir():
            path = path / "vocab.txt"
        if lowercase is None:
            lowercase = True
            conf = path.parent / "tokenizer_config.json"
            if conf.is_file():
                lowercase = bool(read_json(conf).get("do_lower_case", True))
        return cls(read_vocab(path), lowercase)

    def save_vocab(self, folder: str | os.PathLike) -> Path:
        """Write `vocab.txt` and a `tokenizer_config.json` (what `BertTokenizerFast.
        from_pretrained` reads) into `folder`."""
        from ..utils import atomic_write, write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(folder / "vocab.txt", encoding="utf-8", newline="\n") as f:
            f.write("".join(t + "\n" for t in self.tokens))
        write_json(folder / "tokenizer_config.json",
                   {"tokenizer_class": "BertTokenizer", "do_lower_case": self.lowercase,
                    "strip_accents": None, "tokenize_chinese_chars": True, "model_max_length": 512,
                    **{f"{n}_token": s for n, s in zip(("pad", "unk", "cls", "sep", "mask"), SPECIALS)}})
        return folder / "vocab.txt"

    def _to_dict(self) -> dict[str, Any]:
        return {"lowercase": self.lowercase, "vocab": self.tokens}

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> WordPieceTokenizer:
        return cls(data["vocab"], bool(data["lowercase"]))


def train_vocab(texts: Iterable[str], vocab_size: int, lowercase: bool = True,
                verbose: bool = False) -> list[str]:
    """A WordPiece vocabulary learned from `texts`: the five specials, the characters
    (word-initial `c` and continuation `##c`), then pieces made by merging, again and again,
    the adjacent pair of pieces that is most frequent in the corpus' words (ties broken by
    the pieces' text, so the same corpus always gives the same vocabulary). Stops at
    `vocab_size` entries or when no pair occurs twice.

    Pair counts are kept up to date incrementally (only the words holding the merged pair
    are recounted) and the best pair comes from a heap with lazy deletion, so a vocabulary
    of thousands trains in seconds on a few MB.
    """
    import heapq
    from collections import Counter, defaultdict

    if vocab_size < len(SPECIALS) + 1:
        raise UserError(f"a WordPiece vocabulary needs more than {len(SPECIALS)} entries, got {vocab_size}")
    counts = Counter(w for t in texts for w in basic_tokenize(t, lowercase) if len(w) <= MAX_WORD_CHARS)
    words = [[w[0], *("##" + c for c in w[1:])] for w in counts]
    freqs = list(counts.values())
    symbol_freq: Counter = Counter()
    for syms, f in zip(words, freqs):
        for s_ in syms:
            symbol_freq[s_] += f
    alphabet = sorted(symbol_freq, key=lambda s_: (-symbol_freq[s_], s_))[:vocab_size - len(SPECIALS)]
    vocab = [*SPECIALS, *sorted(alphabet)]
    known = set(vocab)
    pair_count: dict[tuple[str, str], int] = defaultdict(int)
    holders: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, (syms, f) in enumerate(zip(words, freqs)):
        for pair in zip(syms, syms[1:]):
            pair_count[pair] += f
            holders[pair].add(i)
    heap = [(-c, a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        negc, a, b = heapq.heappop(heap)
        if pair_count.get((a, b), 0) != -negc:
            continue  # stale entry: the count changed since it was pushed
        if -negc < 2:
            break
        merged = a + b[2:]  # b is always a "##" continuation
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
        changed = set()
        for i in holders.pop((a, b)):
            syms, f = words[i], freqs[i]
            for pair in zip(syms, syms[1:]):
                pair_count[pair] -= f
                changed.add(pair)
            out, j = [], 0
            while j < len(syms):
                if j + 1 < len(syms) and syms[j] == a and syms[j + 1] == b:
                    out.append(merged)
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            words[i] = out
            for pair in zip(out, out[1:]):
                pair_count[pair] += f
                holders[pair].add(i)
                changed.add(pair)
        for pair in changed:
            c = pair_count[pair]
            if c > 0:
                heapq.heappush(heap, (-c, *pair))
            else:
                del pair_count[pair]
        if verbose and len(vocab) % 1000 == 0:
            print(f"wordpiece vocabulary: {len(vocab)} / {vocab_size}")
    if len(vocab) < vocab_size:
        warnings.warn(f"the WordPiece vocabulary stopped at {len(vocab):,} pieces of the {vocab_size:,} asked: "
                      "no pair of pieces occurs twice more in the text (more text gives a larger one)",
                      stacklevel=2)
    return vocab
