"""The `Tokenizer` base class every tokenizer shares (the minbpe layout).

A tokenizer turns text into a list of integer ids and back. Subclasses fill in how
(`WordTokenizer`, `BPETokenizer`, `GPT2Tokenizer`); this class holds what they share:
special-token handling in `encode`, and saving/loading one JSON file whose `"type"`
field says which subclass wrote it.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable
from typing import Any, ClassVar

from ..errors import UserError
from ..utils import read_json, write_json

EOT = "<|endoftext|>"
"""The end-of-text token that separates documents (GPT-2's id 50256)."""

AllowedSpecial = str | Collection[str]
"""`"all"`, `"none"`, or the set of special tokens to recognise in the text."""


def valid_unicode(text: str) -> str:
    """`text` as valid Unicode, by tiktoken's rule: a Python string can hold surrogate code
    points (U+D800-U+DFFF) that UTF-8 cannot encode; a high+low pair becomes the character it
    stands for and a lone surrogate becomes U+FFFD. Every tokenizer applies this before
    encoding, so `"\\ud800"` encodes like `"\\ufffd"` everywhere instead of raising."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class Tokenizer(ABC):
    """Base class: `train`, `encode`, `decode`, `save`, `load`.

    Subclasses set `type_name` (the `"type"` written by `save`), keep `special_tokens`
    (text -> id) up to date, and implement `encode_ordinary`, `decode`, `vocab_size`,
    `train`, `_to_dict` and `_from_dict`.
    """

    type_name: ClassVar[str] = ""
    special_tokens: dict[str, int]

    # Every concrete subclass registers itself here, so `Tokenizer.load` can dispatch on
    # the "type" field of a saved file without a hand-written table.
    _registry: ClassVar[dict[str, type[Tokenizer]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.type_name:
            Tokenizer._registry[cls.type_name] = cls

    # ---------------------------------------------------------------- properties

    @property
    def name(self) -> str:
        """A short name for the kind of tokenizer: `"word"`, `"bpe"` or `"gpt2"`."""
        return self.type_name

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (ordinary + special): every id is in `range(vocab_size)`."""

    @property
    def eot_id(self) -> int:
        """The id of `<|endoftext|>`.

        Raises:
            UserError: if this tokenizer has no `<|endoftext|>` token.
        """
        try:
            return self.special_tokens[EOT]
        except KeyError:
            raise UserError(f"this {self.name} tokenizer has no {EOT} token") from None

    # ---------------------------------------------------------------- training

    @abstractmethod
    def train(self, text: str, vocab_size: int, verbose: bool = False) -> Tokenizer:
        """Learn the vocabulary from `text`.

        Args:
            text: the training text.
            vocab_size: the number of ids wanted, special tokens included.
            verbose: print progress.

        Returns:
            self, so `tok = BPETokenizer().train(text, 4096)` works.
        """

    # ---------------------------------------------------------------- encode / decode

    @abstractmethod
    def encode_ordinary(self, text: str) -> list[int]:
        """Encode `text`, treating special tokens such as `<|endoftext|>` as plain text.

        Args:
            text: the text to encode.

        Returns:
            The token ids.
        """

    def encode(self, text: str, allowed_special: AllowedSpecial = "all") -> list[int]:
        """Encode `text` into token ids.

        Args:
            text: the text to encode.
            allowed_special: which special tokens written in the text become their special
                id: `"all"` (default), `"none"` (or an empty set: all are encoded as
                ordinary text), or a set of special-token strings. Special tokens not
                allowed are encoded as ordinary text.

        Returns:
            The token ids, e.g. `"hi<|endoftext|>"` -> `[..., eot_id]`.
        """
        if not isinstance(text, str):
            raise UserError(f"encode expects a str, got {type(text).__name__}")
        specials = self._allowed_specials(allowed_special)
        # Cheap test first: most texts contain no special token at all.
        if not specials or not any(s in text for s in specials):
            return self.encode_ordinary(text)
        # Longest first, so a special token that is a prefix of another cannot win.
        alternatives = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
        ids: list[int] = []
        # With a capturing group, re.split puts the matched special tokens at odd indices.
        for i, part in enumerate(re.split(f"({alternatives})", text)):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def encode_batch(
        self, texts: Iterable[str], allowed_special: AllowedSpecial = "all"
    ) -> list[list[int]]:
        """Encode several texts.

        Args:
            texts: the texts.
            allowed_special: as in `encode`.

        Returns:
            One list of ids for each text.
        """
        return [self.encode(t, allowed_special=allowed_special) for t in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Turn token ids back into text.

        Args:
            ids: token ids, each in `range(vocab_size)`.

        Returns:
            The text. Byte-level tokenizers replace invalid UTF-8 (from a cut-off
            sequence of ids) with U+FFFD instead of failing.

        Raises:
            UserError: for an id that is not in the vocabulary.
        """

    def _allowed_specials(self, allowed_special: AllowedSpecial) -> set[str]:
        """Resolve `allowed_special` to a set of this tokenizer's special tokens."""
        if isinstance(allowed_special, str):
            if allowed_special == "all":
                return set(self.special_tokens)
            if allowed_special == "none":
                return set()
            raise UserError(
                f"allowed_special={allowed_special!r}: use 'all', 'none' or a set of special tokens"
            )
        allowed = set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise UserError(
                f"allowed_special: {sorted(unknown)} not special tokens of this tokenizer "
                f"(it has {sorted(self.special_tokens)})"
            )
        return allowed

    # ---------------------------------------------------------------- save / load

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer to one JSON file (atomically).

        Args:
            path: the file to write, e.g. `run/tokenizer.json`.
        """
        write_json(path, {"type": self.type_name, **self._to_dict()})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a tokenizer written by `save`.

        Called on `Tokenizer` it returns whichever kind the file holds; called on a
        subclass it also checks the file holds that kind.

        Args:
            path: a JSON file written by `save`.

        Returns:
            The tokenizer.

        Raises:
            UserError: the file is missing, not JSON, or not a tokenizer of this kind.
        """
        data = read_tokenizer_file(path)
        kind = data.get("type")
        klass = Tokenizer._registry.get(kind) if isinstance(kind, str) else None
        if klass is None:
            raise UserError(
                f"{path}: unknown tokenizer type {kind!r}; expected one of "
                f"{sorted(Tokenizer._registry)}"
            )
        if not issubclass(klass, cls):
            raise UserError(f"{path}: holds a {kind!r} tokenizer, not a {cls.type_name!r} one")
        try:
            return klass._from_dict(data)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise UserError(f"{path}: malformed {kind} tokenizer file ({type(e).__name__}: {e})") from None

    @abstractmethod
    def _to_dict(self) -> dict[str, Any]:
        """The JSON-ready state `save` writes (without the `"type"` field)."""

    @classmethod
    @abstractmethod
    def _from_dict(cls, data: dict[str, Any]) -> Tokenizer:
        """Rebuild a tokenizer from what `_to_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def read_tokenizer_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a saved tokenizer's JSON object, turning every failure into a UserError.

    Args:
        path: the JSON file.

    Returns:
        The decoded JSON object (a dict with a `"type"` field).
    """
    data = read_json(path, expect=None)
    if not isinstance(data, dict) or "type" not in data:
        raise UserError(f"{path}: not a tokenizer file (no \"type\" field)")
    return data
