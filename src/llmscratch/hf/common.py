"""What every Hugging Face checkpoint family shares: the folder, the reader and the writer.

A Hugging Face checkpoint is a folder with `config.json` (its `model_type` names the
family) and the tensors in `model.safetensors` (or a sharded index, or the older pickled
`pytorch_model.bin`). This module reads such folders safely (`Checkpoint`: lazily, one
tensor at a time, never unpickling code), writes them (`write_folder`: weights first,
config last, each file atomically), and says what a family is (`HFFamily`).

Each family module (`gpt2.py`, `llama.py`, `bert.py`) builds on this one and describes
itself as an `HFFamily`; `registry.py` keeps the table of them that `load_hf` / `save_hf`
dispatch on. Calls go one way: registry -> family -> common.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..models.gpt import GPT, GPTConfig
from ..models.configs import check_fits_in_memory
from ..utils import read_json, save_safetensors, write_json

__all__ = ["CONFIG_FILE", "SAFETENSORS_FILE", "PYTORCH_FILE", "TOKENIZER_COPY", "Checkpoint", "HFFamily",
           "hf_model_type", "read_json", "find_weights_file", "checked_folder", "writable_folder", "write_folder",
           "empty_gpt", "listing", "shape_text"]

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"  # sharded: one index + several files
PYTORCH_FILE = "pytorch_model.bin"
PYTORCH_INDEX_FILE = "pytorch_model.bin.index.json"
# In the order we (and transformers) prefer them: safetensors cannot run code when read.
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE, PYTORCH_FILE, PYTORCH_INDEX_FILE)
TOKENIZER_COPY = "llmscratch_tokenizer.json"
"""A run folder's own tokenizer, kept in an exported Hugging Face folder under this name (a
`tokenizer.json` there would be taken for a `tokenizers` file by transformers)."""
_MAX_LISTED = 5  # how many names an error message lists before "... and N more"


# --------------------------------------------------------------------------- small helpers


def listing(names) -> str:
    """`'a', 'b', 'c' ... and 7 more` — short enough for a one-line error message."""
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    rest = len(names) - _MAX_LISTED
    return shown + (f" ... and {rest} more" if rest > 0 else "")


def shape_text(shape) -> str:
    """`(768, 2304)`: a shape as a user finds it in the file."""
    return "(" + ", ".join(str(d) for d in shape) + ")"


def find_weights_file(folder: Path) -> Path | None:
    """The preferred weights file present in `folder` (see WEIGHT_FILES), or None."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def checked_folder(path, kind: str = "Hugging Face") -> Path:
    """`path` as a folder holding a `config.json`, or a UserError naming what is off."""
    folder = Path(path)
    if not folder.exists():
        raise UserError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"{folder}: expected a {kind} checkpoint folder, got a file")
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"{folder}: no {CONFIG_FILE}; is this a {kind} checkpoint folder?")
    return folder


def writable_folder(path) -> Path:
    """`path` as a folder to write into (created if needed)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_folder(path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write `model.safetensors` then `config.json` into `path`: a folder whose config
    exists has its weights too, and each file is written atomically."""
    folder = writable_folder(path)
    # transformers refuses safetensors files without format metadata
    save_safetensors(tensors, folder / SAFETENSORS_FILE, metadata={"format": "pt"})
    write_json(folder / CONFIG_FILE, config)
    return folder


# --------------------------------------------------------------------------- reading tensors


class Checkpoint:
    """Read-only view of the tensors in a checkpoint folder, loaded one at a time.

    Supports a single `model.safetensors`, sharded safetensors (an index plus shards), and
    the older `pytorch_model.bin` (single or sharded). Tensors are fetched lazily, so peak
    memory is the model plus one tensor rather than the model plus the whole file.
    """

    def __init__(self, folder: Path, weights: Path):
        self.folder = folder
        self._where: dict[str, Path] = {}  # tensor name -> file holding it
        self._open: dict[Path, object] = {}  # file -> safe_open handle or loaded state dict
        if weights.name.endswith(".index.json"):
            index = read_json(weights)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{weights}: has no 'weight_map' of tensor names to files")
            for name, file in weight_map.items():
                shard = folder / str(file)
                if not shard.is_file():
                    raise UserError(f"{weights}: lists shard {file!r}, which is not in {folder}")
                self._where[name] = shard
        else:
            for name in self._handle(weights).keys():
                self._where[name] = weights

    @classmethod
    def of(cls, folder: Path) -> tuple["Checkpoint", Path]:
        """The checkpoint in `folder` and its weights file (UserError if it has none)."""
        weights = find_weights_file(folder)
        if weights is None:
            raise UserError(f"{folder}: no weights file (expected {SAFETENSORS_FILE} or {PYTORCH_FILE})")
        return cls(folder, weights), weights

    def _handle(self, file: Path):
        """Open `file` once: a lazy safetensors handle, or a weights-only torch.load dict."""
        if file not in self._open:
            self._open[file] = _open_safetensors(file) if file.suffix == ".safetensors" else _load_pickle(file)
        return self._open[file]

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        file = self._where[name]
        handle = self._handle(file)
        if isinstance(handle, dict):
            tensor = handle[name]
        else:
            try:
                tensor = handle.get_tensor(name)
            except Exception as e:  # safetensors raises its own error type for corrupt data
                raise UserError(f"{file}: cannot read tensor {name!r} ({e})") from None
        if not isinstance(tensor, torch.Tensor):
            raise UserError(f"{file}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        return tensor


def _open_safetensors(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError for a truncated or foreign file
        raise UserError(f"{file}: not a readable safetensors file ({e})") from None


def _load_pickle(file: Path) -> dict:
    """A `pytorch_model.bin` state dict, read with `weights_only=True`.

    A plain `torch.load` runs whatever code the pickle names; `weights_only` allows only
    tensors and containers, so a malicious download cannot execute anything.
    """
    try:
        try:
            # mmap avoids reading the whole file up front; the legacy (pre-zip) format can't
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{file}: refused to unpickle it: it holds more than plain tensors "
            f"(convert it to safetensors with a trusted tool) ({str(e).splitlines()[0]})"
        ) from None
    except Exception as e:
        raise UserError(f"{file}: not a readable PyTorch checkpoint ({e})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # some tools wrap the tensors one level down
    if not isinstance(state, dict):
        raise UserError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
    return state


# --------------------------------------------------------------------------- building the model


def empty_gpt(config: GPTConfig, device: torch.device, dtype: torch.dtype) -> GPT:
    """A `GPT` with allocated but uninitialised parameters (every one is overwritten).

    Building on the meta device skips the random init, which for GPT-2 XL's 1.5B
    parameters costs seconds and a second copy of the weights' worth of work.
    """
    if device is None or torch.device(device).type != "meta":
        check_fits_in_memory(config, "the Hugging Face config")
    with torch.device("meta"):
        model = GPT(config)
    if any(True for _ in model.buffers()):
        # to_empty would leave buffers (masks, tables) uninitialised: build it for real.
        return GPT(config).to(device=device, dtype=dtype)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_weights:
        # Materialising from meta gives each module its own new Parameter, which unties
        # the head from the embedding; share it again, exactly as GPT.__init__ does.
        model.lm_head.weight = model.wte.weight
    return model


# --------------------------------------------------------------------------- families


@dataclass(frozen=True)
class HFFamily:
    """One checkpoint family: which folders and models are its own, and how to move them.

    Attributes:
        name: the family's name in messages ("gpt2", "llama", "bert").
        model_types: the `config.json` `model_type` values it reads.
        load: `(folder, dtype=, device=) -> model`.
        save: `(model, folder, tokenizer=, labels=) -> folder`; writes the tokenizer too
            when it is of the family's own kind (e.g. a Llama's `tokenizer.json`).
        claims: `(model) -> bool`, whether `save_hf` should give this model to `save`.
        tokenizer: `(folder) -> tokenizer or None`, the folder's own tokenizer; None when
            it carries none (the caller then uses GPT-2's).
        tokenizer_files: the files that tokenizer lives in.
    """

    name: str
    model_types: tuple[str, ...]
    load: Callable
    save: Callable
    claims: Callable
    tokenizer: Callable
    tokenizer_files: tuple[str, ...] = ()


def hf_model_type(path: str | os.PathLike) -> str | None:
    """`config.json`'s `model_type` in `path` (GPT-2's when absent), or None if there is no
    readable config. Never raises."""
    try:
        hf = json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(hf, dict) or hf.get("format") is not None:  # one of our run folders
        return None
    value = hf.get("model_type", "gpt2")
    return value if isinstance(value, str) else None
