"""GPT-2 weights in Hugging Face's format: load them into our `GPT`, and save ours back.

A Hugging Face GPT-2 checkpoint is a folder with `config.json` (a `GPT2Config`) and the
tensors in `model.safetensors` (or, in older uploads, a pickled `pytorch_model.bin`).
Because our parameters carry GPT-2's own names (`wte`, `h.0.attn.c_attn`, `ln_f`, ...),
converting is a name map plus one twist: GPT-2 implements its projections as `Conv1D`
layers that store the weight as `(in_features, out_features)`, the transpose of
`nn.Linear`'s `(out, in)`. So the four projection weights of each block (`attn.c_attn`,
`attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`) are transposed on the way in and on the way out.

Every tensor is checked against the shape our model expects before it is copied, and
missing or unexpected tensors are an error: a half-loaded model would silently generate
garbage, which is far harder to debug than a one-line message naming the tensor.

The family is `GPT2` in `registry.HF_FAMILIES`, so `load_hf` / `save_hf` reach it.

Example::

    model = load_hf_gpt2("checkpoints/gpt2")        # a folder written by save_pretrained
    save_hf_gpt2(model, "out/gpt2-copy")            # loadable by GPT2LMHeadModel.from_pretrained
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Iterator

import torch

from ..errors import UserError
from ..models.gpt import GPT, GPTConfig
from .common import (CONFIG_FILE, Checkpoint, HFFamily, checked_folder, empty_gpt, find_weights_file, listing,
                     read_json, shape_text, write_folder)

__all__ = ["load_hf_gpt2", "save_hf_gpt2", "is_hf_gpt2_dir", "GPT2"]


# GPT2LMHeadModel prefixes the body's tensors with "transformer."; the original OpenAI
# uploads (GPT2Model layout) store them bare ("h.0.ln_1.weight"). `lm_head` is never prefixed.
_PREFIX = "transformer."
# Not parameters: the causal mask (`attn.bias`) and the masking constant (`attn.masked_bias`)
# that older transformers versions saved as buffers. Note `attn.c_attn.bias` is a real one.
_BUFFER_RE = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
# The Conv1D weights, stored (in, out) by Hugging Face and (out, in) by nn.Linear.
_CONV1D_RE = re.compile(r"^h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# GELU variants that compute the tanh approximation our MLP uses.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


# --------------------------------------------------------------------------- helpers


def _is_conv1d(name: str) -> bool:
    """True for the projection weights Hugging Face stores transposed (`h.3.mlp.c_fc.weight`)."""
    return _CONV1D_RE.match(name) is not None


# --------------------------------------------------------------------------- config


def _config_from_hf(hf: dict, source: Path) -> GPTConfig:
    """Translate a `GPT2Config` dict into our `GPTConfig`.

    Missing architecture fields take `GPT2Config`'s defaults (GPT-2 124M), exactly as
    transformers would. Fields that change what the network computes in a way our model
    cannot express (another activation, LayerNorm epsilon, attention scaling) are refused
    rather than loaded into a model that would quietly compute something else.
    """
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise UserError(f"{source}: model_type is {model_type!r}; only GPT-2 checkpoints ('gpt2') can be loaded")

    def positive_int(key: str, default: int) -> int:
        value = hf.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{source}: field {key!r} must be a positive integer, got {value!r}")
        return value

    n_embd = positive_int("n_embd", 768)
    n_layer = positive_int("n_layer", 12)
    n_head = positive_int("n_head", 12)
    vocab_size = positive_int("vocab_size", 50257)
    # n_positions is the real setting; n_ctx is a legacy duplicate that old configs carry
    context_length = positive_int("n_positions" if "n_positions" in hf else "n_ctx", 1024)

    tie = hf.get("tie_word_embeddings", True)  # absent = GPT-2's default: tied
    if not isinstance(tie, bool):
        raise UserError(f"{source}: field 'tie_word_embeddings' must be true or false, got {tie!r}")

    activation = hf.get("activation_function", "gelu_new")
    if activation not in _TANH_GELUS:
        raise UserError(
            f"{source}: activation_function {activation!r} is not supported; "
            f"this model computes GELU's tanh approximation ({' / '.join(_TANH_GELUS)})"
        )
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isclose(eps, 1e-5, rel_tol=1e-6):
        raise UserError(f"{source}: layer_norm_epsilon {eps!r} is not supported; this model uses 1e-05")
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        raise UserError(
            f"{source}: n_inner {n_inner!r} is not supported; this model's MLP is 4 * n_embd = {4 * n_embd}"
        )
    if hf.get("scale_attn_weights", True) is not True:
        raise UserError(
            f"{source}: scale_attn_weights must be true; this model always scales attention by 1/sqrt(head_dim)"
        )
    if hf.get("scale_attn_by_inverse_layer_idx", False) is not False:
        raise UserError(f"{source}: scale_attn_by_inverse_layer_idx is not supported")
    if hf.get("add_cross_attention", False) is not False:
        raise UserError(f"{source}: add_cross_attention is not supported (decoder-only model)")

    try:
        return GPTConfig(
            vocab_size=vocab_size,
            context_length=context_length,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            dropout=0.0,  # loaded for inference; fine-tuning code sets its own dropout
            qkv_bias=True,  # GPT-2 always has biases on its Q/K/V projection
            tie_weights=tie,
        )
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def _config_to_hf(config: GPTConfig, dtype: torch.dtype) -> dict:
    """A complete `GPT2Config` dict for `config`, as `GPT2Config.to_dict()` would write it."""
    # <|endoftext|> is id 50256 in GPT-2's vocabulary; a smaller (own-tokenizer) vocabulary
    # has no such token, and transformers warns about ids outside the vocabulary, so use
    # the last id there.
    special = 50256 if config.vocab_size >= 50257 else config.vocab_size - 1
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,  # legacy duplicate that old readers still look for
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # None means 4 * n_embd
        "activation_function": "gelu_new",  # the tanh approximation our MLP uses
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default, which our model uses
        "initializer_range": 0.02,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": config.tie_weights,
        "bos_token_id": special,
        "eos_token_id": special,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


# --------------------------------------------------------------------------- reading


def _our_name(key: str) -> str:
    """File key -> our parameter name: drop GPT2LMHeadModel's "transformer." prefix."""
    return key[len(_PREFIX):] if key.startswith(_PREFIX) else key


def load_hf_gpt2(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> GPT:
    """Load a Hugging Face GPT-2 checkpoint folder into a new `GPT`.

    Args:
        path: a folder with `config.json` and `model.safetensors` (preferred), a sharded
            `model.safetensors.index.json`, or `pytorch_model.bin`, as written by
            `GPT2LMHeadModel.save_pretrained` or found in the original OpenAI uploads.
        dtype: parameter dtype of the returned model (default `torch.float32`, whatever
            the file stores).
        device: where the model lives (default CPU).

    Returns:
        A `GPT` in eval mode with `dropout=0`, `qkv_bias=True` and `tie_weights` taken from
        the config's `tie_word_embeddings`; its logits equal transformers' on the same weights.

    Raises:
        UserError: the folder, config or weights file is missing or malformed, a tensor
            has the wrong shape, or tensors are missing or unexpected.
    """
    folder = checked_folder(path, "Hugging Face GPT-2")
    config_path = folder / CONFIG_FILE
    config = _config_from_hf(read_json(config_path), config_path)
    ckpt, weights = Checkpoint.of(folder)
    # Map our names to the file's keys, dropping buffers. Both spellings of one tensor in
    # one file would make it ambiguous which to use.
    file_keys: dict[str, str] = {}
    for key in ckpt.keys():
        name = _our_name(key)
        if _BUFFER_RE.match(name):
            continue
        if name in file_keys:
            raise UserError(f"{weights}: holds both {file_keys[name]!r} and {key!r}")
        file_keys[name] = key

    device = torch.device(device) if device is not None else torch.device("cpu")
    model = empty_gpt(config, device, dtype or torch.float32)
    # named_parameters lists a shared (tied) Parameter once, under its first name: wte.
    params = dict(model.named_parameters())
    missing = set(params) - set(file_keys)
    # A tied head may still be stored (GPT2LMHeadModel files sometimes include it).
    extra_ok = {"lm_head.weight"} if config.tie_weights else set()
    unexpected = set(file_keys) - set(params) - extra_ok
    if missing:
        hint = (
            " (set tie_word_embeddings to true if the head shares wte)"
            if missing == {"lm_head.weight"}
            else " (names shown without the 'transformer.' prefix)"
        )
        raise UserError(
            f"{weights}: missing {len(missing)} tensor(s) that {CONFIG_FILE} needs: {listing(missing)}{hint}"
        )
    if unexpected:
        raise UserError(
            f"{weights}: {len(unexpected)} unexpected tensor(s) not in a GPT-2 of this config: "
            f"{listing(file_keys[n] for n in unexpected)}"
        )

    with torch.no_grad():
        for name, param in params.items():
            key = file_keys[name]
            tensor = ckpt.get(key)
            # Compare in the file's layout, so the message shows shapes the user can find there.
            expected = tuple(reversed(param.shape)) if _is_conv1d(name) else tuple(param.shape)
            if tuple(tensor.shape) != expected:
                raise UserError(
                    f"{weights}: tensor {key!r} has shape {shape_text(tensor.shape)}, "
                    f"but {CONFIG_FILE} implies {shape_text(expected)}"
                )
            if not tensor.is_floating_point():
                raise UserError(f"{weights}: tensor {key!r} has dtype {tensor.dtype}, expected floating point")
            param.copy_(tensor.t() if _is_conv1d(name) else tensor)  # copy_ casts dtype/device
        if config.tie_weights and "lm_head.weight" in file_keys:
            key = file_keys["lm_head.weight"]
            head = ckpt.get(key)
            wte = ckpt.get(file_keys["wte.weight"])
            if head.shape != wte.shape or not torch.equal(head, wte.to(head.dtype)):
                raise UserError(
                    f"{weights}: {key!r} differs from the token embedding, but {CONFIG_FILE} "
                    f"says tie_word_embeddings is true; set it to false to load a separate head"
                )
    return model.eval()


# --------------------------------------------------------------------------- writing


def _hf_tensors(model: GPT) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face key, CPU tensor in Conv1D layout) for every parameter to save."""
    for name, param in model.named_parameters():  # a tied head appears once, as wte
        tensor = param.detach()
        if _is_conv1d(name):
            tensor = tensor.t()
        key = name if name == "lm_head.weight" else _PREFIX + name
        # contiguous: safetensors writes raw buffers; clone-free when already contiguous
        yield key, tensor.to("cpu").contiguous()


def save_hf_gpt2(model: GPT, path: str | os.PathLike) -> Path:
    """Write `model` as a Hugging Face GPT-2 folder: `config.json` + `model.safetensors`.

    The result loads with `transformers.GPT2LMHeadModel.from_pretrained(path)` (no missing
    weights) and with `load_hf_gpt2(path)` (bit-identical). Each file is written to a
    temporary name in the folder and renamed into place, so an interrupted save never
    leaves a truncated file. A model with an untied head also writes `lm_head.weight`.

    Args:
        model: a `GPT` (a `torch.compile`d one is unwrapped) with `qkv_bias=True`; GPT-2
            has no way to express a Q/K/V projection without bias.
        path: the folder to write (created if needed; existing files of the same names are
            replaced).

    Returns:
        The folder's path.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile wraps the module
    if not isinstance(model, GPT):
        raise UserError(f"save_hf_gpt2 needs a llmscratch GPT model, got {type(model).__name__}")
    config = model.config
    if (config.norm, config.position, config.mlp) != ("layernorm", "learned", "gelu"):
        raise UserError(f"this model has norm={config.norm!r}, position={config.position!r}, mlp={config.mlp!r}, "
                        "which GPT-2's format cannot express; save it with save_hf (Llama/Qwen3 format)")
    if config.logit_softcap is not None or config.value_residual:
        raise UserError(f"this model has logit_softcap={config.logit_softcap}, value_residual={config.value_residual}, "
                        "which GPT-2's format cannot express; keep it in llmscratch's own format")
    if not config.qkv_bias:
        raise UserError(
            "this model has qkv_bias=False, which GPT-2's format cannot express "
            "(Hugging Face GPT-2 always has Q/K/V biases); keep it in llmscratch's own format"
        )
    return write_folder(path, dict(_hf_tensors(model)), _config_to_hf(config, model.wte.weight.dtype))


def is_hf_gpt2_dir(path: str | os.PathLike) -> bool:
    """True if `path` looks like a Hugging Face GPT-2 checkpoint folder.

    That is: a folder with a `config.json` whose `model_type` is "gpt2" and a weights file
    (`model.safetensors`, `pytorch_model.bin` or a sharded index). Never raises; the CLI
    uses it to tell such a folder from one of our own run folders.
    """
    try:
        folder = Path(path)
        config_path = folder / CONFIG_FILE
        if not folder.is_dir() or not config_path.is_file():
            return False
        hf = json.loads(config_path.read_text(encoding="utf-8"))
        return isinstance(hf, dict) and hf.get("model_type") == "gpt2" and find_weights_file(folder) is not None
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- the family


def _claims(model) -> bool:
    """A GPT with learned positions: GPT-2's format (or, mixed with another block, none)."""
    return isinstance(model, GPT) and model.config.position == "learned"


def _save(model: GPT, path, tokenizer=None, labels=None) -> Path:
    """`save_hf`'s GPT-2 writer: GPT-2 folders carry no tokenizer file (theirs is built in)."""
    config = model.config
    if (config.norm, config.mlp) != ("layernorm", "gelu"):
        raise UserError(f"this model mixes GPT-2's block with norm={config.norm!r}, mlp={config.mlp!r}; "
                        "neither the GPT-2 nor the Llama format can express it (keep llmscratch's format)")
    return save_hf_gpt2(model, path)


GPT2 = HFFamily(
    name="gpt2", model_types=("gpt2",), load=load_hf_gpt2, save=_save, claims=_claims,
    tokenizer=lambda folder: None)
