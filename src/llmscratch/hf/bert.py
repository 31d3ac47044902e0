"""BERT weights in Hugging Face's format, both ways.

A Hugging Face BERT folder (`BertForMaskedLM`, `BertModel` or
`BertForSequenceClassification`) holds `config.json` (`"model_type": "bert"`), the tensors
and usually `vocab.txt`. Converting to our `Bert` is a name map plus one fusion: BERT keeps
separate `query`, `key` and `value` projections, our attention (the GPT's, with
`causal=False`) has one fused `c_attn`, so the three are concatenated on the way in and
split on the way out. Older files name LayerNorm parameters `gamma`/`beta`; both are read.

Which parts a folder holds depends on its class: `BertForMaskedLM` has the MLM head but no
pooler, `BertModel` the pooler but no MLM head, `BertForSequenceClassification` the pooler
and a classifier. What a folder lacks keeps BERT's random init (and is named in the
returned `missing`), everything it has is checked for shape, and anything unknown is an
error. `save_hf_bert` writes the parts of the chosen class only, so `from_pretrained` loads
it without a missing/unexpected-weights warning.

The family (`BERT`, in `registry.HF_FAMILIES`, so `load_hf`, `save_hf`, `download` and
`convert` reach it): its folders carry their own tokenizer, the WordPiece `vocab.txt`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..errors import UserError
from ..models.bert import MODEL_TYPE, Bert, BertConfig
from .common import CONFIG_FILE, Checkpoint, HFFamily, find_weights_file, read_json, write_folder

__all__ = ["ARCHITECTURES", "BERT", "is_hf_bert_dir", "load_hf_bert", "save_hf_bert", "load_bert_tokenizer"]

ARCHITECTURES = ("BertForMaskedLM", "BertModel", "BertForSequenceClassification")

_LAYER = "encoder.layer.{i}."
_FIXED = {  # our name -> HF name under the "bert." prefix (or with no prefix: BertModel)
    "wte.weight": "embeddings.word_embeddings.weight",
    "wpe.weight": "embeddings.position_embeddings.weight",
    "wtt.weight": "embeddings.token_type_embeddings.weight",
    "ln_emb.weight": "embeddings.LayerNorm.weight",
    "ln_emb.bias": "embeddings.LayerNorm.bias",
    "pooler.weight": "pooler.dense.weight",
    "pooler.bias": "pooler.dense.bias",
}
_HEADS = {  # our name -> HF name outside the "bert." prefix
    "mlm.dense.weight": "cls.predictions.transform.dense.weight",
    "mlm.dense.bias": "cls.predictions.transform.dense.bias",
    "mlm.ln.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm.ln.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm.decoder.bias": "cls.predictions.bias",
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
}
_BLOCK = {  # h.{i}.<ours> -> encoder.layer.{i}.<HF>
    "attn.c_proj": "attention.output.dense",
    "ln_1": "attention.output.LayerNorm",
    "mlp.c_fc": "intermediate.dense",
    "mlp.c_proj": "output.dense",
    "ln_2": "output.LayerNorm",
}
_QKV = ("query", "key", "value")
_IGNORED = re.compile(r"(^|\.)(position_ids|cls\.predictions\.decoder\.(weight|bias)"
                      r"|cls\.seq_relationship\.(weight|bias))$")
"""buffers and tied copies in a file that carry nothing of their own (and BertForPreTraining's
next-sentence head, which no class here uses)"""


# ------------------------------------------------------------------------ names


def _hf_names(config: BertConfig, prefix: str) -> dict[str, str | tuple[str, str, str]]:
    """our parameter name -> HF key (a triple of keys for the fused c_attn)."""
    names: dict[str, str | tuple[str, str, str]] = {k: prefix + v for k, v in _FIXED.items()}
    names.update(_HEADS)
    for i in range(config.n_layer):
        base = prefix + _LAYER.format(i=i)
        for ours, theirs in _BLOCK.items():
            for p in ("weight", "bias"):
                names[f"h.{i}.{ours}.{p}"] = f"{base}{theirs}.{p}"
        for p in ("weight", "bias"):
            names[f"h.{i}.attn.c_attn.{p}"] = tuple(f"{base}attention.self.{q}.{p}" for q in _QKV)
    return names


def _canonical(key: str) -> str:
    """Old TF-converted files call LayerNorm's parameters gamma and beta."""
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))


# ------------------------------------------------------------------------ config


def _config_from_hf(hf: dict, source: Path) -> tuple[BertConfig, int]:
    """(our config, num_labels or 0) from a BertConfig dict."""
    if hf.get("model_type") != MODEL_TYPE:
        raise UserError(f"{source}: model_type is {hf.get('model_type')!r}, not 'bert'")
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise UserError(f"{source}: hidden_act {act!r} is not supported (BERT's exact 'gelu' only)")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{source}: position_embedding_type {hf['position_embedding_type']!r} is not "
                        "supported ('absolute' only)")
    try:
        config = BertConfig(
            vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", 512),
            n_embd=hf["hidden_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
            intermediate_size=hf.get("intermediate_size"), type_vocab_size=hf.get("type_vocab_size", 2),
            norm_eps=float(hf.get("layer_norm_eps", 1e-12)), pad_token_id=hf.get("pad_token_id", 0) or 0)
    except KeyError as e:
        raise UserError(f"{source}: config.json lacks {e.args[0]!r}") from None
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    archs = hf.get("architectures") or []
    num_labels = 0
    if "BertForSequenceClassification" in archs:
        num_labels = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))
    return config, num_labels


def _config_to_hf(model: Bert, architecture: str, labels: list[str] | None) -> dict:
    c = model.config
    hf = {
        "architectures": [architecture], "model_type": MODEL_TYPE, "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd, "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
        "intermediate_size": c.mlp_width, "hidden_act": "gelu", "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": c.dropout, "max_position_embeddings": c.context_length,
        "type_vocab_size": c.type_vocab_size, "layer_norm_eps": c.norm_eps,
        "pad_token_id": c.pad_token_id, "initializer_range": 0.02, "position_embedding_type": "absolute",
        "tie_word_embeddings": True, "dtype": str(model.wte.weight.dtype).removeprefix("torch."),
    }
    if architecture == "BertForSequenceClassification":
        n = model.classifier.out_features
        labels = labels or [f"LABEL_{i}" for i in range(n)]
        hf["id2label"] = {str(i): name for i, name in enumerate(labels)}
        hf["label2id"] = {name: i for i, name in enumerate(labels)}
    return hf


# ------------------------------------------------------------------------ load


def is_hf_bert_dir(path: str | os.PathLike) -> bool:
    """A folder with a `config.json` of `model_type` "bert" and a weights file. Never raises."""
    try:
        folder = Path(path)
        hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return isinstance(hf, dict) and hf.get("model_type") == MODEL_TYPE and find_weights_file(folder) is not None
    except (OSError, ValueError):
        return False


def load_hf_bert(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None) -> tuple[Bert, list[str]]:
    """A `Bert` from a Hugging Face BERT folder.

    Returns:
        `(model, missing)`: the model in eval mode (with a classifier if the folder is a
        `BertForSequenceClassification`) and our names of the parts the folder did not
        hold (e.g. the pooler of a `BertForMaskedLM`), which keep their random init.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    config, num_labels = _config_from_hf(read_json(folder / CONFIG_FILE), folder / CONFIG_FILE)
    ckpt, weights = Checkpoint.of(folder)
    keys = {_canonical(k): k for k in ckpt.keys()}
    prefix = "bert." if any(k.startswith("bert.") for k in keys) else ""
    model = Bert(config)
    if num_labels:
        model.add_classifier(num_labels)
    state = model.state_dict()
    used, missing = set(), []
    with torch.no_grad():
        for ours, theirs in _hf_names(config, prefix).items():
            if ours not in state:
                continue
            parts = theirs if isinstance(theirs, tuple) else (theirs,)
            if not all(p in keys for p in parts):
                missing.append(ours)
                continue
            tensor = torch.cat([ckpt.get(keys[p]) for p in parts], 0)
            if tensor.shape != state[ours].shape:
                raise UserError(f"{weights}: {'/'.join(parts)} has shape {tuple(tensor.shape)}, "
                                f"config.json needs {tuple(state[ours].shape)}")
            state[ours].copy_(tensor)
            used.update(parts)
    encoder_missing = [m for m in missing if not m.startswith(("mlm.", "pooler.", "classifier."))]
    if encoder_missing:
        raise UserError(f"{weights}: missing encoder weights {encoder_missing[:3]}"
                        f"{' ...' if len(encoder_missing) > 3 else ''}")
    unexpected = [k for k in keys if k not in used and not _IGNORED.search(k)]
    if unexpected:
        raise UserError(f"{weights}: unexpected tensors {sorted(unexpected)[:3]} (not a BERT this loader knows)")
    model.to(device=device, dtype=dtype)
    return model.eval(), missing


def load_bert_tokenizer(folder: str | os.PathLike):
    """The folder's `vocab.txt` as our `WordPieceTokenizer` (casing from its tokenizer config)."""
    from ..tokenizer.wordpiece import WordPieceTokenizer

    folder = Path(folder)
    if not (folder / "vocab.txt").is_file():
        raise UserError(f"{folder}: no vocab.txt beside the BERT weights")
    return WordPieceTokenizer.from_vocab_file(folder)


# ------------------------------------------------------------------------ save


def save_hf_bert(model: Bert, path: str | os.PathLike, architecture: str | None = None,
                 tokenizer=None, labels: list[str] | None = None) -> Path:
    """Write `model` as a Hugging Face folder of `architecture` (default: the sequence
    classifier if the model has a classifier, else `BertForMaskedLM`), with `vocab.txt`
    if a WordPiece tokenizer is given. Only the class's own parts are written."""
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, Bert):
        raise UserError(f"save_hf_bert needs a llmscratch Bert, got {type(model).__name__}")
    architecture = architecture or ("BertForSequenceClassification" if model.classifier is not None
                                    else "BertForMaskedLM")
    if architecture not in ARCHITECTURES:
        raise UserError(f"unknown BERT architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    if architecture == "BertForSequenceClassification" and model.classifier is None:
        raise UserError("this encoder has no classifier to save as BertForSequenceClassification")
    prefix = "" if architecture == "BertModel" else "bert."
    keep = {"BertModel": ("pooler.",), "BertForMaskedLM": ("mlm.",),
            "BertForSequenceClassification": ("pooler.", "classifier.")}[architecture]
    state = model.state_dict()
    tensors = {}
    for ours, theirs in _hf_names(model.config, prefix).items():
        if ours not in state or (ours.startswith(("mlm.", "pooler.", "classifier.")) and not ours.startswith(keep)):
            continue
        t = state[ours].detach().to("cpu")
        if isinstance(theirs, tuple):
            for name, part in zip(theirs, t.chunk(3, 0)):
                tensors[name] = part.contiguous()
        else:
            tensors[theirs] = t.contiguous()
    if tokenizer is not None and not hasattr(tokenizer, "save_vocab"):
        raise UserError(f"its {tokenizer.name} tokenizer is not WordPiece; a BERT folder needs a vocab.txt")
    folder = write_folder(path, tensors, _config_to_hf(model, architecture, labels))
    if tokenizer is not None:
        tokenizer.save_vocab(folder)
    return folder


# ------------------------------------------------------------------------ the family


def _load(path, *, dtype=None, device=None) -> Bert:
    """`load_hf`'s BERT reader: the model only (see `load_hf_bert` for what it lacked)."""
    return load_hf_bert(path, dtype=dtype, device=device)[0]


def _save(model: Bert, path, tokenizer=None, labels=None) -> Path:
    """`save_hf`'s BERT writer: the class the model's heads say, with its `vocab.txt`."""
    return save_hf_bert(model, path, tokenizer=tokenizer, labels=labels)


BERT = HFFamily(
    name="bert", model_types=(MODEL_TYPE,), load=_load, save=_save, claims=lambda model: isinstance(model, Bert),
    tokenizer=load_bert_tokenizer, tokenizer_files=("vocab.txt",))
