"""A tokenizer as GGUF metadata: the `tokenizer.ggml.*` keys llama.cpp tokenizes with.

Every tokenizer llama.cpp can reproduce here is a byte-level BPE, which GGUF calls the
`"gpt2"` tokenizer model: a list of token strings (each byte written in GPT-2's printable
alphabet, so `b" the"` is `"Ġthe"`), a type per token (normal, control for a special token,
user-defined for a non-special added token, unused for padding), the merges in rank order as
`"left right"` strings, and a pre-tokenizer named by `tokenizer.ggml.pre`: llama.cpp does
not read a regex from the file, it has a fixed set of them by name, so a tokenizer whose
split regex is none of those (`PRE_TOKENIZERS`) cannot be represented and is refused.

Sources:
- our `BPETokenizer` (trained here, or GPT-2's from its files): its merges and its split
  pattern, which must be GPT-2's (`pre = "gpt-2"`);
- `GPT2Tokenizer` (GPT-2's own, tiktoken-backed): GPT-2's `encoder.json` / `vocab.bpe`;
- `HFTokenizer` (a Hugging Face `tokenizer.json`): a byte-level BPE model whose
  pre-tokenizer is GPT-2's byte-level split or a `Split` on one of the known regexes
  (Llama 3's, Qwen2/3's).

Word-level and WordPiece tokenizers, SentencePiece-style BPE (byte fallback, `▁` spaces)
and normalizers are refused in one line naming what llama.cpp lacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from ..tokenizer import BPETokenizer, GPT2Tokenizer, HFTokenizer
from ..tokenizer.bpe import GPT2_SPLIT_PATTERN, token_to_str
from ..tokenizer.byte_alphabet import read_gpt2_files
from ..tokenizer.gpt2 import gpt2_files

__all__ = ["GGUFVocab", "PRE_TOKENIZERS", "gguf_vocab", "NORMAL", "CONTROL", "USER_DEFINED", "UNUSED"]

# llama.cpp's token types (llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                        r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+")

PRE_TOKENIZERS = {
    GPT2_SPLIT_PATTERN: "gpt-2",
    LLAMA3_SPLIT_PATTERN: "llama-bpe",
    QWEN2_SPLIT_PATTERN: "qwen2",
}
"""split regex -> the name llama.cpp knows it by (`tokenizer.ggml.pre`)"""


@dataclass
class GGUFVocab:
    """What goes into the `tokenizer.ggml.*` keys."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    eos_id: int | None = None
    bos_id: int | None = None
    add_bos: bool = False
    specials: dict[str, int] = field(default_factory=dict)


def gguf_vocab(tokenizer, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of `tokenizer` for a model of `vocab_size` ids.

    Ids the model has beyond the tokenizer's (a vocabulary padded for speed) become unused
    `[PAD<id>]` tokens, as llama.cpp needs one token per row of the embedding.

    Raises:
        UserError: a tokenizer llama.cpp cannot represent, or one with more ids than the model.
    """
    if isinstance(tokenizer, BPETokenizer):
        vocab = _from_our_bpe(tokenizer)
    elif isinstance(tokenizer, GPT2Tokenizer):
        vocab = _from_gpt2_files()
    elif isinstance(tokenizer, HFTokenizer):
        vocab = _from_hf(tokenizer)
    else:
        raise UserError(f"a {tokenizer.name} tokenizer cannot be represented in GGUF (llama.cpp reads "
                        "byte-level BPE tokenizers only: ours, GPT-2's or a byte-level tokenizer.json)")
    if len(vocab.tokens) > vocab_size:
        raise UserError(f"the tokenizer has {len(vocab.tokens)} ids but the model only {vocab_size}; "
                        "llama.cpp needs an embedding row for every token")
    for i in range(len(vocab.tokens), vocab_size):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(UNUSED)
    return vocab


def _with_specials(tokens: dict[int, str], specials: dict[str, int], merges: list[str], pre: str,
                   user_defined: dict[str, int] | None = None) -> GGUFVocab:
    """Ids -> token strings (holes filled with unused padding), specials typed control."""
    everything = {**tokens, **{i: t for t, i in specials.items()}, **{i: t for t, i in (user_defined or {}).items()}}
    size = max(everything) + 1 if everything else 0
    out, types = [], []
    control, user = set(specials.values()), set((user_defined or {}).values())
    for i in range(size):
        if i not in everything:
            out.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        out.append(everything[i])
        types.append(CONTROL if i in control else USER_DEFINED if i in user else NORMAL)
    if len(set(out)) != len(out):
        seen: set[str] = set()
        dup = next(t for t in out if t in seen or seen.add(t))
        raise UserError(f"the tokenizer has the token {dup!r} twice; llama.cpp needs each token once")
    return GGUFVocab(pre=pre, tokens=out, types=types, merges=merges, specials=dict(specials))


def _from_our_bpe(tok: BPETokenizer) -> GGUFVocab:
    pre = PRE_TOKENIZERS.get(tok.pattern)
    if pre is None:
        raise UserError(f"this BPE tokenizer splits text with its own regex {tok.pattern!r}; llama.cpp has a "
                        "fixed set of pre-tokenizers (GPT-2's, Llama 3's, Qwen2's), so it cannot be represented")
    tokens = {i: token_to_str(b) for i, b in tok.vocab.items()}
    merges = [f"{token_to_str(tok.vocab[a])} {token_to_str(tok.vocab[b])}" for a, b in tok.merges]
    vocab = _with_specials(tokens, tok.special_tokens, merges, pre)
    eot = tok.special_tokens.get("<|endoftext|>")
    vocab.eos_id = vocab.bos_id = eot
    return vocab


def _from_gpt2_files() -> GGUFVocab:
    encoder, merge_pairs = read_gpt2_files(*gpt2_files())
    specials = {"<|endoftext|>": encoder["<|endoftext|>"]}
    tokens = {i: t for t, i in encoder.items() if t not in specials}
    vocab = _with_specials(tokens, specials, [f"{a} {b}" for a, b in merge_pairs], "gpt-2")
    vocab.eos_id = vocab.bos_id = specials["<|endoftext|>"]
    return vocab


def _hf_pattern(pre: dict | None) -> str | None:
    """The split regex of a byte-level `tokenizer.json` pre-tokenizer, or None if it is
    not a byte-level split llama.cpp could mirror."""
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "ByteLevel":
        return GPT2_SPLIT_PATTERN if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") != "Sequence":
        return None
    steps = pre.get("pretokenizers") or []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")):
        return (steps[0].get("pattern") or {}).get("Regex")
    return None


def _from_hf(tok: HFTokenizer) -> GGUFVocab:
    data = tok.definition
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(f"this tokenizer.json is a {model.get('type')} model"
                        f"{' with byte fallback' if model.get('byte_fallback') else ''}; the GGUF export "
                        "supports byte-level BPE tokenizer.json files only")
    if data.get("normalizer") is not None:
        raise UserError(f"this tokenizer.json normalizes text ({data['normalizer'].get('type')}), which "
                        "llama.cpp's BPE does not; it cannot be represented")
    pattern = _hf_pattern(data.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get(pattern) if pattern is not None else None
    if pre is None:
        raise UserError("this tokenizer.json's pre-tokenizer is none of those llama.cpp knows by name "
                        "(GPT-2's, Llama 3's or Qwen2's byte-level split), so it cannot be represented")
    tokens = {i: t for t, i in (model.get("vocab") or {}).items()}
    added = data.get("added_tokens") or []
    specials = {t["content"]: t["id"] for t in added if t.get("special")}
    user = {t["content"]: t["id"] for t in added if not t.get("special")}
    for t, i in list(specials.items()) + list(user.items()):
        tokens.pop(i, None)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    vocab = _with_specials(tokens, specials, merges, pre, user)
    if tok.eos_token is not None and tok.token_to_id(tok.eos_token) is not None:
        vocab.eos_id = tok.token_to_id(tok.eos_token)
    if tok.bos_token is not None and tok.token_to_id(tok.bos_token) is not None:
        vocab.bos_id = tok.token_to_id(tok.bos_token)
    # our encode never adds BOS; a post-processor that does (Llama 3's) says the model wants it
    post = data.get("post_processor") or {}
    steps = post.get("processors") or [post] if isinstance(post, dict) else []
    firsts = [(s.get("single") or [None])[0] for s in steps if isinstance(s, dict) and s.get("single")]
    vocab.add_bos = vocab.bos_id is not None and any(isinstance(f, dict) and "SpecialToken" in f for f in firsts)
    return vocab
