"""GGUF export: a decoder as the single file llama.cpp, Ollama and LM Studio load.

The file format is written by the `gguf` package (llama.cpp's own writer); what is ours is
the mapping of our model onto llama.cpp's architectures:

| our config | GGUF `general.architecture` |
|---|---|
| `layernorm`, `learned` positions, `gelu` MLP, plain multi-head attention | `gpt2` |
| `rmsnorm`, `rope`, `swiglu`, no biases (GQA, Llama 3 rope scaling allowed) | `llama` |
| the same with `qk_norm` (no rope scaling) | `qwen3` |

Any other mix of options, and an encoder, has no llama.cpp architecture and is refused.

Tensors (`gguf.constants` names): `token_embd`, `position_embd` (gpt2), per block
`blk.N.attn_norm`, `attn_qkv` (gpt2: our fused `c_attn` as is) or `attn_q`/`attn_k`/`attn_v`
(split out of `c_attn`), `attn_q_norm`/`attn_k_norm` (qwen3), `attn_output`, `ffn_norm`,
`ffn_up` (gpt2) or `ffn_gate`/`ffn_up` (our `c_fc` is `[gate | up]`), `ffn_down`, then
`output_norm` and `output` (left out when tied: llama.cpp then reuses `token_embd`). GPT-2
with biases switched off gets zero biases (llama.cpp's gpt2 requires them; adding zero is
exact).

Rotary layouts: we rotate dimension `j` with `j + head_dim/2` (Hugging Face's half-split).
llama.cpp's `qwen3` does the same (NEOX rope), but its `llama` rotates adjacent pairs
`(2i, 2i+1)`, so the query and key rows of each head are reordered for it (row `2i` is our
`i`, row `2i+1` our `i + head_dim/2`); a permutation of q and k alike leaves every
attention score unchanged. Llama 3's rope scaling becomes the `rope_freqs` tensor: per
frequency, how many times slower it turns than unscaled RoPE.

Precisions (`--dtype`): f32; f16 / bf16 (matrices; norms, biases and `rope_freqs` stay
f32 as llama.cpp expects); q8_0 (matrices whose rows are a multiple of 32 values in 8-bit
blocks with one scale per 32, the rest f16).

The file is written to a temporary name beside the target and renamed at the end
(`utils.atomic_path`): a failed or interrupted export (disk full) leaves no `.gguf`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..models.attention import rope_frequencies
from ..models.gpt import GPT, GPTConfig
from ..utils import atomic_path
from .gguf_vocab import GGUFVocab, gguf_vocab

__all__ = ["GGUF_DTYPES", "gguf_arch", "gguf_tensors", "write_gguf"]

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
Q8_BLOCK = 32


def _gguf():
    try:
        import gguf
    except ModuleNotFoundError:
        raise UserError("GGUF export needs the gguf package: pip install gguf "
                        "(or pip install 'llmscratch[gguf]')") from None
    return gguf


def gguf_arch(model) -> str:
    """`"gpt2"`, `"llama"` or `"qwen3"`: the llama.cpp architecture that computes `model`.

    Raises:
        UserError: an encoder, or a mix of options no llama.cpp architecture has.
    """
    if not isinstance(model, GPT):
        kind = type(model).__name__
        raise UserError(f"a {kind} ({'an encoder' if kind == 'Bert' else 'not a decoder'}) cannot be exported "
                        "to GGUF: llama.cpp runs decoder language models (GPT-2, Llama and Qwen3 style)")
    if getattr(model, "quantized", None):
        raise UserError("an int8-quantized model cannot be exported; export the unquantized weights "
                        "(--dtype q8_0 quantizes in the file)")
    c = model.config
    if (c.norm, c.position, c.mlp) == ("layernorm", "learned", "gelu"):
        off = [f"{k}={getattr(c, k)!r}" for k in ("n_kv_head", "head_size") if getattr(c, k) is not None]
        off += ["qk_norm=True"] if c.qk_norm else []
        if off:
            raise UserError(f"a GPT-2-style model with {', '.join(off)} has no llama.cpp architecture "
                            "(its gpt2 has plain multi-head attention)")
        return "gpt2"
    if (c.norm, c.position, c.mlp, c.bias, c.qkv_bias) == ("rmsnorm", "rope", "swiglu", False, False):
        if c.qk_norm:
            if c.rope_scaling:
                raise UserError("a Qwen3-style model (qk_norm) with rope_scaling has no llama.cpp "
                                "architecture: its qwen3 has no rope scaling")
            return "qwen3"
        return "llama"
    options = ", ".join(f"{k}={getattr(c, k)!r}" for k in ("norm", "position", "mlp", "bias", "qkv_bias"))
    raise UserError(f"a decoder with {options} has no llama.cpp architecture: GGUF export takes GPT-2 style "
                    "(layernorm, learned, gelu) or Llama/Qwen3 style (rmsnorm, rope, swiglu, no biases)")


def _interleave_rope_rows(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a query/key projection reordered from the half-split rotary layout to
    adjacent pairs: per head, new row 2i = row i, new row 2i+1 = row i + head_dim/2."""
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model: GPT, arch: str):
    """Yield `(gguf name, float32 numpy array)` for every tensor of the file."""
    c: GPTConfig = model.config
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    hd, nh, nkv = c.head_dim, c.n_head, c.kv_heads

    def out(name, t):
        return name, t.contiguous().numpy()

    yield out("token_embd.weight", sd["wte.weight"])
    if arch == "gpt2":
        yield out("position_embd.weight", sd["wpe.weight"])
    if arch == "llama" and c.rope_scaling:
        plain = rope_frequencies(hd, c.rope_theta, None)
        yield out("rope_freqs.weight", plain / rope_frequencies(hd, c.rope_theta, c.rope_scaling))
    for i in range(c.n_layer):
        p, b = f"h.{i}.", f"blk.{i}."

        def bias(name, rows):
            return sd.get(p + name, torch.zeros(rows))

        qkv = sd[p + "attn.c_attn.weight"]
        if arch == "gpt2":
            yield out(b + "attn_norm.weight", sd[p + "ln_1.weight"])
            yield out(b + "attn_norm.bias", bias("ln_1.bias", c.n_embd))
            yield out(b + "attn_qkv.weight", qkv)
            yield out(b + "attn_qkv.bias", bias("attn.c_attn.bias", qkv.shape[0]))
            yield out(b + "attn_output.weight", sd[p + "attn.c_proj.weight"])
            yield out(b + "attn_output.bias", bias("attn.c_proj.bias", c.n_embd))
            yield out(b + "ffn_norm.weight", sd[p + "ln_2.weight"])
            yield out(b + "ffn_norm.bias", bias("ln_2.bias", c.n_embd))
            yield out(b + "ffn_up.weight", sd[p + "mlp.c_fc.weight"])
            yield out(b + "ffn_up.bias", bias("mlp.c_fc.bias", c.mlp_width))
            yield out(b + "ffn_down.weight", sd[p + "mlp.c_proj.weight"])
            yield out(b + "ffn_down.bias", bias("mlp.c_proj.bias", c.n_embd))
            continue
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd])
        if arch == "llama":
            q, k = _interleave_rope_rows(q, nh, hd), _interleave_rope_rows(k, nkv, hd)
        gate, up = sd[p + "mlp.c_fc.weight"].chunk(2)
        yield out(b + "attn_norm.weight", sd[p + "ln_1.weight"])
        yield out(b + "attn_q.weight", q)
        yield out(b + "attn_k.weight", k)
        yield out(b + "attn_v.weight", v)
        if arch == "qwen3":
            yield out(b + "attn_q_norm.weight", sd[p + "attn.q_norm.weight"])
            yield out(b + "attn_k_norm.weight", sd[p + "attn.k_norm.weight"])
        yield out(b + "attn_output.weight", sd[p + "attn.c_proj.weight"])
        yield out(b + "ffn_norm.weight", sd[p + "ln_2.weight"])
        yield out(b + "ffn_gate.weight", gate)
        yield out(b + "ffn_up.weight", up)
        yield out(b + "ffn_down.weight", sd[p + "mlp.c_proj.weight"])
    yield out("output_norm.weight", sd["ln_f.weight"])
    if arch == "gpt2":
        yield out("output_norm.bias", sd.get("ln_f.bias", torch.zeros(c.n_embd)))
    if not c.tie_weights:
        yield out("output.weight", sd["lm_head.weight"])


def _stored(gguf, name: str, data: np.ndarray, dtype: str):
    """`(array, raw quantization type or None)` of one tensor at the file's precision."""
    q = gguf.GGMLQuantizationType
    if dtype == "f32" or data.ndim < 2 or name == "rope_freqs.weight":
        return data.astype(np.float32), None
    if dtype == "f16" or (dtype == "q8_0" and data.shape[-1] % Q8_BLOCK):
        return data.astype(np.float16), None
    kind = q.BF16 if dtype == "bf16" else q.Q8_0
    return gguf.quants.quantize(data, kind), kind


_SAMPLING_KEYS = {"temperature": "add_sampling_temp", "top_k": "add_sampling_top_k", "top_p": "add_sampling_top_p"}
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _write_hparams(w, arch: str, c: GPTConfig) -> None:
    w.add_context_length(c.context_length)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.mlp_width)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.kv_heads)
    w.add_vocab_size(c.vocab_size)
    if arch == "gpt2":
        w.add_layer_norm_eps(c.norm_eps)
        return
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)


def _write_vocab(w, vocab: GGUFVocab, chat_template: str | None) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    if vocab.eos_id is not None:
        w.add_eos_token_id(vocab.eos_id)
    if vocab.bos_id is not None:
        w.add_bos_token_id(vocab.bos_id)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)


def write_gguf(model, tokenizer, out: str | os.PathLike, *, dtype: str = "f32", chat_template: str | None = None,
               name: str | None = None, force: bool = False, sampling: dict | None = None) -> Path:
    """Write `model` and `tokenizer` as one GGUF file llama.cpp loads.

    Args:
        model: a decoder `GPT` (GPT-2, Llama or Qwen3 style; see `gguf_arch`).
        tokenizer: its tokenizer (see `gguf_vocab`: byte-level BPE only).
        out: the `.gguf` file to write.
        dtype: one of `GGUF_DTYPES`.
        chat_template: a Jinja chat template for `tokenizer.chat_template`.
        name: `general.name` (default: the file's stem).
        force: overwrite an existing `out`.
        sampling: optional `general.sampling.*` defaults (`temperature`, `top_k`, `top_p`).

    Returns:
        `out` as a Path.

    Raises:
        UserError: a model or tokenizer llama.cpp cannot run, a bad dtype, an existing `out`
            without `force`, or a write that fails (nothing is left behind).
    """
    out = Path(out).expanduser()
    if dtype not in GGUF_DTYPES:
        raise UserError(f"unknown GGUF dtype {dtype!r}; choose one of: {', '.join(GGUF_DTYPES)}")
    if out.is_dir():
        raise UserError(f"{out}: is a folder; give the .gguf file to write")
    if out.exists() and not force:
        raise UserError(f"{out}: already exists (use --force to overwrite)")
    arch = gguf_arch(model)
    vocab = gguf_vocab(tokenizer, model.config.vocab_size)
    gguf = _gguf()
    try:
        with atomic_path(out) as tmp:
            w = gguf.GGUFWriter(str(tmp), arch)
            w.add_name(name or out.stem)
            w.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[dtype]))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _write_hparams(w, arch, model.config)
            _write_vocab(w, vocab, chat_template)
            for key, value in (sampling or {}).items():
                if value is not None:
                    getattr(w, _SAMPLING_KEYS[key])(value)
            for tensor_name, data in gguf_tensors(model, arch):
                stored, raw = _stored(gguf, tensor_name, data, dtype)
                w.add_tensor(tensor_name, stored, raw_dtype=raw)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
    except OSError as e:
        raise UserError(f"{out}: cannot write it ({e.strerror or e}); nothing was written") from None
    return out
