"""The GPT model: config, MLP, transformer block and the full network.

Reads top to bottom like GPT-2 itself: token + position embeddings -> n_layer blocks of
(LayerNorm -> causal self-attention -> residual, LayerNorm -> MLP -> residual) -> final
LayerNorm -> linear head back to the vocabulary. Parameter names follow GPT-2's (`wte`,
`wpe`, `h.N.attn.c_attn`, `c_proj`, `ln_f`), so loading OpenAI's weights is a name map
plus a transpose (see `weights.py`).

This is the reference model: `nn.Linear`, `nn.LayerNorm` and `scaled_dot_product_attention`
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

from .attention import CausalSelfAttention, KVCache
from .errors import UserError

# name -> (n_layer, n_head, n_embd, context_length). The GPT-2 sizes are OpenAI's; the small
# presets are sized to train in minutes on a laptop CPU.
_PRESETS: dict[str, dict] = {
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, context_length=1024),
    "gpt2-355m": dict(n_layer=24, n_head=16, n_embd=1024, context_length=1024),
    "gpt2-774m": dict(n_layer=36, n_head=20, n_embd=1280, context_length=1024),
    "gpt2-1558m": dict(n_layer=48, n_head=25, n_embd=1600, context_length=1024),
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, context_length=128),
    "small": dict(n_layer=6, n_head=6, n_embd=384, context_length=256),
    "medium": dict(n_layer=8, n_head=8, n_embd=512, context_length=512),
}


@dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of a GPT model. Frozen: derive variants with `dataclasses.replace`.

    Defaults are GPT-2 124M's.
    """

    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    context_length: int = 1024  # the longest sequence the position embedding covers
    n_embd: int = 768  # width of the residual stream
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # attention heads per block (n_embd must divide evenly)
    dropout: float = 0.0  # on embeddings, attention weights and residual branches
    qkv_bias: bool = True  # GPT-2 has biases on its Q/K/V projections
    tie_weights: bool = True  # LM head shares the token embedding matrix, as in GPT-2

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise UserError(
                f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @staticmethod
    def presets() -> list[str]:
        return list(_PRESETS)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPTConfig":
        """A preset by name, with any field overridden: `from_name("tiny", vocab_size=512)`."""
        if name not in _PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of: {', '.join(_PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            raise UserError(f"unknown GPTConfig field(s) {sorted(unknown)}; valid: {sorted(fields)}")
        return cls(**{**_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


class MLP(nn.Module):
    """Position-wise feed-forward: expand 4x, GELU, project back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 used the tanh approximation of GELU; matching it is what makes logits equal
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: each sub-layer adds to the residual stream."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.dropout, config.qkv_bias)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, start, key_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """A GPT-2-style decoder-only transformer language model."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        self.wpe = nn.Embedding(config.context_length, config.n_embd)  # position embedding
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
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
        x = self.drop(self.wte(idx) + self.wpe(positions))  # (B, T, C)
        for i, block in enumerate(self.h):
            cache = caches[i] if caches is not None else None
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, None, start, key_mask, use_reentrant=False)
            else:
                x = block(x, cache, start, key_mask)
        return self.ln_f(x)  # (B, T, C)

    def forward(self, idx: torch.Tensor, caches: list[KVCache] | None = None, start: int = 0,
                positions: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits `(B, T, vocab_size)` for token ids `idx` `(B, T)`; the other
        arguments as in `hidden_states`."""
        return self.lm_head(self.hidden_states(idx, caches, start, positions, key_mask))

    def make_kv_caches(self, batch_size: int, max_len: int | None = None,
                       dtype: torch.dtype | None = None) -> list[KVCache]:
        """Empty pre-allocated KV caches, one per layer, for sequences up to `max_len`."""
        cfg = self.config
        max_len = min(max_len or cfg.context_length, cfg.context_length)
        ref = self.wte.weight
        return [
            KVCache(batch_size, cfg.n_head, max_len, cfg.head_dim, ref.device, dtype or ref.dtype)
            for _ in range(cfg.n_layer)
        ]

    def num_params(self, include_embeddings: bool = True, count_tied_head: bool = False) -> int:
        """Number of parameters (a tied head counted once unless `count_tied_head`)."""
        n = sum(p.numel() for p in self.parameters())  # .parameters() yields a shared one once
        if count_tied_head and self.config.tie_weights:
            n += self.lm_head.weight.numel()
        if not include_embeddings:
            n -= self.wpe.weight.numel() + self.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B:
        6 per non-embedding weight (plus the LM head matmul) plus attention's 12·L·C·T."""
        cfg = self.config
        T = seq_len or cfg.context_length
        n = self.num_params(include_embeddings=False) + cfg.vocab_size * cfg.n_embd
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * T


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy.

    Args:
        logits: `(B, T, V)`; targets: `(B, T)` ids, `ignore_index` where no loss is wanted.
    """
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index
    )
