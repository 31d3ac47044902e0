"""Tokenizers: text <-> token ids.

- `WordTokenizer`: word-level, built from a text, `<|unk|>` for unseen words.
- `BPETokenizer`: byte-level BPE you can train, or GPT-2's exactly from its files.
- `GPT2Tokenizer`: GPT-2's BPE at tiktoken speed (what `get_tokenizer("gpt2")` returns).

Example:
    >>> tok = get_tokenizer("gpt2")
    >>> tok.encode("Hello world<|endoftext|>")
    [15496, 995, 50256]
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError
from .base import EOT, Tokenizer
from .bpe import BPETokenizer
from .gpt2 import GPT2Tokenizer
from .hf import HFTokenizer, is_hf_tokenizer_file
from .word import WordTokenizer
from .wordpiece import WordPieceTokenizer

__all__ = [
    "Tokenizer",
    "WordTokenizer",
    "WordPieceTokenizer",
    "BPETokenizer",
    "GPT2Tokenizer",
    "HFTokenizer",
    "build_tokenizer",
    "get_tokenizer",
    "load_tokenizer",
]

TOKENIZER_FILE = "tokenizer.json"
"""The file name a run folder stores its tokenizer under."""


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer saved by any of our tokenizers' `save`.

    Args:
        path: the JSON file (its `"type"` field, `"gpt2"`, `"bpe"` or `"word"`, picks the
            class), or a folder holding `tokenizer.json`.

    Returns:
        The tokenizer.

    Raises:
        UserError: missing or malformed file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if _is_hf_file(path):  # a Hugging Face tokenizer.json (no "type"): its folder has the rest
        return HFTokenizer.from_folder(path.parent)
    return Tokenizer.load(path)


def _is_hf_file(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # Tokenizer.load says what is wrong with it
    return isinstance(data, dict) and is_hf_tokenizer_file(data)


def get_tokenizer(name_or_path: str | os.PathLike) -> Tokenizer:
    """A tokenizer by name, or loaded from a saved file.

    Args:
        name_or_path: `"gpt2"`, or the path of a file written by a tokenizer's `save`
            (or a run folder holding `tokenizer.json`).

    Returns:
        The tokenizer.

    Raises:
        UserError: an unknown name, or a path that does not hold a tokenizer.
    """
    if isinstance(name_or_path, str) and name_or_path.strip().lower() in ("gpt2", "gpt-2"):
        return GPT2Tokenizer()
    path = Path(name_or_path)
    if path.is_file() or (path.is_dir() and (path / TOKENIZER_FILE).is_file()):
        return load_tokenizer(path)
    # "word" and "bpe" are kinds, not ready-made tokenizers: say how to make one.
    how = {
        "word": "WordTokenizer.from_text(text)",
        "bpe": "BPETokenizer().train(text, vocab_size)",
    }.get(str(name_or_path).strip().lower())
    hint = f"; build a {name_or_path} tokenizer with {how}, save it, and pass its path" if how else ""
    raise UserError(
        f"unknown tokenizer {str(name_or_path)!r}: valid choices are 'gpt2' or the path of a "
        f"saved tokenizer JSON file (or a folder holding {TOKENIZER_FILE}){hint}"
    )


def build_tokenizer(spec: str, texts) -> Tokenizer:
    """A tokenizer from a `--tokenizer` spec: a byte-level BPE trained on `texts`
    (`bpe:VOCAB`), an uncased WordPiece trained on them (`wordpiece:VOCAB`, BERT's kind),
    `gpt2`, or a saved tokenizer file (see `get_tokenizer`).

    Args:
        spec: the spec.
        texts: an iterable of strings to train on (read only for `bpe:` and `wordpiece:`).

    Raises:
        UserError: a malformed spec or a vocabulary too small.
    """
    kind, _, size = str(spec).partition(":")
    if kind in ("bpe", "wordpiece") and ":" in str(spec):
        try:
            vocab = int(size)
        except ValueError:
            raise UserError(f"--tokenizer {spec!r}: expected {kind}:VOCAB_SIZE, e.g. {kind}:4096") from None
        if kind == "bpe":
            if vocab < 257:
                raise UserError(f"--tokenizer {spec}: a byte-level BPE needs a vocabulary of at least 257")
            return BPETokenizer().train("\n\n".join(texts), vocab, special_tokens=(EOT,))
        return WordPieceTokenizer.from_corpus(texts, vocab)
    return get_tokenizer(spec)
