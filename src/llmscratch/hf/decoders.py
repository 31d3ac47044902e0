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

The second half of the file does the same for the Llama family (`llama`, `qwen3`,
`mistral`: `load_hf_llama` / `save_hf_llama`), and `load_hf` / `save_hf` dispatch on
`config.json`'s `model_type` (loaders of other families register in `HF_LOADERS`).

Example::

    model = load_hf("checkpoints/Llama-3.2-1B")     # any supported model_type
    model = load_hf_gpt2("checkpoints/gpt2")        # a folder written by save_pretrained
    save_hf_gpt2(model, "out/gpt2-copy")            # loadable by GPT2LMHeadModel.from_pretrained
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path
from typing import Iterator

import torch

from ..errors import UserError
from ..models.gpt import GPT, GPTConfig, check_rope_scaling
from ..utils import save_safetensors, write_json

__all__ = ["load_hf", "save_hf", "is_hf_dir", "load_hf_gpt2", "save_hf_gpt2", "is_hf_gpt2_dir",
           "load_hf_llama", "save_hf_llama", "register_hf_family"]

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"  # sharded: one index + several files
PYTORCH_FILE = "pytorch_model.bin"
PYTORCH_INDEX_FILE = "pytorch_model.bin.index.json"
# In the order we (and transformers) prefer them: safetensors cannot run code when read.
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE, PYTORCH_FILE, PYTORCH_INDEX_FILE)

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
_MAX_LISTED = 5  # how many names an error message lists before "... and N more"


# --------------------------------------------------------------------------- helpers


def _is_conv1d(name: str) -> bool:
    """True for the projection weights Hugging Face stores transposed (`h.3.mlp.c_fc.weight`)."""
    return _CONV1D_RE.match(name) is not None


def _listing(names) -> str:
    """`'a', 'b', 'c' ... and 7 more` — short enough for a one-line error message."""
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    rest = len(names) - _MAX_LISTED
    return shown + (f" ... and {rest} more" if rest > 0 else "")


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _read_json(path: Path) -> dict:
    """A JSON object from `path`, or a UserError saying what is wrong with the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _find_weights_file(folder: Path) -> Path | None:
    """The preferred weights file present in `folder` (see WEIGHT_FILES), or None."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


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


# --------------------------------------------------------------------------- reading tensors


class _Checkpoint:
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
            index = _read_json(weights)
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


def _empty_gpt(config: GPTConfig, device: torch.device, dtype: torch.dtype) -> GPT:
    """A `GPT` with allocated but uninitialised parameters (every one is overwritten).

    Building on the meta device skips the random init, which for GPT-2 XL's 1.5B
    parameters costs seconds and a second copy of the weights' worth of work.
    """
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
    folder = Path(path)
    if not folder.exists():
        raise UserError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"{folder}: expected a Hugging Face GPT-2 folder, got a file")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"{folder}: no {CONFIG_FILE}; is this a Hugging Face GPT-2 checkpoint folder?")
    config = _config_from_hf(_read_json(config_path), config_path)
    weights = _find_weights_file(folder)
    if weights is None:
        raise UserError(f"{folder}: no weights file (expected {SAFETENSORS_FILE} or {PYTORCH_FILE})")

    ckpt = _Checkpoint(folder, weights)
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
    model = _empty_gpt(config, device, dtype or torch.float32)
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
            f"{weights}: missing {len(missing)} tensor(s) that {CONFIG_FILE} needs: {_listing(missing)}{hint}"
        )
    if unexpected:
        raise UserError(
            f"{weights}: {len(unexpected)} unexpected tensor(s) not in a GPT-2 of this config: "
            f"{_listing(file_keys[n] for n in unexpected)}"
        )

    with torch.no_grad():
        for name, param in params.items():
            key = file_keys[name]
            tensor = ckpt.get(key)
            # Compare in the file's layout, so the message shows shapes the user can find there.
            expected = tuple(reversed(param.shape)) if _is_conv1d(name) else tuple(param.shape)
            if tuple(tensor.shape) != expected:
                raise UserError(
                    f"{weights}: tensor {key!r} has shape {_shape(tensor.shape)}, "
                    f"but {CONFIG_FILE} implies {_shape(expected)}"
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
    if not config.qkv_bias:
        raise UserError(
            "this model has qkv_bias=False, which GPT-2's format cannot express "
            "(Hugging Face GPT-2 always has Q/K/V biases); keep it in llmscratch's own format"
        )
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)

    tensors = dict(_hf_tensors(model))
    # Weights first, config last: a folder whose config.json exists has its weights too.
    # transformers refuses safetensors files without format metadata
    save_safetensors(tensors, folder / SAFETENSORS_FILE, metadata={"format": "pt"})
    write_json(folder / CONFIG_FILE, _config_to_hf(config, model.wte.weight.dtype))
    return folder


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
        return isinstance(hf, dict) and hf.get("model_type") == "gpt2" and _find_weights_file(folder) is not None
    except (OSError, ValueError):
        return False


# =========================================================================== Llama family
#
# Llama (1-3), Qwen3 and Mistral checkpoints share one layout (`LlamaForCausalLM` and its
# descendants): `model.embed_tokens`, per layer `input_layernorm`, `self_attn.{q,k,v,o}_proj`
# (Qwen3 adds `self_attn.{q,k}_norm`), `post_attention_layernorm`, `mlp.{gate,up,down}_proj`,
# then `model.norm` and `lm_head`. All are `nn.Linear`s stored `(out, in)`, so converting is
# a name map plus two concatenations: q/k/v into our fused `c_attn`, gate/up into `c_fc`
# (and the splits back on save). The rotary embedding uses the half-split layout our
# `apply_rope` uses, so no permutation of the query/key rows is needed.

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
    if off:
        raise UserError(f"this model has {', '.join(off)}, which the Llama/Qwen3 format cannot express "
                        f"(it needs {', '.join(f'{k}={v!r}' for k, v in modern.items())})")
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
    folder = _checked_folder(path)
    config_path = folder / CONFIG_FILE
    hf = _read_json(config_path)
    config = _config_from_llama(hf, config_path)
    weights = _find_weights_file(folder)
    if weights is None:
        raise UserError(f"{folder}: no weights file (expected {SAFETENSORS_FILE} or {PYTORCH_FILE})")
    ckpt = _Checkpoint(folder, weights)
    file_keys = {k for k in ckpt.keys() if not _LLAMA_IGNORED_RE.match(k.removeprefix(_LLAMA_PREFIX))}
    # transformers' base-model files (LlamaModel) store the body without "model."
    bare = {k: k for k in file_keys}
    if not any(k.startswith(_LLAMA_PREFIX) for k in file_keys):
        bare = {(k if k == "lm_head.weight" else _LLAMA_PREFIX + k): k for k in file_keys}

    device = torch.device(device) if device is not None else torch.device("cpu")
    model = _empty_gpt(config, device, dtype or torch.float32)
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
                        f"{_listing(missing)}{hint}")
    if unexpected:
        raise UserError(f"{weights}: {len(unexpected)} unexpected tensor(s) not in a {hf['model_type']} of "
                        f"this config: {_listing(bare[n] for n in unexpected)}")
    with torch.no_grad():
        for name, param in params.items():
            parts = wanted[name]
            sizes = _split_sizes(name, config) or [param.shape[0]]
            tensors = []
            for part, rows in zip(parts, sizes):
                tensor = ckpt.get(bare[part])
                expected = (rows, *param.shape[1:])
                if tuple(tensor.shape) != expected:
                    raise UserError(f"{weights}: tensor {bare[part]!r} has shape {_shape(tensor.shape)}, "
                                    f"but {CONFIG_FILE} implies {_shape(expected)}")
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


def save_hf_llama(model: GPT, path: str | os.PathLike) -> Path:
    """Write `model` as a Hugging Face Llama (or, with `qk_norm`, Qwen3) folder that
    `AutoModelForCausalLM.from_pretrained` loads without warnings; the inverse of
    `load_hf_llama` (bit-identical both ways)."""
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, GPT):
        raise UserError(f"save_hf needs a llmscratch GPT model, got {type(model).__name__}")
    config = model.config
    hf_config = _config_to_llama(config, model.wte.weight.dtype)
    folder = _writable_folder(path)
    tensors = {}
    for name, param in model.named_parameters():  # a tied head appears once, as wte
        parts = _llama_parts(name)
        pieces = param.detach().split(_split_sizes(name, config)) if len(parts) > 1 else (param.detach(),)
        for part, piece in zip(parts, pieces):
            tensors[part] = piece.to("cpu").contiguous()
    save_safetensors(tensors, folder / SAFETENSORS_FILE, metadata={"format": "pt"})
    write_json(folder / CONFIG_FILE, hf_config)
    return folder


# =========================================================================== dispatch

HF_LOADERS = {"gpt2": load_hf_gpt2, **{t: load_hf_llama for t in LLAMA_FAMILY}}
"""`config.json`'s `model_type` -> the loader of that family. Another family (an encoder)
registers its own with `register_hf_family`."""


def register_hf_family(model_type: str, loader) -> None:
    """Let `load_hf` / `is_hf_dir` accept another `model_type` (loader: `(path, dtype=, device=)`)."""
    HF_LOADERS[model_type] = loader


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


def is_hf_dir(path: str | os.PathLike) -> bool:
    """True for a Hugging Face checkpoint folder of a supported `model_type` with weights."""
    return hf_model_type(path) in HF_LOADERS and _find_weights_file(Path(path)) is not None


def load_hf(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
            device: str | torch.device | None = None):
    """Load any supported Hugging Face checkpoint folder, dispatching on `config.json`'s
    `model_type`: `gpt2`, `llama`, `qwen3`, `mistral` (and families registered later).

    Raises:
        UserError: no such folder, no config.json, or an unsupported `model_type`.
    """
    folder = _checked_folder(path)
    hf = _read_json(folder / CONFIG_FILE)
    model_type = hf.get("model_type", "gpt2")
    if model_type not in HF_LOADERS:
        raise UserError(f"{folder / CONFIG_FILE}: model_type is {model_type!r}, which is not supported "
                        f"(supported: {', '.join(HF_LOADERS)})")
    return HF_LOADERS[model_type](folder, dtype=dtype, device=device)


def save_hf(model: GPT, path: str | os.PathLike) -> Path:
    """Write `model` in the Hugging Face format of its family: GPT-2 for the GPT-2 block,
    Llama or Qwen3 (QK-norm) for the modern one."""
    config = getattr(getattr(model, "_orig_mod", model), "config", None)
    if isinstance(config, GPTConfig) and config.position == "rope":
        return save_hf_llama(model, path)
    if isinstance(config, GPTConfig) and (config.norm, config.mlp) != ("layernorm", "gelu"):
        raise UserError(f"this model mixes GPT-2's block with norm={config.norm!r}, mlp={config.mlp!r}; "
                        "neither the GPT-2 nor the Llama format can express it (keep llmscratch's format)")
    return save_hf_gpt2(model, path)


def _checked_folder(path) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise UserError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"{folder}: expected a Hugging Face checkpoint folder, got a file")
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"{folder}: no {CONFIG_FILE}; is this a Hugging Face checkpoint folder?")
    return folder


def _writable_folder(path) -> Path:
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
