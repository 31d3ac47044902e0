"""`repeats:CORPUS`: a corpus mixed with synthetic text whose spans repeat (an induction-head curriculum).

A model learns to copy from its prompt (in-context learning's simplest form) when its
training text rewards it: a span it cannot predict the first time, because it is random,
and can the second time, because it is right there in the context. Natural text has few
such spans, so a small model trained briefly on it never learns the trick (the `copy` task
stays at chance). This module mixes a corpus with documents made of them:

- each synthetic document is a run of **episodes**, one a line: a span of 2 to 10 words
  drawn at random from the corpus's own vocabulary and joined by one separator (a space,
  `_`, `, `, `.` or `-`), then 0 to 20 random filler words, then the same span again;
- two documents in three are instead the classic form: a block of 20 to 60 random words
  (joined by spaces, or one in three times by another separator), then the same block
  once or twice again, a line each: most of the tokens can be predicted only by copying.

The words are the corpus's most frequent identifiers, so the synthetic text speaks the
corpus's vocabulary and the tokenizer trained on the mix splits both alike. Nothing in it is
an evaluation task's text: a span is random words, never a `name = "..."` assignment.

The spec is `repeats:CORPUS` or `repeats:OPTIONS:CORPUS` with OPTIONS `key=value` pairs
joined by commas: `share` (the synthetic share of the mixed text's characters, default 0.5,
in (0, 1)) and `seed` (default 0). The same spec gives the same text on every machine.
CORPUS is anything `load_text` reads (a dataset name, a file, a folder).

Example:
    >>> opts, base = parse_repeats_spec("repeats:share=0.3,seed=7:python-docs")
    >>> opts, base
    ({'share': 0.3, 'seed': 7}, 'python-docs')
"""

from __future__ import annotations

import random
import re
from collections import Counter

from ..errors import UserError

__all__ = ["PREFIX", "SEPARATORS", "is_repeats_spec", "mix_repeats", "parse_repeats_spec", "repeat_documents",
           "vocabulary"]

PREFIX = "repeats:"
SEPARATORS = (" ", "_", ", ", ".", "-")
DEFAULTS = {"share": 0.5, "seed": 0}
WORD = re.compile(r"[A-Za-z][A-Za-z0-9]{1,15}")
CHUNK_CHARS = 4000
"""a single-document corpus is cut at blank lines into pieces of about this size, so the
synthetic documents can go between them (and both kinds reach the validation tail)"""


def is_repeats_spec(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse_repeats_spec(spec: str) -> tuple[dict, str]:
    """`({"share", "seed"}, CORPUS)` from `repeats:[OPTIONS:]CORPUS`; a `UserError` names
    what is wrong with a bad one."""
    rest = spec[len(PREFIX):]
    opts = dict(DEFAULTS)
    head, sep, tail = rest.partition(":")
    if sep and "=" in head and re.fullmatch(r"\w+=[^,:=]+(,\w+=[^,:=]+)*", head):
        rest = tail
        for pair in head.split(","):
            key, value = pair.split("=")
            if key not in DEFAULTS:
                raise UserError(f"--data {spec}: unknown option {key!r} (repeats takes share and seed)")
            try:
                opts[key] = float(value) if key == "share" else int(value)
            except ValueError:
                raise UserError(f"--data {spec}: {key} must be {'a number' if key == 'share' else 'an integer'}, "
                                f"got {value!r}") from None
    if not 0 < opts["share"] < 1:
        raise UserError(f"--data {spec}: share must be between 0 and 1 (the synthetic part of the text), "
                        f"got {opts['share']}")
    if not rest:
        raise UserError(f"--data {spec}: no corpus after {PREFIX!r} (e.g. repeats:python-docs)")
    return opts, rest


def vocabulary(texts: list[str], size: int = 4096) -> list[str]:
    """The `size` most frequent words (letters and digits, 2 to 16 characters) of `texts`,
    ties in alphabetical order, so the list is the same on every machine."""
    counts = Counter(w for t in texts for w in WORD.findall(t))
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


def _episode(rng: random.Random, words: list[str]) -> str:
    span = rng.choice(SEPARATORS).join(rng.choices(words, k=rng.randint(2, 10)))
    filler = " ".join(rng.choices(words, k=rng.randint(0, 20)))
    return f"{span} {filler} {span}" if filler else f"{span} {span}"


def repeat_documents(words: list[str], n_chars: int, seed: int = 0, doc_chars: int = 1000) -> list[str]:
    """Synthetic documents of about `doc_chars` characters each, `n_chars` in all, whose
    spans repeat (see the module docstring); a pure function of its arguments."""
    if len(words) < 2:
        raise UserError(f"repeats: the corpus has {len(words)} distinct word(s); the synthetic spans need at least 2")
    rng = random.Random(seed)
    docs: list[str] = []
    total = 0
    while total < n_chars:
        if rng.random() < 2 / 3:
            sep = " " if rng.random() < 2 / 3 else rng.choice(SEPARATORS[1:])
            block = sep.join(rng.choices(words, k=rng.randint(20, 60)))
            doc = "\n".join([block] * rng.randint(2, 3))
        else:
            lines: list[str] = []
            while sum(len(line) + 1 for line in lines) < doc_chars:
                lines.append(_episode(rng, words))
            doc = "\n".join(lines)
        docs.append(doc)
        total += len(doc)
    return docs


def _pieces(texts: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A one-document corpus cut at blank lines into pieces of about `CHUNK_CHARS`."""
    if len(texts) != 1:
        return texts
    name, text = texts[0]
    pieces, current = [], ""
    for para in re.split(r"(?<=\n\n)", text):
        current += para
        if len(current) >= CHUNK_CHARS:
            pieces.append(current)
            current = ""
    if current:
        pieces.append(current)
    return [(f"{name}:{k}", p) for k, p in enumerate(pieces)]


def mix_repeats(texts: list[tuple[str, str]], share: float = 0.5, seed: int = 0) -> list[tuple[str, str]]:
    """`(name, text)` documents: the corpus's (cut into pieces if it is one) with synthetic
    ones spread evenly between them, `share` of all the characters synthetic."""
    base = _pieces(texts)
    n_base = sum(len(t) for _, t in base)
    if n_base == 0:
        raise UserError("repeats: the corpus is empty")
    words = vocabulary([t for _, t in base])
    synthetic = repeat_documents(words, int(n_base * share / (1 - share)), seed)
    out: list[tuple[str, str]] = []
    k = 0
    for i, doc in enumerate(base):
        out.append(doc)
        upto = (i + 1) * len(synthetic) // len(base)
        while k < upto:
            out.append((f"repeats:{k}", synthetic[k]))
            k += 1
    return out
