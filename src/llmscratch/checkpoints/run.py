"""Run folders: how a model, its tokenizer and its config live on disk, and how to load one.

A run folder holds

    config.json         {"format": "llmscratch", "model": GPTConfig fields, ...}
    model.safetensors   the weights (a tied LM head is stored once, as wte)
    tokenizer.json      the tokenizer (see `llmscratch.tokenizer.load_tokenizer`)

plus, for a training run, `train_state.safetensors` (everything `--resume` needs),
`metrics.jsonl` and `loss.png` (see `train.py`). Every file is written atomically, and
weights are never pickled.

A run folder's `"model"` section says the family: an encoder's carries `"model_type":
"bert"` (a `Bert`), any other is a `GPTConfig` (a `GPT`). `load_run_model` reads both with the
same checks: every tensor present, none unknown, every shape as the config says.

`load_model` accepts a run folder, a Hugging Face folder (any family in `hf.HF_FAMILIES`,
with the folder's own tokenizer) or a preset name, so every command that takes `--model`
takes any of the three. Imports go one way: this module uses `hf` (Hugging Face folders)
and `tokenizer`; neither of them imports this one (the atomic safetensors writer both need
lives in `utils`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import UserError
from ..hf.registry import is_hf_dir, load_hf, load_hf_tokenizer
from ..kernels import apply_kernels
from ..kernels.quantize import quantize_int8
from ..models.bert import Bert, BertConfig, is_encoder_config
from ..models.configs import all_presets_text
from ..models.gpt import GPT, GPTConfig
from ..tokenizer import get_tokenizer, load_tokenizer
from ..models.configs import check_fits_in_memory
from ..utils import load_safetensors, read_json, save_safetensors, write_json

__all__ = ["FORMAT", "is_run_dir", "load_model", "model_kind_of", "load_run_model", "model_state", "read_run_config",
           "save_model", "save_safetensors"]

FORMAT = "llmscratch"


def model_state(model: GPT) -> dict[str, torch.Tensor]:
    """The weights to save: contiguous CPU tensors, a tied head left out (it *is* wte)."""
    sd = model.state_dict()
    for key in _tied_weights(model):  # a GPT's tied head, an encoder's MLM decoder: the embedding
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
    if not p.is_file():
        raise UserError(f"{path}: not a run folder (no config.json)")
    cfg = read_json(p, expect=None)
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


def load_run_model(path: str | os.PathLike, device=None, dtype=None, *, classifier: bool = False):
    """The model of one of our run folders: a `GPT`, or a `Bert` for an encoder's.

    Every weight the config implies must be in `model.safetensors` with its shape, and no
    other; a tied copy (a GPT's `lm_head`, an encoder's MLM decoder) is the embedding.

    Args:
        classifier: accept a classifier folder (`finetune classify`): an encoder's comes
            back with its classifier head; a decoder's is for `load_classifier` only.
    """
    cfg = read_run_config(path)
    if cfg.get("task") == "classify" and not classifier:
        raise UserError(f"{path} holds a text classifier, not a language model; "
                        f"use `llmscratch classify --model {path} TEXT`")
    model_class, config_class = (Bert, BertConfig) if is_encoder_config(cfg.get("model")) else (GPT, GPTConfig)
    try:
        config = config_class.from_dict(cfg["model"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{Path(path) / 'config.json'}: bad \"model\" section ({e})") from None
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{path}: no model.safetensors in the run folder")
    check_fits_in_memory(config, str(Path(path) / "config.json"))
    state = load_safetensors(weights)
    with torch.device("meta"):
        model = model_class(config)  # no memory, no random init: the weights come from the file
        if "classifier.weight" in state and hasattr(model, "add_classifier"):
            model.add_classifier(state["classifier.weight"].shape[0])
    if any(True for _ in model.buffers()):  # assign would leave buffers on meta: build it for real
        model = model_class(config)
        if "classifier.weight" in state and hasattr(model, "add_classifier"):
            model.add_classifier(state["classifier.weight"].shape[0])
    tied = _tied_weights(model)
    for key in tied:
        state.pop(key, None)
    expected = {k for k in model.state_dict() if k not in tied}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise UserError(
            f"{weights}: weights do not match config.json "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    for k, t in model.state_dict().items():
        if k in state and state[k].shape != t.shape:
            raise UserError(f"{weights}: {k} has shape {tuple(state[k].shape)}, config needs {tuple(t.shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    for key, source in tied.items():  # assign=True replaced the shared Parameter
        owner, _, name = key.rpartition(".")
        setattr(model.get_submodule(owner), name, model.get_parameter(source))
    model.to(device=device, dtype=dtype)
    return model.eval()


def _tied_weights(model) -> dict[str, str]:
    """state-dict key -> the parameter it is (not stored in a run folder)."""
    tied = dict(getattr(model, "tied_weights", {}))
    if getattr(model.config, "tie_weights", False):
        tied["lm_head.weight"] = "wte.weight"
    return tied


def model_kind_of(model: str) -> tuple[bool, int]:
    """(is an encoder, about how many parameters: 12 x layers x width^2 + vocab x width) of
    a run folder, Hugging Face folder or preset, from its config alone; (False, 0) when it
    cannot be told (load_model then says what is wrong)."""
    path = Path(model)
    try:
        if (path / "config.json").is_file():
            data = json.loads((path / "config.json").read_text(encoding="utf-8"))
            if is_encoder_config(data.get("model")):  # one of our run folders
                m = data["model"]
                return True, 12 * m["n_layer"] * m["n_embd"] ** 2 + m["vocab_size"] * m["n_embd"]
            if data.get("model_type") == "bert":  # a Hugging Face BERT folder
                d = data.get("hidden_size", 768)
                return True, 12 * data.get("num_hidden_layers", 12) * d ** 2 + data.get("vocab_size", 30522) * d
        elif model in BertConfig.presets():
            c = BertConfig.from_name(model)
            return True, 12 * c.n_layer * c.n_embd ** 2 + c.vocab_size * c.n_embd
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    return False, 0


def load_model(name_or_path: str, device=None, dtype=None, seed: int = 0, kernels: bool | str = False):
    """A model and its tokenizer from a run folder, a Hugging Face folder or a preset.

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
        model, tokenizer = load_model(name_or_path, device=device, dtype=None, seed=seed)
        return quantize_int8(model), tokenizer  # no kernel applies to int8 weights (`apply_kernels`)
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
        if is_hf_dir(path):  # any registered family: GPT-2, Llama, Qwen3, Mistral, BERT
            return load_hf(path, dtype=dtype, device=device).eval(), load_hf_tokenizer(path)
        raise UserError(f"{path}: neither an llmscratch run folder nor a Hugging Face GPT-2 folder")
    if name_or_path in GPTConfig.presets():
        torch.manual_seed(seed)
        model = GPT(GPTConfig.from_name(name_or_path)).to(device=device, dtype=dtype)
        return model.eval(), get_tokenizer("gpt2")
    if name_or_path in BertConfig.presets():
        raise UserError(f"--model {name_or_path}: an encoder preset has no vocabulary of its own to start from; "
                        f"pretrain it first (llmscratch pretrain --model {name_or_path} --data TEXT --out runs/bert) "
                        f"and pass the run folder")
    if path.exists():
        raise UserError(f"{path}: expected a folder (run folder or Hugging Face folder)")
    raise UserError(
        f"--model {name_or_path!r}: no such folder, and not a preset "
        f"(presets: {all_presets_text()})"
    )
