"""Our tokenizers as Hugging Face `tokenizer.json` files, for folders other tools load.

`to_hf_tokenizer(tok)` describes one of our tokenizers in the `tokenizers` library's terms,
so `transformers.AutoTokenizer.from_pretrained(folder)` gives the same ids as ours:

- byte-level BPE (ours trained, or GPT-2's): our pre-tokenization regex as a `Split`
  (each match a piece), then the byte-to-printable mapping (`ByteLevel`, no regex of its
  own), then the merges in rank order over our vocabulary (printable form, ids ours);
  special tokens are added tokens with their ids.
- WordPiece: BERT's normaliser and pre-tokenizer with our casing, the `##` WordPiece model
  over our vocabulary, `[UNK]` for words it cannot cut, the five BERT specials as added
  tokens. No `[CLS]`/`[SEP]` post-processor: it gives the ids `encode` gives (a BERT folder
  carries its own `vocab.txt` instead, which transformers reads with BERT's template).

A word-level tokenizer has no such description here (None).

Example::

    hf = to_hf_tokenizer(BPETokenizer().train(text, 512), chat_template=jinja)
    hf.save_hf("export/")    # tokenizer.json + tokenizer_config.json
"""

from __future__ import annotations

from .base import EOT, Tokenizer
from .bpe import BPETokenizer
from .byte_alphabet import token_to_str
from .gpt2 import GPT2Tokenizer, gpt2_files
from .hf import HFTokenizer
from .wordpiece import MAX_WORD_CHARS, SEP, SPECIALS, UNK, WordPieceTokenizer

__all__ = ["to_hf_tokenizer"]


def _added(specials: dict[str, int]) -> list[dict]:
    return [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True} for text, i in sorted(specials.items(), key=lambda kv: kv[1])]


def _bpe_json(tok: BPETokenizer) -> dict:
    vocab = {token_to_str(b): i for i, b in tok.vocab.items()}
    merges = [[token_to_str(tok.vocab[a]), token_to_str(tok.vocab[b])] for a, b in tok.merges]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _added(tok.special_tokens),
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {**vocab, **tok.special_tokens}, "merges": merges},
    }


def _wordpiece_json(tok: WordPieceTokenizer) -> dict:
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _added({s: tok.vocab[s] for s in SPECIALS}),
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                       "strip_accents": None, "lowercase": tok.lowercase},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": None,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": UNK, "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": MAX_WORD_CHARS, "vocab": dict(tok.vocab)},
    }


def to_hf_tokenizer(tok: Tokenizer, chat_template: str | None = None) -> HFTokenizer | None:
    """`tok` as an `HFTokenizer` (whose `save_hf` writes `tokenizer.json` +
    `tokenizer_config.json`), with `chat_template` (Jinja) in its config; None for a
    tokenizer with no `tokenizers` equivalent here (word-level)."""
    if isinstance(tok, HFTokenizer):
        if chat_template is not None and not tok.chat_template:
            tok.chat_template = chat_template
        return tok
    if isinstance(tok, WordPieceTokenizer):
        return HFTokenizer(_wordpiece_json(tok), chat_template, eos_token=SEP)
    if isinstance(tok, GPT2Tokenizer):  # tiktoken's: the same BPE, rebuilt from GPT-2's files
        tok = BPETokenizer.from_gpt2_files(*gpt2_files())
    if not isinstance(tok, BPETokenizer):
        return None
    eos = EOT if EOT in tok.special_tokens else None
    return HFTokenizer(_bpe_json(tok), chat_template, eos_token=eos)
