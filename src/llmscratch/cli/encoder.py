"""`llmscratch fill-mask` and `llmscratch embed`: the encoder's commands (`encoder_tasks`)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import UserError
from .args import ModelArgs, add_command, add_config_flags, config_from_args


@dataclass(kw_only=True)
class FillMaskArgs(ModelArgs):
    """Settings of `llmscratch fill-mask`."""

    model: str
    """an encoder: a run folder of `pretrain --model bert-tiny` (or another bert-* preset), or a
    Hugging Face BERT folder (`download bert-base-uncased`)"""
    top_k: int = 5
    """fillings shown for each [MASK]"""


@dataclass(kw_only=True)
class EmbedArgs(ModelArgs):
    """Settings of `llmscratch embed`."""

    model: str
    """an encoder: a run folder of `pretrain --model bert-tiny` (or another bert-* preset), or a
    Hugging Face BERT folder (`download bert-base-uncased`)"""
    file: str | None = None
    """a file with one text per line (besides any texts given as arguments)"""
    pooling: Literal["mean", "cls"] = "mean"
    """mean of the tokens' hidden states, or the [CLS] position's"""
    normalize: bool = True
    """L2-normalise each vector (dot product = cosine similarity)"""
    out: str | None = None
    """write JSON lines here instead of stdout"""


def _load_encoder(cfg):
    import torch

    from ..checkpoints.run import load_model
    from ..utils import pick_device

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "int8": "int8"}.get(cfg.dtype)
    return load_model(cfg.model, device=pick_device(cfg.device), dtype=dtype, kernels=cfg.kernels)


def cmd_fill_mask(args) -> None:
    """Print the most likely tokens for each [MASK] in the text, with their probabilities."""
    from ..decoding.encoder import fill_mask

    cfg = config_from_args(FillMaskArgs, args)
    model, tokenizer = _load_encoder(cfg)
    model.kind.require("fill-mask", "fill-mask")
    results = fill_mask(model, tokenizer, args.text, cfg.top_k)
    for n, fillings in enumerate(results, 1):
        if len(results) > 1:
            print(f"[MASK] {n}:")
        for token, p in fillings:
            print(f"{p:.4f}\t{token}")


def cmd_embed(args) -> None:
    """Print one JSON line per text: {"text": ..., "embedding": [...]} (sentence embeddings
    of an encoder)."""
    from ..decoding.encoder import embed_texts

    cfg = config_from_args(EmbedArgs, args)
    texts = list(args.text)
    if cfg.file:
        try:
            texts += [t for t in Path(cfg.file).read_text(encoding="utf-8").splitlines() if t.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--file {cfg.file}: cannot read ({e.__class__.__name__})") from None
    if not texts:
        raise UserError("give a text to embed, or --file FILE with one text per line")
    model, tokenizer = _load_encoder(cfg)
    model.kind.require("embed", "embed")
    vectors = embed_texts(model, tokenizer, texts, cfg.pooling, cfg.normalize)
    lines = "".join(json.dumps({"text": t, "embedding": [round(x, 6) for x in v.tolist()]}) + "\n"
                    for t, v in zip(texts, vectors))
    if cfg.out:
        from ..utils import atomic_write

        with atomic_write(cfg.out, encoding="utf-8") as f:
            f.write(lines)
        print(f"{len(texts)} embeddings of {vectors.shape[1]} dimensions -> {cfg.out}", file=sys.stderr)
    else:
        sys.stdout.write(lines)


def register(sub) -> None:
    """Add `fill-mask` and `embed` to the CLI's subparsers."""
    p = add_command(sub, "fill-mask", cmd_fill_mask, "an encoder's top fillings for [MASK]", [
        'llmscratch fill-mask --model runs/bert "The capital of France is [MASK]."',
        'llmscratch fill-mask --model checkpoints/bert-base-uncased --top-k 10 "Paris is the [MASK] of France."',
    ])
    add_config_flags(p, FillMaskArgs)
    p.add_argument("text", help="text with one or more [MASK] tokens")
    p = add_command(sub, "embed", cmd_embed, "sentence embeddings from an encoder", [
        'llmscratch embed --model runs/bert "first sentence" "second sentence"',
        "llmscratch embed --model checkpoints/bert-base-uncased --file sentences.txt --out vectors.jsonl",
    ])
    add_config_flags(p, EmbedArgs)
    p.add_argument("text", nargs="*", help="text(s) to embed")


def encoder_info(name: str, model) -> None:
    """`llmscratch info` for an encoder: its config, parameters, memory and FLOPs."""
    cfg = model.config
    n = model.num_params()
    print(f"model        {name}")
    print("kind         encoder (BERT): masked-LM head tied to the token embedding, pooler"
          + (f", classifier of {model.classifier.out_features} labels" if model.classifier is not None else ""))
    for field, value in cfg.to_dict().items():
        print(f"  {field:18s} {value}" + (f" (the MLP width {cfg.mlp_width})" if field == "intermediate_size"
                                          and not value else ""))
    print(f"parameters   {n:,}")
    print(f"  without embeddings: {model.num_params(include_embeddings=False):,}")
    print(f"memory       fp32 {n * 4 / 2**20:,.1f} MB   bf16 {n * 2 / 2**20:,.1f} MB")
    print(f"training     {model.flops_per_token() / 1e9:.3g} GFLOP per token at context {cfg.context_length} "
          "(at most: the MLM head runs on the masked tokens only)")
