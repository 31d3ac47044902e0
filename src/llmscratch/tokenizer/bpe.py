"""Byte-level byte-pair encoding (BPE), trained from scratch or loaded from GPT-2's files.

How it works: text is first cut into "words" by GPT-2's regex (letters, numbers,
punctuation and whitespace runs, each with at most one leading space), each word is
turned into its UTF-8 bytes (ids 0-255, so any text can be encoded), and then learned
merges join adjacent pairs of ids into new ids, most frequent pair first. Training finds
those merges; encoding replays them in the order they were learned.

Training counts the unique words once and then updates pair counts incrementally: merging
a pair only touches the words that contain it, and the next pair to merge comes off a heap.
That takes about a second for a 4,096-token vocabulary on 1 MB of text, where recounting
every pair after every merge (minbpe's way, simpler to read) takes many minutes.
"""

from __future__ import annotations

import heapq
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import regex

from ..errors import UserError
from .base import EOT, Tokenizer

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


# ---------------------------------------------------------------- pure helpers


def get_stats(
    ids: Sequence[int], counts: dict[tuple[int, int], int] | None = None
) -> dict[tuple[int, int], int]:
    """Count each adjacent pair of ids, adding to `counts` if given.

    Example: `[1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}`

    Args:
        ids: token ids.
        counts: an existing count dict to update in place.

    Returns:
        The pair -> count dict.
    """
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge(ids: Sequence[int], pair: tuple[int, int], idx: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids`, scanning left to right, by `idx`.

    Example: `ids=[1, 2, 3, 1, 2], pair=(1, 2), idx=4 -> [4, 3, 4]`;
    overlaps go to the left: `[5, 5, 5], (5, 5), 6 -> [6, 5]`.

    Args:
        ids: token ids.
        pair: the two adjacent ids to join.
        idx: the id that replaces them.

    Returns:
        A new list of ids.
    """
    out = []
    i, n = 0, len(ids)
    while i < n:
        if i < n - 1 and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(idx)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character.

    Printable Latin-1 bytes map to themselves; the other 68 (control characters, space,
    and a few more) map to characters from U+0100 on, in byte order, so a space becomes
    "Ġ" and a newline "Ċ". That is how GPT-2's `vocab.bpe` and `encoder.json` (and our
    saved merges) write byte tokens as readable text with no spaces in them.

    Returns:
        byte (0-255) -> one-character string.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


BYTE_ENCODER = bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}


def token_to_str(token: bytes) -> str:
    """Write token bytes in GPT-2's printable form, e.g. `b" the" -> "Ġthe"`."""
    return "".join(BYTE_ENCODER[b] for b in token)


def str_to_token(text: str) -> bytes:
    """Inverse of `token_to_str`, e.g. `"Ġthe" -> b" the"`.

    Raises:
        UserError: for a character outside GPT-2's byte alphabet.
    """
    try:
        return bytes(BYTE_DECODER[c] for c in text)
    except KeyError as e:
        raise UserError(f"token {text!r}: character {e.args[0]!r} is not in GPT-2's byte alphabet") from None


def read_gpt2_files(
    encoder_json: str | os.PathLike,
    vocab_bpe: str | os.PathLike,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Read GPT-2's two BPE files.

    Args:
        encoder_json: `encoder.json`, token (printable form) -> id.
        vocab_bpe: `vocab.bpe`, a `#version` line and then one merge per line,
            `"left right"`, in the order they were learned.

    Returns:
        (encoder, merges): the encoder dict and the list of (left, right) string pairs.

    Raises:
        UserError: a file is missing or malformed.
    """
    try:
        encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        lines = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read GPT-2 BPE files: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{encoder_json}: not valid JSON ({e})") from None
    if not isinstance(encoder, dict):
        raise UserError(f"{encoder_json}: expected a JSON object of token -> id")
    merges = []
    for lineno, line in enumerate(lines, start=1):
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise UserError(f"{vocab_bpe}, line {lineno}: expected two tokens separated by a space")
        merges.append((parts[0], parts[1]))
    return encoder, merges


# ---------------------------------------------------------------- the id rule


class MergeVocab:
    """Token bytes <-> ids for the byte tokens and the merged tokens, grown by the one rule
    every BPE here follows (training, GPT-2's files, our tokenizer.json): a merge whose
    joined bytes are new gets the next id, `len(vocab)`; a merge whose joined bytes are
    already a token (two pairs, like ("a", "ab") and ("aa", "b"), can spell the same bytes)
    reuses that token's id, as Hugging Face's trainer does, so no two ids share their bytes.

    Attributes:
        tokens: id -> bytes.
        ids: bytes -> id.
    """

    def __init__(self, byte_ids: Sequence[int] = range(256)) -> None:
        """The 256 byte tokens; `byte_ids[b]` is the id of byte `b` (GPT-2 numbers them in
        its own order, a trained tokenizer in byte order)."""
        self.tokens: dict[int, bytes] = {i: bytes([b]) for b, i in enumerate(byte_ids)}
        self.ids: dict[bytes, int] = {t: i for i, t in self.tokens.items()}

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: bytes) -> int:
        """The id of `token`, giving it the next id if it is new."""
        i = self.ids.get(token)
        if i is None:
            i = len(self.tokens)
            self.tokens[i] = token
            self.ids[token] = i
        return i


# ---------------------------------------------------------------- training


def learn_merges(
    word_counts: Mapping[bytes, int], n_tokens: int, verbose: bool = False
) -> list[tuple[int, int]]:
    """Learn BPE merges from counted words until there are `n_tokens` ordinary tokens.

    Ids 0-255 are the bytes; each merge gets its id by `MergeVocab.add` (the next id, or
    the id of a token with the same bytes).

    The most frequent pair wins; ties go to the pair whose joined bytes sort first, then to
    the smaller ids, so training is deterministic. Example: on "aaabdaaabac" the merges are
    (97, 97) -> 256 "aa", (256, 97) -> 257 "aaa" (tied with "ab" at 2, but "aaa" < "ab"),
    (257, 98) -> 258 "aaab".

    Args:
        word_counts: each unique pre-tokenized word as UTF-8 bytes -> how often it occurs.
        n_tokens: stop when the vocabulary has this many tokens (or no pair is left).
        verbose: print each merge.

    Returns:
        The merges, (left id, right id), in the order learned.
    """
    known = MergeVocab()
    vocab = known.tokens  # id -> bytes

    # Each unique word once, as a mutable list of ids, with its count. A word of one byte
    # has no pair and can never change, so it is left out.
    words: list[list[int]] = []
    counts: list[int] = []
    pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
    # pair -> indices of the words that contain it. Entries go stale when a merge removes
    # the pair from a word; the merge loop simply finds no occurrence there, which is
    # cheaper than keeping the sets exact.
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for word, n in word_counts.items():
        if len(word) < 2:
            continue
        ids = list(word)
        wi = len(words)
        words.append(ids)
        counts.append(n)
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += n
            where[pair].add(wi)

    # Max-heap of (-count, joined bytes, pair) with lazy invalidation: an entry can be
    # stale (the count has dropped since it was pushed). A popped entry whose count no
    # longer matches is pushed back with the current count. Every count increase is pushed
    # right away, so the first popped entry that matches really is the maximum.
    heap = [(-n, vocab[a] + vocab[b], (a, b)) for (a, b), n in pair_counts.items()]
    heapq.heapify(heap)
    push, pop = heapq.heappush, heapq.heappop

    merges: list[tuple[int, int]] = []
    merged: set[tuple[int, int]] = set()
    while len(vocab) < n_tokens and heap:
        neg_count, token, pair = pop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg_count:
            if count > 0:
                push(heap, (-count, token, pair))
            continue

        a, b = pair
        new = known.add(token)
        # With id reuse a merged pair can, very rarely, form again later; record it once.
        if pair not in merged:
            merged.add(pair)
            merges.append(pair)
        if verbose:
            print(f"merge {len(merges)}: {pair} -> {new} {token!r} had {count} occurrences")

        # Replace (a, b) by `new` in every word that holds it. For each occurrence the
        # pairs with its neighbours change: (prev, a) -> (prev, new), (b, next) -> (new, next).
        # Using the already-updated word for `prev` makes runs like "a b a b" come out right.
        grown: set[tuple[int, int]] = set()
        for wi in where.pop(pair, ()):
            w = words[wi]
            n = counts[wi]
            i = 0
            while True:
                try:
                    i = w.index(a, i)
                except ValueError:
                    break
                if i + 1 == len(w):
                    break
                if w[i + 1] != b:
                    i += 1
                    continue
                if i:
                    prev = w[i - 1]
                    pair_counts[prev, a] -= n
                    p = (prev, new)
                    pair_counts[p] += n
                    where[p].add(wi)
                    grown.add(p)
                if i + 2 < len(w):
                    nxt = w[i + 2]
                    pair_counts[b, nxt] -= n
                    p = (new, nxt)
                    pair_counts[p] += n
                    where[p].add(wi)
                    grown.add(p)
                w[i : i + 2] = (new,)
                i += 1
        del pair_counts[pair]
        for p in grown:
            n = pair_counts[p]
            if n > 0:
                push(heap, (-n, vocab[p[0]] + vocab[p[1]], p))
    return merges


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
