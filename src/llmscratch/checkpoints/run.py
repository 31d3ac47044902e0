"""Run folders: how a model, its tokenizer and its config live on disk, and how to load one.

A run folder holds

    config.json         {"format": "llmscratch", "model": GPTConfig fields, ...}
    model.safetensors   the weights (a tied LM head is stored once, as wte)
    tokenizer.json      the tokenizer (see `llmscratch.tokenizer.load_tokenizer`)

plus, for a training run, `train_state.safetensors` (everything `--resume` needs),
`metrics.jsonl` and `loss.png` (see `train.py`). Every file is written atomically, and
weights are never pickled.

`load_model` accepts a run folder, a Hugging Face folder (GPT-2, Llama, Qwen3, Mistral: the
model's own `tokenizer.json` with it) or a preset name, so every
command that takes `--model` takes any of the three. Imports go one way: this module uses
`weights` (Hugging Face folders) and `tokenizer`; neither of them imports this one (the atomic
safetensors writer both need lives in `utils`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import UserError
from ..kernels import apply_kernels
from ..models.gpt import GPT, GPTConfig
from ..kernels.quantize import quantize_int8
from ..tokenizer import get_tokenizer, load_tokenizer
from ..utils import save_safetensors, write_json
from ..tokenizer.hf import HFTokenizer
from ..hf.decoders import hf_model_type, is_hf_dir, load_hf
from ..models.bert import is_encoder_config
from ..hf.bert import is_hf_bert_dir, load_encoder_run, load_hf_bert, load_hf_tokenizer

__all__ = ["FORMAT", "is_run_dir", "load_model", "load_run_model", "model_state", "read_run_config",
           "save_model", "save_safetensors"]

FORMAT = "llmscratch"


def model_state(model: GPT) -> dict[str, torch.Tensor]:
    """The weights to save: contiguous CPU tensors, a tied head left out (it *is* wte)."""
    sd = model.state_dict()
    if getattr(model.config, "tie_weights", False):
        sd.pop("lm_head.weight", None)
    for key in getattr(model, "tied_weights", ()):  # an encoder's decoder is its token embedding
        sd.pop(key, None)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_model(model: GPT, out_dir: str | os.PathLike, tokenizer=None, extra: dict | None = None) -> Path:
    """Write `config.json`, `model.safetensors` and (if given) `tokenizer.json` to `out_dir`."""
    if getattr(model, "quantized", None):
        raise UserError("an int8-quantized model is for inference only; save the unquantized model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(model_state(model), out / "model.safetensors", metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(out / "tokenizer.json")
    cfg = {"format": FORMAT, "model": model.config.to_dict(), **(extra or {})}
    write_json(out / "config.json", cfg)
    return out


def read_run_config(path: str | os.PathLike) -> dict:
    """The `config.json` of one of our run folders (UserError if it is not one)."""
    p = Path(path) / "config.json"
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not a run folder (no config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise UserError(f"{p}: not an llmscratch run folder config (no \"format\": \"{FORMAT}\")")
    return cfg


def is_run_dir(path: str | os.PathLike) -> bool:
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def load_run_model(path: str | os.PathLike, device=None, dtype=None) -> GPT:
    """A `GPT` from one of our run folders."""
    cfg = read_run_config(path)
    if cfg.get("task") == "classify":
        raise UserError(f"{path} holds a text classifier, not a language model; "
                        f"use `llmscratch classify --model {path} TEXT`")
    if is_encoder_config(cfg.get("model")):  # the config says which model family
        return load_encoder_run(path, cfg, device, dtype)
    try:
        config = GPTConfig.from_dict(cfg["model"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{Path(path) / 'config.json'}: bad \"model\" section ({e})") from None
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{path}: no model.safetensors in the run folder")
    with torch.device("meta"):
        model = GPT(config)  # no memory, no random init: the weights come from the file
    state = load_file(str(weights))
    if config.tie_weights:
        state.setdefault("lm_head.weight", state.get("wte.weight"))
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise UserError(
            f"{weights}: weights do not match config.json "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    for k, t in model.state_dict().items():
        if state[k].shape != t.shape:
            raise UserError(f"{weights}: {k} has shape {tuple(state[k].shape)}, config needs {tuple(t.shape)}")
    model.load_state_dict(state, assign=True)
    if config.tie_weights:
        model.lm_head.weight = model.wte.weight  # assign=True replaced the shared Parameter
    model.to(device=device, dtype=dtype)
    return model.eval()


def load_model(name_or_path: str, device=None, dtype=None, seed: int = 0, kernels: bool | str = False):
    """A model and its tokenizer from a run folder, a Hugging Face GPT-2 folder or a preset.

    Args:
        name_or_path: run folder, HF folder (`config.json` + weights), or a preset name
            (`GPTConfig.presets()`), which gives a randomly initialised model with GPT-2's
            tokenizer — useful for trying the pipeline and for benchmarks.
        device / dtype: where to put the weights; dtype may also be `"int8"` for int8
            weight-only quantization with bf16 activations (inference only, see `quantize`).
        seed: the random init's seed for presets.
        kernels: swap the speed kernels into the model (`kernels.apply_kernels`), as the
            CLI, `chat` and `serve` do unless told `--no-kernels`; each taken where measured
            faster on this machine, or everywhere it applies with `"force"`; off, the reference model.

    Returns:
        `(model, tokenizer)`, the model in eval mode.
    """
    if isinstance(dtype, str):
        if dtype != "int8":
            raise UserError(f"unknown weight precision {dtype!r}; use a torch dtype or 'int8'")
        model, tokenizer = load_model(name_or_path, device=device, dtype=None, seed=seed, kernels=kernels)
        return quantize_int8(model), tokenizer
    model, tokenizer = _load_model(name_or_path, device, dtype, seed)
    if kernels:
        apply_kernels(model, force=kernels == "force")
    return model, tokenizer


def _load_model(name_or_path: str, device, dtype, seed: int):
    path = Path(name_or_path)
    if path.is_dir():
        if is_run_dir(path):
            model = load_run_model(path, device, dtype)
            tok_file = path / "tokenizer.json"
            tokenizer = load_tokenizer(tok_file) if tok_file.is_file() else get_tokenizer("gpt2")
            return model, tokenizer
        if is_hf_dir(path):  # GPT-2, Llama, Qwen3, Mistral
            model = load_hf(path, dtype=dtype, device=device).eval()
            gpt2 = hf_model_type(path) == "gpt2"
            return model, get_tokenizer("gpt2") if gpt2 else HFTokenizer.from_folder(path)
        if is_hf_bert_dir(path):
            return load_hf_bert(path, dtype=dtype, device=device)[0], load_hf_tokenizer(path)
        raise UserError(f"{path}: neither an llmscratch run folder nor a Hugging Face GPT-2 folder")
    if name_or_path in GPTConfig.presets():
        torch.manual_seed(seed)
        model = GPT(GPTConfig.from_name(name_or_path)).to(device=device, dtype=dtype)
        return model.eval(), get_tokenizer("gpt2")
    if path.exists():
        raise UserError(f"{path}: expected a folder (run folder or Hugging Face GPT-2 folder)")
    raise UserError(
        f"--model {name_or_path!r}: no such folder, and not a preset "
        f"(presets: {', '.join(GPTConfig.presets())})"
    )
