"""The Llama family in Hugging Face's format: Llama (1-3), Qwen3 and Mistral, both ways.

These checkpoints share one layout (`LlamaForCausalLM` and its descendants):
`model.embed_tokens`, per layer `input_layernorm`, `self_attn.{q,k,v,o}_proj` (Qwen3 adds
`self_attn.{q,k}_norm`), `post_attention_layernorm`, `mlp.{gate,up,down}_proj`, then
`model.norm` and `lm_head`. All are `nn.Linear`s stored `(out, in)`, so converting is a name
map plus two concatenations: q/k/v into our fused `c_attn`, gate/up into `c_fc` (and the
splits back on save). The rotary embedding uses the half-split layout our `apply_rope`
uses, so no permutation of the query/key rows is needed.

The family (`LLAMA`, in `registry.HF_FAMILIES`) reads `llama`, `qwen3` and `mistral`
folders; they carry their own tokenizer (`tokenizer.json`, read as an `HFTokenizer`).

Example::

    model = load_hf("checkpoints/Llama-3.2-1B")     # via the table, or load_hf_llama(...)
    save_hf_llama(model, "out/llama-copy")          # loadable by AutoModelForCausalLM
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..errors import UserError
from ..models.gpt import GPT, GPTConfig, check_rope_scaling
from ..tokenizer.hf import HF_TOKENIZER_FILE, HFTokenizer
from .common import (CONFIG_FILE, Checkpoint, HFFamily, checked_folder, empty_gpt, listing, read_json,
                     shape_text, write_folder)

__all__ = ["LLAMA_FAMILY", "load_hf_llama", "save_hf_llama", "llama_family_of", "LLAMA"]

LLAMA_FAMILY = ("llama", "qwen3", "mistral")
_LLAMA_PREFIX = "model."
_LLAMA_IGNORED_RE = re.compile(r"^layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")  # old files' buffer
_LLAMA_ARCH = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}

# our parameter name (layer part after "h.N.") -> the Hugging Face names it is made of
_LLAMA_LAYER_PARTS = {
    "ln_1.weight": ("input_layernorm.weight",),
    "ln_2.weight": ("post_attention_layernorm.weight",),
    "attn.c_attn.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.c_proj.weight": ("self_attn.o_proj.weight",),
    "attn.q_norm.weight": ("self_attn.q_norm.weight",),
    "attn.k_norm.weight": ("self_attn.k_norm.weight",),
    "mlp.c_fc.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.c_proj.weight": ("mlp.down_proj.weight",),
}
_LLAMA_TOP_PARTS = {"wte.weight": ("model.embed_tokens.weight",), "ln_f.weight": ("model.norm.weight",),
                    "lm_head.weight": ("lm_head.weight",)}


def _llama_parts(name: str) -> tuple[str, ...]:
    """Our parameter name -> the Hugging Face tensor names concatenated (dim 0) into it."""
    if name in _LLAMA_TOP_PARTS:
        return _LLAMA_TOP_PARTS[name]
    m = re.match(r"^h\.(\d+)\.(.+)$", name)
    if m is None or m.group(2) not in _LLAMA_LAYER_PARTS:
        raise KeyError(name)
    return tuple(f"{_LLAMA_PREFIX}layers.{m.group(1)}.{p}" for p in _LLAMA_LAYER_PARTS[m.group(2)])


def _split_sizes(name: str, config: GPTConfig) -> list[int]:
    """Rows of each part of a fused tensor, in `_llama_parts` order."""
    if name.endswith("attn.c_attn.weight"):
        return [config.n_head * config.head_dim] + [config.kv_heads * config.head_dim] * 2
    if name.endswith("mlp.c_fc.weight"):
        return [config.mlp_width] * 2
    return []


def _number(hf: dict, key: str, default, source: Path, *, integer: bool = False):
    value = hf.get(key, default)
    kinds = (int,) if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool) or value <= 0:
        what = "a positive integer" if integer else "a positive number"
        raise UserError(f"{source}: field {key!r} must be {what}, got {value!r}")
    return value


def _rope_from_hf(hf: dict, source: Path) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from either spelling: transformers 5's
    `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters")
    field = "rope_parameters"
    if params is None:
        params = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 10000.0)}
        field = "rope_scaling"
    if not isinstance(params, dict):
        raise UserError(f"{source}: field {field!r} must be an object, got {params!r}")
    theta = _number(params, "rope_theta", 10000.0, source)
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if "type" in scaling and "rope_type" not in scaling:  # the oldest spelling
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    check_rope_scaling(scaling, f"{source}: {field}")
    if scaling.get("rope_type", "default") == "default":
        return float(theta), None
    return float(theta), scaling


def _config_from_llama(hf: dict, source: Path) -> GPTConfig:
    """Translate a `LlamaConfig` / `Qwen3Config` / `MistralConfig` dict into our `GPTConfig`.

    Defaults are those of the transformers config class of that `model_type`. Settings our
    model does not compute (another activation, biases, sliding-window layers in Qwen3,
    tensor-parallel pretraining) are refused, naming the field.
    """
    model_type = hf["model_type"]
    n_embd = _number(hf, "hidden_size", 4096, source, integer=True)
    n_head = _number(hf, "num_attention_heads", 32, source, integer=True)
    n_kv = _number(hf, "num_key_value_heads", n_head, source, integer=True) if hf.get(
        "num_key_value_heads") is not None else n_head
    if n_head % n_kv:
        raise UserError(f"{source}: num_attention_heads ({n_head}) must be divisible by "
                        f"num_key_value_heads ({n_kv})")
    default_hd = 128 if model_type == "qwen3" else None
    head_dim = hf.get("head_dim") if hf.get("head_dim") is not None else default_hd
    if head_dim is None:
        if n_embd % n_head:
            raise UserError(f"{source}: hidden_size ({n_embd}) must be divisible by num_attention_heads "
                            f"({n_head}) when there is no head_dim")
        head_dim = n_embd // n_head
    head_dim = _number({"head_dim": head_dim}, "head_dim", None, source, integer=True)
    activation = hf.get("hidden_act", "silu")
    if activation != "silu":
        raise UserError(f"{source}: hidden_act {activation!r} is not supported; this model's SwiGLU uses 'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False) is not False:
            raise UserError(f"{source}: {key} must be false; biased Llama-family projections are not supported")
    if hf.get("pretraining_tp", 1) != 1:
        raise UserError(f"{source}: pretraining_tp must be 1 (tensor-parallel slicing is not supported)")
    if model_type == "qwen3" and hf.get("use_sliding_window", False):
        raise UserError(f"{source}: use_sliding_window must be false (Qwen3's sliding-window layers are "
                        "not supported)")
    context = _number(hf, "max_position_embeddings", 2048, source, integer=True)
    window = hf.get("sliding_window") if model_type == "mistral" else None
    if window is not None:
        # Mistral's sliding window: every query sees the last `window` keys. Up to `window`
        # tokens that is full causal attention, so the context is capped there and the model
        # is exact up to it. Past it, generate.py re-encodes the last `window` tokens, which
        # is not Mistral's rolling cache (there, deeper layers' keys of the oldest tokens in
        # the window were computed from tokens that have since left it): tokens then differ.
        window = _number(hf, "sliding_window", None, source, integer=True)
        context = min(context, window)
    tie = hf.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise UserError(f"{source}: field 'tie_word_embeddings' must be true or false, got {tie!r}")
    theta, scaling = _rope_from_hf(hf, source)
    try:
        return GPTConfig(
            vocab_size=_number(hf, "vocab_size", 32000, source, integer=True),
            context_length=context, n_embd=n_embd,
            n_layer=_number(hf, "num_hidden_layers", 32, source, integer=True),
            n_head=n_head, n_kv_head=None if n_kv == n_head else n_kv,
            head_size=None if head_dim * n_head == n_embd else head_dim,
            intermediate_size=_number(hf, "intermediate_size", 11008, source, integer=True),
            norm="rmsnorm", norm_eps=float(_number(hf, "rms_norm_eps", 1e-6, source)),
            position="rope", rope_theta=theta, rope_scaling=scaling, mlp="swiglu",
            qk_norm=model_type == "qwen3", bias=False, qkv_bias=False, tie_weights=tie, dropout=0.0,
        )
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def llama_family_of(config: GPTConfig) -> str:
    """The Hugging Face `model_type` that expresses `config` ("llama" or "qwen3"), or a
    UserError naming the option no Llama-family format has."""
    modern = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False, qkv_bias=False)
    off = [f"{k}={getattr(config, k)!r}" for k, v in modern.items() if getattr(config, k) != v]
    if config.logit_softcap is not None:
        off.append(f"logit_softcap={config.logit_softcap!r}")
    if config.value_residual:
        off.append("value_residual=True")
    if off:
        raise UserError(f"this model has {', '.join(off)}, which the Llama/Qwen3 format cannot express "
                        f"(it needs {', '.join(f'{k}={v!r}' for k, v in modern.items())}, no logit_softcap or value_residual)")
    return "qwen3" if config.qk_norm else "llama"


def _config_to_llama(config: GPTConfig, dtype: torch.dtype) -> dict:
    """A complete `LlamaConfig` / `Qwen3Config` dict for `config` (no keys transformers
    would fill in or warn about)."""
    model_type = llama_family_of(config)
    last = config.vocab_size - 1
    hf = {
        "model_type": model_type,
        "architectures": [_LLAMA_ARCH[model_type]],
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_width,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.context_length,
        "initializer_range": 0.02,
        "rms_norm_eps": config.norm_eps,
        "use_cache": True,
        "tie_word_embeddings": config.tie_weights,
        "rope_theta": config.rope_theta,
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": last,
        "eos_token_id": last,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if model_type == "llama":
        hf.update(mlp_bias=False, pretraining_tp=1)
    else:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
    return hf


def load_hf_llama(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None) -> GPT:
    """Load a Hugging Face Llama / Qwen3 / Mistral checkpoint folder into a new `GPT`.

    Same contract as `load_hf_gpt2`: every tensor checked for shape, missing and unexpected
    tensors named, a tied head allowed in the file only if it equals the embedding.
    """
    folder = checked_folder(path)
    config_path = folder / CONFIG_FILE
    hf = read_json(config_path)
    config = _config_from_llama(hf, config_path)
    ckpt, weights = Checkpoint.of(folder)
    file_keys = {k for k in ckpt.keys() if not _LLAMA_IGNORED_RE.match(k.removeprefix(_LLAMA_PREFIX))}
    # transformers' base-model files (LlamaModel) store the body without "model."
    bare = {k: k for k in file_keys}
    if not any(k.startswith(_LLAMA_PREFIX) for k in file_keys):
        bare = {(k if k == "lm_head.weight" else _LLAMA_PREFIX + k): k for k in file_keys}

    device = torch.device(device) if device is not None else torch.device("cpu")
    model = empty_gpt(config, device, dtype or torch.float32)
    params = dict(model.named_parameters())
    wanted = {name: _llama_parts(name) for name in params}
    needed = {part for parts in wanted.values() for part in parts}
    missing = needed - set(bare)
    extra_ok = {"lm_head.weight"} if config.tie_weights else set()
    unexpected = set(bare) - needed - extra_ok
    if missing:
        hint = (" (set tie_word_embeddings to true if the head shares the embedding)"
                if missing == {"lm_head.weight"} else "")
        raise UserError(f"{weights}: missing {len(missing)} tensor(s) that {CONFIG_FILE} needs: "
                        f"{listing(missing)}{hint}")
    if unexpected:
        raise UserError(f"{weights}: {len(unexpected)} unexpected tensor(s) not in a {hf['model_type']} of "
                        f"this config: {listing(bare[n] for n in unexpected)}")
    with torch.no_grad():
        for name, param in params.items():
            parts = wanted[name]
            sizes = _split_sizes(name, config) or [param.shape[0]]
            tensors = []
            for part, rows in zip(parts, sizes):
                tensor = ckpt.get(bare[part])
                expected = (rows, *param.shape[1:])
                if tuple(tensor.shape) != expected:
                    raise UserError(f"{weights}: tensor {bare[part]!r} has shape {shape_text(tensor.shape)}, "
                                    f"but {CONFIG_FILE} implies {shape_text(expected)}")
                if not tensor.is_floating_point():
                    raise UserError(f"{weights}: tensor {bare[part]!r} has dtype {tensor.dtype}, "
                                    "expected floating point")
                tensors.append(tensor)
            param.copy_(tensors[0] if len(tensors) == 1 else torch.cat(tensors))
        if config.tie_weights and "lm_head.weight" in bare:
            head, wte = ckpt.get(bare["lm_head.weight"]), ckpt.get(bare["model.embed_tokens.weight"])
            if head.shape != wte.shape or not torch.equal(head, wte.to(head.dtype)):
                raise UserError(f"{weights}: 'lm_head.weight' differs from the token embedding, but "
                                f"{CONFIG_FILE} says tie_word_embeddings is true; set it to false")
    return model.eval()


def save_hf_llama(model: GPT, path: str | os.PathLike, tokenizer=None, labels=None) -> Path:
    """Write `model` as a Hugging Face Llama (or, with `qk_norm`, Qwen3) folder that
    `AutoModelForCausalLM.from_pretrained` loads without warnings; the inverse of
    `load_hf_llama` (bit-identical both ways). A Hugging Face `tokenizer` (`HFTokenizer`)
    is written beside it as `tokenizer.json` + `tokenizer_config.json`; `labels` is unused."""
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, GPT):
        raise UserError(f"save_hf needs a llmscratch GPT model, got {type(model).__name__}")
    config = model.config
    hf_config = _config_to_llama(config, model.wte.weight.dtype)
    tensors = {}
    for name, param in model.named_parameters():  # a tied head appears once, as wte
        parts = _llama_parts(name)
        pieces = param.detach().split(_split_sizes(name, config)) if len(parts) > 1 else (param.detach(),)
        for part, piece in zip(parts, pieces):
            tensors[part] = piece.to("cpu").contiguous()
    folder = write_folder(path, tensors, hf_config)
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save_hf(folder)
    return folder


# --------------------------------------------------------------------------- the family


def _claims(model) -> bool:
    """A GPT with rotary positions: the Llama format's (`save_hf_llama` names any other
    option it cannot express)."""
    return isinstance(model, GPT) and model.config.position == "rope"


def _tokenizer(folder: Path) -> HFTokenizer | None:
    """The folder's own `tokenizer.json` (with its chat template), or None without one."""
    return HFTokenizer.from_folder(folder) if (folder / HF_TOKENIZER_FILE).is_file() else None


LLAMA = HFFamily(
    name="llama", model_types=LLAMA_FAMILY, load=load_hf_llama, save=save_hf_llama, claims=_claims,
    tokenizer=_tokenizer, tokenizer_files=(HF_TOKENIZER_FILE,))
