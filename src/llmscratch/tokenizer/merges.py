"""The BPE algorithm on token ids: counting pairs, merging a pair, the rule that numbers
merged tokens (`MergeVocab`), and learning merges from counted words (`learn_merges`).

`BPETokenizer` (bpe.py) puts these to work on text; they are here, apart, because they are
the part worth reading first: the whole of BPE training is in `learn_merges`.

Training counts the unique words once and then updates pair counts incrementally: merging
a pair only touches the words that contain it, and the next pair to merge comes off a heap.
That takes about a second for a 4,096-token vocabulary on 1 MB of text, where recounting
every pair after every merge (minbpe's way, simpler to read) takes many minutes.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Mapping, Sequence

__all__ = ["MergeVocab", "get_stats", "learn_merges", "merge"]


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
