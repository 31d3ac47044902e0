"""Byte-level byte-pair encoding (BPE), trained from scratch or loaded from GPT-2's files.

How it works: text is first cut into "words" by GPT-2's regex (letters, numbers,
punctuation and whitespace runs, each with at most one leading space), each word is
turned into its UTF-8 bytes (ids 0-255, so any text can be encoded), and then learned
merges join adjacent pairs of ids into new ids, most frequent pair first. Training finds
those merges; encoding replays them in the order they were learned.

The algorithm on ids (pair counts, merging, the id rule, training) is in `merges.py`;
GPT-2's printable byte alphabet and its files in `byte_alphabet.py`. Their names are
importable from here too.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import regex

from ..errors import UserError
from .base import EOT, Tokenizer, valid_unicode
from .byte_alphabet import (
    BYTE_DECODER,
    BYTE_ENCODER,
    bytes_to_unicode,
    read_gpt2_files,
    str_to_token,
    token_to_str,
)
from .merges import MergeVocab, get_stats, learn_merges, merge

__all__ = ["BPETokenizer", "GPT2_SPLIT_PATTERN", "BYTE_DECODER", "BYTE_ENCODER", "MergeVocab", "bytes_to_unicode",
           "get_stats", "learn_merges", "merge", "read_gpt2_files", "str_to_token", "token_to_str"]

GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
"""GPT-2's pre-tokenization regex: contractions, letter runs, number runs, other symbols
(each optionally led by one space), then whitespace. `\\s+(?!\\S)` leaves the last space of
a whitespace run to start the next word, so " the" stays one piece."""

_CACHE_LIMIT = 1 << 16
"""Encoded words kept in a tokenizer's cache. Real text repeats a few thousand words
over and over, so this holds nearly all hits; when full the cache is simply emptied,
which is cheaper than the bookkeeping of a true LRU."""


# ---------------------------------------------------------------- the tokenizer


class BPETokenizer(Tokenizer):
    """Byte-level BPE with a regex pre-split, trainable, or GPT-2's exactly.

    Attributes:
        pattern: the pre-tokenization regex (GPT-2's by default).
        merges: (left id, right id) -> new id, in the order learned (the merge rank).
        vocab: id -> bytes of every ordinary token.
        special_tokens: special token text -> id (after the ordinary ids).
    """

    type_name = "bpe"

    def __init__(self, pattern: str | None = None) -> None:
        """An untrained tokenizer: 256 byte tokens and no merges yet.

        Args:
            pattern: pre-tokenization regex (`regex` module syntax); GPT-2's if None.
        """
        self.pattern = GPT2_SPLIT_PATTERN if pattern is None else pattern
        try:
            self._compiled = regex.compile(self.pattern)
        except regex.error as e:
            raise UserError(f"invalid tokenizer pattern {self.pattern!r}: {e}") from None
        self._set_state(list(range(256)), [], {})

    def _set_state(
        self,
        byte_ids: Sequence[int],
        merges: Iterable[tuple[int, int] | tuple[bytes, bytes]],
        special_tokens: Mapping[str, int],
    ) -> None:
        """Install a vocabulary and the lookup tables derived from it.

        Args:
            byte_ids: the id of each byte 0-255: a permutation of 0-255 (identity for a
                trained tokenizer, GPT-2's own order for its files).
            merges: the merges in rank order, as (left, right) ids (as `learn_merges`
                gives them) or bytes (as files store them); each joined token gets its id
                by `MergeVocab.add`, the rule that numbered the ids in the first place.
            special_tokens: text -> id.
        """
        if sorted(byte_ids) != list(range(256)):
            raise UserError("the 256 byte tokens must have the ids 0-255")
        self.byte_ids = list(byte_ids)
        # bytes.translate maps each byte to its id in C; ids fit in a byte by the check above.
        self._byte_table = bytes(self.byte_ids)
        vocab = MergeVocab(self.byte_ids)
        self.merges: dict[tuple[int, int], int] = {}
        for left, right in merges:
            if isinstance(left, int):
                if left not in vocab.tokens or right not in vocab.tokens:
                    raise UserError(f"merge {(left, right)} uses an id that is not defined before it")
                left, right = vocab.tokens[left], vocab.tokens[right]
            elif left not in vocab.ids or right not in vocab.ids:
                raise UserError(f"merge {token_to_str(left)!r} {token_to_str(right)!r} uses a token "
                                "not defined before it")
            self.merges.setdefault((vocab.ids[left], vocab.ids[right]), vocab.add(left + right))
        self.vocab: dict[int, bytes] = vocab.tokens
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._set_special_tokens(special_tokens)

    def _set_special_tokens(self, special_tokens: Mapping[str, int]) -> None:
        """Install the special tokens (text -> id), which must not reuse an ordinary id."""
        for text, i in special_tokens.items():
            if not isinstance(text, str) or not text:
                raise UserError(f"special token {text!r} must be a non-empty string")
            if not isinstance(i, int) or i in self.vocab:
                raise UserError(f"special token {text!r} has id {i!r}, already taken")
        if len(set(special_tokens.values())) != len(special_tokens):
            raise UserError("two special tokens share an id")
        self.special_tokens = dict(special_tokens)
        self._decoder = {**self.vocab, **{i: t.encode("utf-8") for t, i in self.special_tokens.items()}}
        self._cache: dict[str, list[int]] = {}

    # ---------------------------------------------------------------- training

    def train(
        self,
        text: str,
        vocab_size: int,
        special_tokens: Sequence[str] = (EOT,),
        verbose: bool = False,
    ) -> BPETokenizer:
        """Learn merges from `text` (replacing any previous vocabulary; the pattern stays).

        Args:
            text: the training text. Special tokens written in it are cut out first, so
                no merge ever spans or spells one.
            vocab_size: the number of ids wanted, special tokens included: 256 byte
                tokens + merges + specials. Fewer if the text runs out of pairs.
            special_tokens: special tokens, given the last ids in this order.
            verbose: print each merge.

        Returns:
            self.
        """
        if not isinstance(text, str):
            raise UserError(f"train expects a str, got {type(text).__name__}")
        specials = list(special_tokens)
        if isinstance(special_tokens, str) or len(set(specials)) != len(specials):
            raise UserError(f"special_tokens={special_tokens!r}: give a sequence of distinct strings")
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
            raise UserError(
                f"vocab_size={vocab_size!r}: must be at least 256 byte tokens + {len(specials)} special"
            )

        # Pre-tokenize once and count: the merge loop then works on the unique words.
        pieces: Counter[str] = Counter()
        for chunk in _split_out(text, specials):
            pieces.update(self._compiled.findall(chunk))
        word_counts = {piece.encode("utf-8"): n for piece, n in pieces.items()}

        merge_pairs = learn_merges(word_counts, vocab_size - len(specials), verbose=verbose)
        # Special tokens take the ids right after the ordinary ones; how many ordinary ids
        # there are is known once the merges are replayed (a reused id adds none).
        self._set_state(range(256), merge_pairs, {})
        n_ordinary = len(self.vocab)
        self._set_special_tokens({s: n_ordinary + k for k, s in enumerate(specials)})
        if verbose:
            print(f"trained BPE: {len(self.merges)} merges, vocab_size {self.vocab_size}")
        if self.vocab_size < vocab_size:
            warnings.warn(f"the BPE vocabulary stopped at {self.vocab_size:,} tokens of the {vocab_size:,} asked: "
                          "no pair of tokens is left to merge in the text (more text gives a larger one)",
                          stacklevel=2)
        return self

    # ---------------------------------------------------------------- encode / decode

    @property
    def vocab_size(self) -> int:
        """Number of ids: byte tokens + merged tokens + special tokens."""
        return len(self._decoder)

    def _encode_word(self, word: str) -> list[int]:
        """Encode one pre-tokenized word: its bytes, then the merges in rank order."""
        ids = list(word.encode("utf-8").translate(self._byte_table))
        ranks, merges = self._ranks, self.merges
        while len(ids) >= 2:
            # The adjacent pair learned earliest merges first, all its occurrences at once
            # (GPT-2's original `bpe` does the same).
            pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            ids = merge(ids, pair, merges[pair])
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode `text`, treating special tokens as plain text.

        Args:
            text: the text.

        Returns:
            The token ids.
        """
        if not isinstance(text, str):
            raise UserError(f"encode expects a str, got {type(text).__name__}")
        text = valid_unicode(text)
        cache = self._cache
        ids: list[int] = []
        for word in self._compiled.findall(text):
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = self._encode_word(word)
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[word] = word_ids
            ids.extend(word_ids)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of `ids` (useful when streaming: a character may span tokens).

        Args:
            ids: token ids.

        Returns:
            The concatenated token bytes.
        """
        decoder = self._decoder
        try:
            return b"".join([decoder[i] for i in ids])
        except KeyError as e:
            raise UserError(
                f"decode: token id {e.args[0]!r} is not in this vocabulary of {self.vocab_size}"
            ) from None
        except TypeError:
            raise UserError("decode: token ids must be integers") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Turn ids back into text; invalid UTF-8 (a cut-off character) becomes U+FFFD.

        Args:
            ids: token ids.

        Returns:
            The text.
        """
        return self.decode_bytes(list(ids)).decode("utf-8", errors="replace")

    # ---------------------------------------------------------------- GPT-2's files

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> BPETokenizer:
        """GPT-2's tokenizer rebuilt from its `encoder.json` and `vocab.bpe`.

        `encode` then gives exactly tiktoken's "gpt2" ids (`<|endoftext|>` = 50256), in
        pure Python. `get_tokenizer("gpt2")` is the fast version of the same thing.

        Args:
            encoder_json: path of `encoder.json` (token -> id).
            vocab_bpe: path of `vocab.bpe` (the merges in order).

        Returns:
            The tokenizer.

        Raises:
            UserError: the files are missing, malformed, or disagree with each other.
        """
        encoder, merge_strs = read_gpt2_files(encoder_json, vocab_bpe)
        try:
            byte_ids = [encoder[BYTE_ENCODER[b]] for b in range(256)]
        except KeyError as e:
            raise UserError(f"{encoder_json}: byte token {e.args[0]!r} is missing") from None
        tok = cls()
        try:
            tok._set_state(byte_ids, [(str_to_token(a), str_to_token(b)) for a, b in merge_strs], {})
        except UserError as e:
            raise UserError(f"{vocab_bpe}: {e}") from None
        # Every ordinary token's id we derived from the merge order must be the id
        # encoder.json gives; what encoder.json has beyond them are the special tokens.
        derived = {token_to_str(t): i for i, t in tok.vocab.items()}
        for text, i in derived.items():
            if encoder.get(text) != i:
                raise UserError(
                    f"{encoder_json} and {vocab_bpe} disagree: token {text!r} has id "
                    f"{encoder.get(text)!r}, the merges give {i}"
                )
        tok._set_special_tokens({t: i for t, i in encoder.items() if t not in derived})
        return tok

    # ---------------------------------------------------------------- save / load

    def _to_dict(self) -> dict[str, Any]:
        # Merges and byte tokens are written in GPT-2's printable form ("Ġthe" for b" the"),
        # which has no spaces, so "left right" splits unambiguously, as in vocab.bpe.
        inverse = {i: b for b, i in enumerate(self.byte_ids)}
        return {
            "version": 1,
            "vocab_size": self.vocab_size,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            # The byte token of id 0, 1, ..., 255 (identity unless loaded from GPT-2).
            "byte_tokens": "".join(BYTE_ENCODER[inverse[i]] for i in range(256)),
            "merges": [
                f"{token_to_str(self.vocab[a])} {token_to_str(self.vocab[b])}" for a, b in self.merges
            ],
        }

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> BPETokenizer:
        tok = cls(data["pattern"])
        byte_tokens = data["byte_tokens"]
        if not isinstance(byte_tokens, str) or len(byte_tokens) != 256:
            raise UserError("\"byte_tokens\" must be a string of 256 characters")
        byte_ids = [0] * 256
        for i, c in enumerate(byte_tokens):
            byte_ids[str_to_token(c)[0]] = i
        merges = []
        for k, line in enumerate(data["merges"]):
            parts = line.split(" ")
            if len(parts) != 2:
                raise UserError(f"merges[{k}] = {line!r}: expected two tokens separated by a space")
            merges.append(tuple(str_to_token(p) for p in parts))
        tok._set_state(byte_ids, merges, data["special_tokens"])
        return tok


def _split_out(text: str, specials: Sequence[str]) -> list[str]:
    """Cut the special tokens out of `text`, returning the pieces between them."""
    if not specials:
        return [text]
    pattern = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
    return regex.split(pattern, text)
