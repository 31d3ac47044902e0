"""The encoder half: a BERT-style model, beside the GPT in `gpt.py`.

Reads top to bottom like BERT itself: token + position + token-type embeddings -> LayerNorm
-> n_layer blocks of (bidirectional self-attention -> residual -> LayerNorm, GELU MLP ->
residual -> LayerNorm) -> the final hidden states. On top of them:

- the **MLM head** (`mlm_logits`): a transform (Linear -> GELU -> LayerNorm), then a decoder
  back to the vocabulary whose weight *is* the token embedding (tied) plus its own bias;
- the **pooler** (`pooled`): Linear -> tanh on the `[CLS]` position, the sentence vector
  BERT's classifiers read.

What is shared with the GPT and what is not. The attention is the same layer
(`attention.FusedSelfAttention` with `causal=False`: every token sees every other, and a
key mask hides padding). The blocks differ: BERT normalises *after* each residual addition
(post-LN) where GPT-2 normalises before (pre-LN), and BERT's GELU is the exact (erf) one
where GPT-2 uses the tanh approximation; so `BertBlock` and `BertMLP` are BERT's own. With
those two details and the fused Q/K/V, logits equal `transformers`' `BertForMaskedLM` (see
`hf/bert.py`, `tests/test_bert.py`).

Reference rule as for the GPT: `nn.Linear`, `nn.LayerNorm` and
`scaled_dot_product_attention` only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import FusedSelfAttention
from .configs import check_sizes, preset_fields, register_presets, saved_fields
from .kind import ENCODER
from ..errors import UserError

MODEL_TYPE = "bert"
"""What a run folder's config says to mark an encoder (`config.json`'s `"model_type"`)."""

# name -> shape; the four smallest of Google's "Well-Read Students" BERTs and BERT-base
_PRESETS: dict[str, dict] = {
    "bert-tiny": dict(n_layer=2, n_embd=128, n_head=2),
    "bert-mini": dict(n_layer=4, n_embd=256, n_head=4),
    "bert-small": dict(n_layer=4, n_embd=512, n_head=8),
    "bert-base": dict(n_layer=12, n_embd=768, n_head=12),
}
register_presets("encoder", _PRESETS)


@dataclass(frozen=True)
class BertConfig:
    """Hyperparameters of a BERT encoder. Frozen; defaults are BERT-base (uncased)'s."""

    vocab_size: int = 30522  # bert-base-uncased's WordPiece vocabulary
    context_length: int = 512  # positions the position embedding covers
    n_embd: int = 768  # hidden size
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads (n_embd must divide evenly)
    intermediate_size: int | None = None  # MLP width; None = 4 * n_embd
    type_vocab_size: int = 2  # token types: sentence A / sentence B
    norm_eps: float = 1e-12  # the LayerNorms' epsilon: BERT's (GPT-2's is 1e-5)
    dropout: float = 0.0  # embeddings, attention weights, residual branches
    pad_token_id: int = 0  # [PAD]'s id (the id padding uses; not otherwise special)
    model_type: str = MODEL_TYPE  # marks the family in a run folder's config

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "n_embd", "n_layer", "n_head", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"BertConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise UserError(f"BertConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        size = self.intermediate_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
            raise UserError(f"BertConfig.intermediate_size must be a positive integer or None, got {size!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"BertConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.model_type != MODEL_TYPE:
            raise UserError(f"BertConfig.model_type must be {MODEL_TYPE!r}, got {self.model_type!r}")
        check_sizes(self, self.estimated_params())

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width: `intermediate_size`, or 4 x `n_embd`."""
        return self.intermediate_size or 4 * self.n_embd

    ffn_dim = mlp_width  # the name earlier versions used

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def estimated_params(self) -> int:
        """The parameters this config describes, from its sizes alone (weight matrices and
        embeddings; biases and norms left out), without building anything."""
        d = self.n_embd
        per_layer = 4 * d * d + 2 * d * self.mlp_width  # q, k, v, out; the MLP's two
        return self.n_layer * per_layer + (self.vocab_size + self.context_length + self.type_vocab_size) * d

    @staticmethod
    def presets() -> list[str]:
        return list(_PRESETS)

    @classmethod
    def from_name(cls, name: str, **overrides) -> BertConfig:
        """A preset by name with fields overridden: `from_name("bert-tiny", vocab_size=2000)`."""
        return cls(**preset_fields(cls, _PRESETS, name, overrides, what="encoder"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        """The config saved by `to_dict`, or by an earlier version (`layer_norm_eps` for
        `norm_eps`, `intermediate_size` 0 for None); UserError for a key that is no field."""
        if d.get("intermediate_size") == 0:  # earlier versions wrote 0 for "4 x n_embd"
            d = {**d, "intermediate_size": None}
        return cls(**saved_fields(cls, d, renamed={"layer_norm_eps": "norm_eps"}))


def is_encoder_config(d: dict) -> bool:
    """Whether a run folder's `"model"` section describes an encoder (the family's marker)."""
    return isinstance(d, dict) and d.get("model_type") == MODEL_TYPE


class BertMLP(nn.Module):
    """Position-wise feed-forward with the exact (erf) GELU."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width)
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class BertBlock(nn.Module):
    """Post-LayerNorm block: normalise after each residual addition (BERT's order)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attn = FusedSelfAttention(config.n_embd, config.n_head, config.dropout, causal=False)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = BertMLP(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.norm_eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.ln_1(x + self.attn(x, key_mask=key_mask))
        return self.ln_2(x + self.mlp(x))


class MLMHead(nn.Module):
    """Hidden state -> vocabulary logits: transform (Linear, GELU, LayerNorm), then the
    decoder, whose weight is the token embedding (set by `Bert`), plus a bias."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.ln = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.decoder = nn.Linear(config.n_embd, config.vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.ln(F.gelu(self.dense(h))))


class Bert(nn.Module):
    """A BERT encoder with its MLM head and pooler."""

    kind = ENCODER
    """what it can do (`kind.py`): fill masks, embed, classify from [CLS]"""
    tied_weights = {"mlm.decoder.weight": "wte.weight"}
    """state-dict keys that are another parameter (the token embedding): not saved, restored
    from the parameter they are"""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token
        self.wpe = nn.Embedding(config.context_length, config.n_embd)  # position
        self.wtt = nn.Embedding(config.type_vocab_size, config.n_embd)  # token type (segment)
        self.ln_emb = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(BertBlock(config) for _ in range(config.n_layer))
        self.mlm = MLMHead(config)
        self.pooler = nn.Linear(config.n_embd, config.n_embd)
        self.classifier: nn.Linear | None = None  # set by `add_classifier`
        self.apply(self._init_weights)
        self.mlm.decoder.weight = self.wte.weight  # tied: one Parameter in both places

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT's init: N(0, 0.02) everywhere, zero biases, LayerNorms at (1, 0)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, idx: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                      key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last block's output, one vector per token.

        Args:
            idx: `(B, T)` token ids.
            token_type_ids: `(B, T)` segment ids (0 for the first text, 1 for a pair's
                second); default all 0.
            key_mask: `(B, T)` bool, False at padding (which no token attends to).

        Returns:
            `(B, T, n_embd)`.
        """
        B, T = idx.shape
        if T > self.config.context_length:
            raise UserError(f"input of {T} tokens exceeds the encoder's {self.config.context_length} positions")
        pos = torch.arange(T, device=idx.device)
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(idx)
        x = self.drop(self.ln_emb(self.wte(idx) + self.wpe(pos) + self.wtt(types)))
        for block in self.h:
            x = block(x, key_mask)
        return x

    def mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of hidden states `(..., n_embd)` (e.g. only the masked rows)."""
        return self.mlm(h)

    def pooled(self, h: torch.Tensor) -> torch.Tensor:
        """BERT's sentence vector: tanh(Linear(h of [CLS])), `(B, n_embd)`."""
        return torch.tanh(self.pooler(h[:, 0]))

    def add_classifier(self, num_labels: int) -> nn.Linear:
        """A fresh `Linear(n_embd, num_labels)` on the pooled `[CLS]` vector (BERT's
        sequence classifier), in place."""
        if num_labels < 2:
            raise UserError(f"classification needs at least 2 classes, found {num_labels}")
        ref = self.wte.weight
        self.classifier = nn.Linear(self.config.n_embd, num_labels, device=ref.device, dtype=ref.dtype)
        self._init_weights(self.classifier)
        return self.classifier

    def class_logits(self, idx: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                     key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`(B, num_labels)` logits of the classifier on the pooled `[CLS]` vector."""
        if self.classifier is None:
            raise UserError("this encoder has no classification head (fine-tune it with `finetune classify`)")
        return self.classifier(self.drop(self.pooled(self.hidden_states(idx, token_type_ids, key_mask))))

    def forward(self, idx: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Masked-LM logits `(B, T, vocab_size)`; arguments as in `hidden_states`."""
        return self.mlm_logits(self.hidden_states(idx, token_type_ids, key_mask))

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameters, the tied decoder counted once (without the token, position and
        token-type embeddings if `include_embeddings` is False)."""
        n = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            n -= sum(e.weight.numel() for e in (self.wte, self.wpe, self.wtt))
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, as `GPT.flops_per_token` counts them (6 per weight, the
        decoder over the full vocabulary, plus attention's 12·L·C·T); the MLM loss runs the
        head on the masked 15% only, so this is an upper bound."""
        cfg = self.config
        n = self.num_params(include_embeddings=False) + cfg.vocab_size * cfg.n_embd
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * (seq_len or cfg.context_length)


def embed(model: Bert, idx: torch.Tensor, key_mask: torch.Tensor | None = None,
          pooling: str = "mean", normalize: bool = True) -> torch.Tensor:
    """Sentence embeddings `(B, n_embd)`: the mean of the real tokens' hidden states
    (`pooling="mean"`) or the `[CLS]` position's (`"cls"`), L2-normalised by default."""
    h = model.hidden_states(idx, key_mask=key_mask)
    if pooling == "mean":
        w = key_mask.to(h.dtype)[..., None] if key_mask is not None else torch.ones_like(h[..., :1])
        v = (h * w).sum(1) / w.sum(1).clamp_min(1)
    elif pooling == "cls":
        v = h[:, 0]
    else:
        raise UserError(f"unknown pooling {pooling!r}; use 'mean' or 'cls'")
    return F.normalize(v, dim=-1) if normalize else v

