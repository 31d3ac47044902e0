"""BERT checkpoints and the Hub: what `download` fetches for one, and `convert` both ways.

`hub.download_model("bert-base-uncased")` fetches `HUB_FILES` (weights, the WordPiece
`vocab.txt`, the casing in `tokenizer_config.json`) and load-checks them with
`weights_bert.load_hf_bert`; `hub.convert` hands an encoder folder to `convert_encoder`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .run import is_run_dir, load_model, save_model
from ..errors import UserError
from ..hf.bert import load_hf_bert, load_hf_tokenizer, save_hf_bert

HUB_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json")
"""What `hub.download_model` fetches for a BERT."""


def check_download(folder: Path) -> None:
    """Load-check a downloaded BERT folder (every tensor's name and shape)."""
    load_hf_bert(folder)


def convert_encoder(src: str | os.PathLike, dst: str | os.PathLike, target: str) -> Path:
    """An encoder's `hub.convert`: Hugging Face BERT folder <-> run folder (`target` "run"
    or "hf"), written under a temporary name beside `dst` and renamed at the end. The run
    folder's tokenizer comes from the HF folder's `vocab.txt` (with its casing), the HF
    folder gets the run's `vocab.txt`; a classifier stays a `BertForSequenceClassification`
    (its labels kept)."""
    src, dst = Path(src), Path(dst)
    labels = None
    if is_run_dir(src):
        from .run import read_run_config

        model, tokenizer = load_model(str(src))
        labels = read_run_config(src).get("labels")
    else:  # a Hugging Face folder: its own precise errors (no weights, a bad config, ...)
        model, _ = load_hf_bert(src)
        tokenizer = load_hf_tokenizer(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        if target == "run":
            save_model(model, tmp, tokenizer, extra={"converted_from": str(src)})
        else:
            if not hasattr(tokenizer, "save_vocab"):
                raise UserError(f"{src}: its tokenizer is not WordPiece; a BERT folder needs a vocab.txt")
            save_hf_bert(model, tmp, tokenizer=tokenizer, labels=labels)
        if dst.exists():
            dst.rmdir()  # empty (checked by the caller)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
