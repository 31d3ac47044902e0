"""GPT-2's byte alphabet and its two BPE files.

GPT-2 writes every token as printable text: each byte maps to one visible character
(`bytes_to_unicode`), so a space is "Ġ" and a newline "Ċ". Its `encoder.json` (token ->
id) and `vocab.bpe` (the merges, in order) use that alphabet, and so do the merges in our
own `tokenizer.json`, which makes them readable and splittable on spaces.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError

__all__ = ["BYTE_DECODER", "BYTE_ENCODER", "bytes_to_unicode", "read_gpt2_files", "str_to_token", "token_to_str"]


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
