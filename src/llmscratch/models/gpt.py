"""The GPT model: config, MLP, transformer block and the full network.

Reads top to bottom like GPT-2 itself: token + position embeddings -> n_layer blocks of
(LayerNorm -> causal self-attention -> residual, LayerNorm -> MLP -> residual) -> final
LayerNorm -> linear head back to the vocabulary. Parameter names follow GPT-2's (`wte`,
`wpe`, `h.N.attn.c_attn`, `c_proj`, `ln_f`), so loading OpenAI's weights is a name map
plus a transpose (see `hf/decoders.py`).

The same classes build the modern decoders (Llama 3, Qwen3, SmolLM2, Mistral) from config
options rather than copies: RMSNorm instead of LayerNorm, rotary positions (no `wpe`), a
gated SwiGLU MLP, grouped-query attention (`n_kv_head`), QK-norm, no biases, an untied head.
Their Hugging Face tensors (`q_proj`/`k_proj`/`v_proj`, `gate_proj`/`up_proj`) are
concatenated into our fused `c_attn` / `c_fc` on load (`hf/decoders.py`).

This is the reference model: `nn.Linear`, `nn.LayerNorm` / `RMSNorm` and `scaled_dot_product_attention`
only. `llmscratch.kernels.apply_kernels(model)` swaps faster CPU kernels into a built model
(the CLI, trainer, server and bench do so by default); their results equal this file's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import FusedSelfAttention, KVCache, RMSNorm, rope_cos_sin, rope_frequencies
from .configs import check_sizes, preset_fields, register_presets, saved_fields
from .kind import DECODER
from ..errors import UserError

# Presets. The GPT-2 sizes are OpenAI's; the small ones are sized to train in minutes on a
# laptop CPU. The modern decoders carry their real shapes (from each model's config.json);
# llama-tiny / llama-small are the modern block at the parameter count of tiny / small
# (within 0.1%, `tests/test_modern_decoders.py`), for comparing the blocks at equal size.
_MODERN = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False, qkv_bias=False)
_PRESETS: dict[str, dict] = {
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, context_length=1024),
    "gpt2-355m": dict(n_layer=24, n_head=16, n_embd=1024, context_length=1024),
    "gpt2-774m": dict(n_layer=36, n_head=20, n_embd=1280, context_length=1024),
    "gpt2-1558m": dict(n_layer=48, n_head=25, n_embd=1600, context_length=1024),
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, context_length=128),
    "mini": dict(n_layer=4, n_head=4, n_embd=256, context_length=256),
    "small": dict(n_layer=6, n_head=6, n_embd=384, context_length=256),
    "medium": dict(n_layer=8, n_head=8, n_embd=512, context_length=512),
    "llama-tiny": dict(_MODERN, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=224,
                       context_length=128, norm_eps=1e-5),
    "llama-small": dict(_MODERN, n_layer=6, n_head=6, n_kv_head=2, n_embd=384, intermediate_size=1216,
                        context_length=256, norm_eps=1e-5),
    "llama-3.2-1b": dict(_MODERN, vocab_size=128256, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048,
                         intermediate_size=8192, context_length=131072, norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "qwen3-0.6b": dict(_MODERN, vocab_size=151936, n_layer=28, n_head=16, n_kv_head=8, n_embd=1024,
                       head_size=128, intermediate_size=3072, context_length=40960, norm_eps=1e-6,
                       rope_theta=1000000.0, qk_norm=True),
    "smollm2-135m": dict(_MODERN, vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                         intermediate_size=1536, context_length=8192, norm_eps=1e-5, rope_theta=100000.0),
}
register_presets("GPT", _PRESETS)

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu", "relu2")
_ROPE_SCALING_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                 "original_max_position_embeddings")}


@dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of a GPT model. Frozen: derive variants with `dataclasses.replace`.

    Defaults are GPT-2 124M's. The fields after `tie_weights` make the decoder a family:
    GPT-2 is `norm="layernorm", position="learned", mlp="gelu"` with biases; Llama 3 /
    Qwen3 / SmolLM2 / Mistral are `rmsnorm`, `rope`, `swiglu`, fewer key/value heads and
    no biases (see the `llama-*`, `qwen3-*` and `smollm2-*` presets).
    """

    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    context_length: int = 1024  # the longest sequence the model is run on
    n_embd: int = 768  # width of the residual stream
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # query heads per block (n_embd must divide evenly unless head_size is set)
    dropout: float = 0.0  # on embeddings, attention weights and residual branches
    qkv_bias: bool = True  # GPT-2 has biases on its Q/K/V projections
    tie_weights: bool = True  # LM head shares the token embedding matrix, as in GPT-2
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama, Qwen)
    norm_eps: float = 1e-5  # the norms' epsilon
    position: str = "learned"  # "learned" absolute embeddings (GPT-2) or "rope" (rotary)
    rope_theta: float = 10000.0  # RoPE's base: the slowest pair turns once per ~2*pi*theta positions
    rope_scaling: dict | None = None  # Llama 3's frequency scaling ({"rope_type": "llama3", ...})
    mlp: str = "gelu"  # "gelu" (GPT-2's 2-matrix MLP), "swiglu" (gated, 3 matrices) or "relu2" (ReLU squared)
    intermediate_size: int | None = None  # the MLP's hidden width; None = 4 * n_embd
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None = n_head
    head_size: int | None = None  # per-head width when not n_embd // n_head (Qwen3: 128)
    qk_norm: bool = False  # RMSNorm on each query and key head (Qwen3)
    bias: bool = True  # biases on the attention output, MLP and LayerNorms (GPT-2: yes)
    # training levers from the speedrun literature (off by default: GPT-2 and the presets unchanged)
    zero_init: bool = False  # residual branches' output projections (and an untied head) start at zero
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap) (Gemma 2; e.g. 30)
    value_residual: bool = False  # each layer after the first attends to the mean of its values and the first's

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        for name in ("intermediate_size", "n_kv_head", "head_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise UserError(f"GPTConfig.{name} must be a positive integer or None, got {value!r}")
        if self.head_size is None and self.n_embd % self.n_head != 0:
            raise UserError(
                f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.n_head % self.kv_heads != 0:
            raise UserError(
                f"GPTConfig: n_head ({self.n_head}) must be divisible by n_kv_head ({self.kv_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        for name, choices in (("norm", NORMS), ("position", POSITIONS), ("mlp", MLPS)):
            if getattr(self, name) not in choices:
                raise UserError(f"GPTConfig.{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        if self.position == "rope" and self.head_dim % 2:
            raise UserError(f"GPTConfig: RoPE needs an even head size, got {self.head_dim}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise UserError(f"GPTConfig.norm_eps must be a positive number, got {self.norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise UserError(f"GPTConfig.rope_theta must be a positive number, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling, "GPTConfig.rope_scaling")
        cap = self.logit_softcap
        if cap is not None and (not isinstance(cap, (int, float)) or isinstance(cap, bool) or not cap > 0):
            raise UserError(f"GPTConfig.logit_softcap must be a positive number or None, got {cap!r}")
        check_sizes(self, self.estimated_params())

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads per layer: `n_kv_head`, or `n_head` (plain multi-head attention)."""
        return self.n_kv_head or self.n_head

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size or 4 * self.n_embd

    def estimated_params(self) -> int:
        """The parameters this config describes, from its sizes alone (weight matrices and
        embeddings; biases and norms left out), without building anything."""
        d, hd = self.n_embd, self.head_dim
        attn = d * self.n_head * hd * 2 + d * self.kv_heads * hd * 2  # q and out, k and v
        mlp = (3 if self.mlp == "swiglu" else 2) * d * self.mlp_width
        embeddings = self.vocab_size * d * (1 if self.tie_weights else 2)
        if self.position == "learned":
            embeddings += self.context_length * d
        return self.n_layer * (attn + mlp) + embeddings

    @staticmethod
    def presets() -> list[str]:
        return list(_PRESETS)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPTConfig":
        """A preset by name, with any field overridden: `from_name("tiny", vocab_size=512)`."""
        return cls(**preset_fields(cls, _PRESETS, name, overrides))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """The config saved by `to_dict` (UserError for a key that is no field)."""
        return cls(**saved_fields(cls, d))


def check_rope_scaling(scaling, where: str) -> None:
    """UserError (naming `where`) unless `scaling` is a rope-scaling dict this model computes:
    `{"rope_type": "default"}` or Llama 3's `{"rope_type": "llama3", factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings}`."""
    if not isinstance(scaling, dict):
        raise UserError(f"{where} must be an object, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return
    if kind not in _ROPE_SCALING_KEYS:
        raise UserError(f"{where}: unsupported rope_type {kind!r}; supported: default, "
                        f"{', '.join(_ROPE_SCALING_KEYS)}")
    for key in _ROPE_SCALING_KEYS[kind]:
        value = scaling.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{where}: {kind} scaling needs a positive number {key!r}, got {value!r}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise UserError(f"{where}: high_freq_factor must exceed low_freq_factor")


def make_norm(config: GPTConfig, dim: int | None = None) -> nn.Module:
    """The config's norm over `dim` (default `n_embd`): LayerNorm or RMSNorm."""
    dim = dim or config.n_embd
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


class MLP(nn.Module):
    """Position-wise feed-forward.

    `gelu` (GPT-2): expand to `intermediate_size` (4x), GELU, project back; `relu2` the same
    with ReLU squared (Primer; the modded-nanogpt speedruns' MLP). `swiglu`
    (Llama, Qwen): two expansions, one gated by the other through SiLU, `c_proj(silu(gate)
    * up)`; `c_fc` holds `[gate | up]` in one matrix (one matmul, and one LoRA target).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        self.relu2 = config.mlp == "relu2"
        width = config.mlp_width
        self.c_fc = nn.Linear(config.n_embd, 2 * width if self.gated else width, bias=config.bias)
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.c_fc(x).chunk(2, dim=-1)
            return self.dropout(self.c_proj(F.silu(gate) * up))
        if self.relu2:
            return self.dropout(self.c_proj(F.relu(self.c_fc(x)).square()))
        # GPT-2 used the tanh approximation of GELU; matching it is what makes logits equal
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class SoftCappedLinear(nn.Linear):
    """The LM head with logit soft-capping: `cap * tanh(x @ W.T / cap)`, logits smoothly bounded
    to (-cap, cap). A subclass, so the kernels (which swap plain `nn.Linear`s) leave it alone."""

    def __init__(self, in_features: int, out_features: int, cap: float):
        super().__init__(in_features, out_features, bias=False)
        self.cap = float(cap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cap * torch.tanh(super().forward(x) / self.cap)


class Block(nn.Module):
    """Pre-norm transformer block: each sub-layer adds to the residual stream."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = FusedSelfAttention(
            config.n_embd, config.n_head, config.dropout, config.qkv_bias,
            n_kv_head=config.n_kv_head, head_dim=config.head_size, qk_norm=config.qk_norm,
            bias=config.bias, norm_eps=config.norm_eps)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                key_mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, values: dict | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, start, key_mask, rope, values)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """A GPT-2-style decoder-only transformer language model."""

    kind = DECODER
    """what it can do (`kind.py`): generate, chat, score text, classify from the last token"""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        if config.position == "learned":  # RoPE models have no position parameters
            self.wpe = nn.Embedding(config.context_length, config.n_embd)  # position embedding
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)
        if config.logit_softcap is None:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        else:  # every caller of lm_head (decoding, scoring, the loss) gets the capped logits
            self.lm_head = SoftCappedLinear(config.n_embd, config.vocab_size, config.logit_softcap)
        if config.tie_weights:
            # One Parameter in two places: gradients from both uses add up, and the two can
            # never drift apart (copying wte into the head at load time would let them).
            self.lm_head.weight = self.wte.weight
        # Recompute each block's activations in the backward pass instead of storing them:
        # less memory, about a third more compute. Off by default.
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection gets std / sqrt(2L),
        # so the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.zero_init:  # each block starts as the identity, the untied head predicts uniform
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight") or (name == "lm_head.weight" and not config.tie_weights):
                    nn.init.zeros_(p)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, idx: torch.Tensor, caches: list[KVCache] | None = None,
                      start: int = 0, positions: torch.Tensor | None = None,
                      key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states, after `ln_f`: what the LM head turns into logits.

        For losses that want them rather than logits (`kernels.lm_head_loss` never builds
        the full logits), and for decoding, which only needs the last position's logits.

        Args:
            idx: `(B, T)` token ids.
            caches: one `KVCache` per layer (from `make_kv_caches`) for incremental decoding.
            start: position of `idx[:, 0]` in the sequence (nonzero only with caches).
            positions: optional `(B, T)` position of each token, for rows that do not
                start at 0 (a left-padded ragged batch); default `start..start+T` for all.
            key_mask: optional `(B, start+T)` bool, False at padding tokens, which no
                query attends to.

        Returns:
            `(B, T, n_embd)`.
        """
        B, T = idx.shape
        if start + T > self.config.context_length:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds the context length {self.config.context_length}"
            )
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device)  # (T,), all rows alike
        rope = None
        if self.config.position == "rope":  # rotate queries and keys by their positions
            x = self.drop(self.wte(idx))  # (B, T, C)
            rope = rope_cos_sin(positions, self.rope_frequencies(idx.device))  # 2 x (.., T, hs)
        else:
            x = self.drop(self.wte(idx) + self.wpe(positions))  # (B, T, C)
        values = {} if self.config.value_residual else None  # the first layer's values (ResFormer)
        for i, block in enumerate(self.h):
            cache = caches[i] if caches is not None else None
            # (not with the value residual: a recomputed block would find the first values already set)
            if self.gradient_checkpointing and self.training and cache is None and values is None:
                x = checkpoint(block, x, None, start, key_mask, rope, use_reentrant=False)
            else:
                x = block(x, cache, start, key_mask, rope, values)
        return self.ln_f(x)  # (B, T, C)

    def rope_frequencies(self, device=None) -> torch.Tensor:
        """RoPE's `(head_dim/2,)` fp32 frequencies, computed on demand: a buffer would be
        cast to bf16 with the model (losing the angles' precision) and be one more thing
        for checkpoints to skip."""
        cfg = self.config
        return rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, device)

    def forward(self, idx: torch.Tensor, caches: list[KVCache] | None = None, start: int = 0,
                positions: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits `(B, T, vocab_size)` for token ids `idx` `(B, T)`; the other
        arguments as in `hidden_states`."""
        return self.lm_head(self.hidden_states(idx, caches, start, positions, key_mask))

    def make_kv_caches(self, batch_size: int, max_len: int | None = None,
                       dtype: torch.dtype | None = None) -> list[KVCache]:
        """Empty pre-allocated KV caches, one per layer, for sequences up to `max_len`.

        Each holds `kv_heads` heads: grouped-query attention's saving (`kv_cache_bytes`)."""
        cfg = self.config
        max_len = min(max_len or cfg.context_length, cfg.context_length)
        ref = self.wte.weight
        return [
            KVCache(batch_size, cfg.kv_heads, max_len, cfg.head_dim, ref.device, dtype or ref.dtype)
            for _ in range(cfg.n_layer)
        ]

    def num_params(self, include_embeddings: bool = True, count_tied_head: bool = False) -> int:
        """Number of parameters (a tied head counted once unless `count_tied_head`)."""
        n = sum(p.numel() for p in self.parameters())  # .parameters() yields a shared one once
        if count_tied_head and self.config.tie_weights:
            n += self.lm_head.weight.numel()
        if not include_embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if hasattr(self, "wpe") else 0)
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B:
        6 per non-embedding weight (plus the LM head matmul) plus attention's 12·L·C·T."""
        cfg = self.config
        T = seq_len or cfg.context_length
        n = self.num_params(include_embeddings=False) + cfg.vocab_size * cfg.n_embd
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T


def kv_cache_bytes(config: GPTConfig, tokens: int, batch_size: int = 1, bytes_per_value: int = 2) -> int:
    """Bytes of the KV cache for `tokens` positions: keys and values of `kv_heads` heads
    of `head_dim` in every layer (bf16 by default). Arithmetic on the shape, not a
    measurement; with `n_kv_head=None` it is what plain multi-head attention would need."""
    return 2 * config.n_layer * config.kv_heads * config.head_dim * tokens * batch_size * bytes_per_value


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy.

    Args:
        logits: `(B, T, V)`; targets: `(B, T)` ids, `ignore_index` where no loss is wanted.
    """
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index
    )
