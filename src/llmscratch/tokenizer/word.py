"""A word-level tokenizer: the simple one the book builds before moving on to BPE.

Text is split on punctuation and whitespace, every distinct piece gets an id, and a word
never seen while building the vocabulary becomes `<|unk|>`. Unlike the book's version,
whitespace characters are kept as tokens, so `decode(encode(text)) == text` exactly for
any text made of known words.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

from ..errors import UserError
from .base import EOT, Tokenizer, valid_unicode

UNK = "<|unk|>"
"""Stands for any word that is not in the vocabulary."""

WORD_SPLIT_PATTERN = r"""([,.:;?_!"()']|--|\s)"""
"""Split on punctuation, the double dash and every single whitespace character; the
capturing group makes `re.split` keep the separators as tokens."""

_split = re.compile(WORD_SPLIT_PATTERN).split


def split_words(text: str) -> list[str]:
    """Split text into word, punctuation and whitespace tokens.

    Example: `"Hello, world."` -> `["Hello", ",", " ", "world", "."]`

    Args:
        text: the text.

    Returns:
        The non-empty pieces; `"".join(pieces) == text`.
    """
    # re.split yields empty strings between adjacent separators; they carry no text.
    return [piece for piece in _split(text) if piece]


class WordTokenizer(Tokenizer):
    """Word-level tokenizer with `<|unk|>` and `<|endoftext|>`.

    The vocabulary is the sorted unique pieces of the text it was built from, followed by
    `<|endoftext|>` and `<|unk|>` (the book's order).
    """

    type_name = "word"

    def __init__(self, vocab: Iterable[str] = ()) -> None:
        """Create a tokenizer from an explicit vocabulary (usually use `from_text`).

        Args:
            vocab: ordinary tokens in id order; the two special tokens are appended.
        """
        self._set_vocab(list(vocab))

    @classmethod
    def from_text(cls, text: str, vocab_size: int | None = None) -> WordTokenizer:
        """Build the vocabulary from `text`.

        Args:
            text: the text.
            vocab_size: optional cap on the number of ids (special tokens included); the
                most frequent pieces are kept. None keeps every piece.

        Returns:
            The tokenizer.
        """
        return cls().train(text, vocab_size)

    def _set_vocab(self, tokens: list[str]) -> None:
        """Install `tokens` (ids 0..n-1) plus the two special tokens after them."""
        if len(set(tokens)) != len(tokens):
            raise UserError("word vocabulary has duplicate tokens")
        tokens = [t for t in tokens if t not in (EOT, UNK)]
        self.int_to_str: list[str] = tokens + [EOT, UNK]
        self.str_to_int: dict[str, int] = {s: i for i, s in enumerate(self.int_to_str)}
        self.special_tokens = {EOT: self.str_to_int[EOT], UNK: self.str_to_int[UNK]}
        self.unk_id: int = self.str_to_int[UNK]
        # Ordinary text never maps to a special id: "<|endoftext|>" typed in text that is not
        # allowed to hold special tokens is an unknown word.
        self._ordinary = {s: i for s, i in self.str_to_int.items() if s not in self.special_tokens}

    def train(self, text: str, vocab_size: int | None = None, verbose: bool = False) -> WordTokenizer:
        """Build the vocabulary from `text` (replacing any previous one).

        Args:
            text: the text; `<|endoftext|>` in it is treated as the special token.
            vocab_size: optional cap on the number of ids, special tokens included.
            verbose: print the vocabulary size.

        Returns:
            self.
        """
        if not isinstance(text, str):
            raise UserError(f"train expects a str, got {type(text).__name__}")
        counts: Counter[str] = Counter()
        for part in text.split(EOT):
            counts.update(split_words(part))
        counts.pop(UNK, None)
        tokens = sorted(counts)
        if vocab_size is not None:
            if vocab_size < 3:
                raise UserError(f"vocab_size={vocab_size}: a word tokenizer needs at least 3 ids")
            if len(tokens) > vocab_size - 2:
                # Keep the most frequent pieces (ties by the piece itself, for determinism),
                # then sort them again so ids stay in alphabetical order.
                tokens = sorted(sorted(tokens, key=lambda t: (-counts[t], t))[: vocab_size - 2])
        self._set_vocab(tokens)
        if verbose:
            print(f"word tokenizer: {self.vocab_size} ids from {sum(counts.values())} pieces")
        return self

    @property
    def vocab_size(self) -> int:
        """Number of ids: the ordinary tokens plus `<|endoftext|>` and `<|unk|>`."""
        return len(self.int_to_str)

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode `text`; a piece that is not in the vocabulary becomes `<|unk|>`.

        Args:
            text: the text.

        Returns:
            The token ids.
        """
        get, unk = self._ordinary.get, self.unk_id
        return [get(piece, unk) for piece in split_words(valid_unicode(text))]

    def decode(self, ids: Iterable[int]) -> str:
        """Join the tokens of `ids` back into text (whitespace is kept as tokens).

        Args:
            ids: token ids.

        Returns:
            The text.
        """
        vocab, n = self.int_to_str, len(self.int_to_str)
        out = []
        for i in ids:
            # Check the range ourselves: a negative index would silently count from the end.
            try:
                ok = 0 <= i < n
                token = vocab[i] if ok else None
            except TypeError:
                ok = False
            if not ok:
                raise UserError(f"decode: token id {i!r} is not in this vocabulary of {n}")
            out.append(token)
        return "".join(out)

    def _to_dict(self) -> dict[str, Any]:
        return {"version": 1, "vocab": self.int_to_str[:-2], "special_tokens": self.special_tokens}

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> WordTokenizer:
        vocab = data["vocab"]
        if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
            raise UserError("\"vocab\" must be a list of strings")
        return cls(vocab)
