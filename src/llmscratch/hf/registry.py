"""The one table of Hugging Face checkpoint families, and the functions that dispatch on it.

    HF_FAMILIES["qwen3"]          # -> the Llama family (load, save, tokenizer)
    model = load_hf(folder)       # by config.json's model_type
    save_hf(model, folder)        # by the first family that claims the model

The families are `gpt2.py`, `llama.py` and `bert.py`; another one is one more module in
`hf/` whose `HFFamily` goes into `FAMILIES` below (or, from outside the package, into
`register_hf_family`). Nothing outside `hf/` changes: `load_model`, `convert` and
`download` reach every family through this table.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UserError
from ..tokenizer import get_tokenizer, load_tokenizer
from .bert import BERT
from .common import CONFIG_FILE, TOKENIZER_COPY, HFFamily, checked_folder, find_weights_file, hf_model_type, read_json
from .gpt2 import GPT2
from .llama import LLAMA

__all__ = ["FAMILIES", "HF_FAMILIES", "register_hf_family", "family_of_folder", "is_hf_dir", "load_hf", "save_hf",
           "has_hf_tokenizer", "load_hf_tokenizer"]

FAMILIES = (GPT2, LLAMA, BERT)
"""The package's own families, in the order `save_hf` asks them to claim a model."""

HF_FAMILIES: dict[str, HFFamily] = {}
"""`config.json`'s `model_type` -> its family, in registration order."""


def register_hf_family(family: HFFamily) -> HFFamily:
    """Add `family` to the table `load_hf`, `save_hf` and `is_hf_dir` dispatch on."""
    for model_type in family.model_types:
        HF_FAMILIES[model_type] = family
    return family


for _family in FAMILIES:
    register_hf_family(_family)


def is_hf_dir(path: str | os.PathLike) -> bool:
    """True for a Hugging Face checkpoint folder of a supported `model_type` with weights."""
    return hf_model_type(path) in HF_FAMILIES and find_weights_file(Path(path)) is not None


def family_of_folder(path: str | os.PathLike) -> HFFamily:
    """The family of the Hugging Face folder `path` (UserError: no config, unknown type)."""
    folder = checked_folder(path)
    model_type = read_json(folder / CONFIG_FILE).get("model_type", "gpt2")
    if model_type not in HF_FAMILIES:
        raise UserError(f"{folder / CONFIG_FILE}: model_type is {model_type!r}, which is not supported "
                        f"(supported: {', '.join(HF_FAMILIES)})")
    return HF_FAMILIES[model_type]


def load_hf(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
            device: str | torch.device | None = None):
    """Load any supported Hugging Face checkpoint folder, dispatching on `config.json`'s
    `model_type`: `gpt2`, `llama`, `qwen3`, `mistral`, `bert` (and families registered later).

    Raises:
        UserError: no such folder, no config.json, or an unsupported `model_type`.
    """
    return family_of_folder(path).load(Path(path), dtype=dtype, device=device)


def save_hf(model, path: str | os.PathLike, *, tokenizer=None, labels: list[str] | None = None) -> Path:
    """Write `model` as a Hugging Face folder of its family (the first registered family
    that claims it): GPT-2 for the GPT-2 block, Llama or Qwen3 for the rotary one, BERT for
    an encoder. A `tokenizer` of the family's own kind is written with it."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wraps the module
    for family in dict.fromkeys(HF_FAMILIES.values()):
        if family.claims(model):
            return family.save(model, path, tokenizer=tokenizer, labels=labels)
    names = ", ".join(f.name for f in dict.fromkeys(HF_FAMILIES.values()))
    raise UserError(f"save_hf needs a llmscratch model of a Hugging Face family ({names}), "
                    f"got {type(model).__name__}")


def has_hf_tokenizer(path: str | os.PathLike) -> bool:
    """True if the Hugging Face folder `path` holds its family's own tokenizer files."""
    family = HF_FAMILIES.get(hf_model_type(path))
    return family is not None and any((Path(path) / f).is_file() for f in family.tokenizer_files)


def load_hf_tokenizer(path: str | os.PathLike, *, gpt2_fallback: bool = False):
    """The tokenizer of a Hugging Face folder: its family's own (a Llama's `tokenizer.json`,
    a BERT's `vocab.txt`), else the run tokenizer an export kept (`TOKENIZER_COPY`), else
    GPT-2's, which a GPT-2 folder implies and other families take only with `gpt2_fallback`
    (`convert` does, warning when the vocabularies differ)."""
    folder = Path(path)
    family = family_of_folder(folder)
    own = family.tokenizer(folder)
    if own is not None:
        return own
    if (folder / TOKENIZER_COPY).is_file():
        return load_tokenizer(folder / TOKENIZER_COPY)
    if family.tokenizer_files and not gpt2_fallback:
        raise UserError(f"{folder}: no {family.tokenizer_files[0]} (the model's tokenizer)")
    return get_tokenizer("gpt2")
