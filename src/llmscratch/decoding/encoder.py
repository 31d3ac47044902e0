"""Using an encoder: fill-mask and sentence embeddings.

- `fill_mask(model, tokenizer, text)`: the top-k tokens for each `[MASK]` in the text, with
  their probabilities (softmax of the MLM head at that position).
- `embed_texts(model, tokenizer, texts)`: one vector per text, the mean of its tokens'
  final hidden states (or the `[CLS]` position's), L2-normalised, so a dot product is the
  cosine similarity.

Both take what `checkpoint.load_model` returns for an encoder run folder or a Hugging Face
BERT folder, and say in one line when given a GPT instead.
"""

from __future__ import annotations

import warnings

import torch

from ..models.bert import embed
from ..errors import UserError
from ..tokenizer.wordpiece import MASK


def encode_batch(tokenizer, texts: list[str], max_length: int,
                 device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`[CLS] text [SEP]` for each text, right-padded with `[PAD]`; over-long texts are cut
    to `max_length` with a warning.

    Returns:
        `(idx (B, T), key_mask (B, T))`, the mask False at padding.
    """
    rows = []
    for text in texts:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids, _ = tokenizer.encode_input(text, max_length=max_length)
        if caught:
            shown = text if len(text) <= 40 else text[:37] + "..."
            warnings.warn(f"{shown!r}: {caught[0].message} (the encoder's context)", stacklevel=2)
        rows.append(ids)
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    return idx.to(device), mask.to(device)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def fill_mask(model, tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each `[MASK]` in `text`, in order, the `top_k` `(token, probability)` fillings."""
    model.kind.require("fill-mask", "fill-mask")
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    if MASK not in text:
        raise UserError(f"the text has no {MASK} to fill, e.g. \"The capital of France is {MASK}.\"")
    idx, mask = encode_batch(tokenizer, [text], model.config.context_length, _device(model))
    where = (idx[0] == tokenizer.mask_id).nonzero().flatten()
    if len(where) == 0:
        raise UserError(f"every {MASK} was cut off: the text is longer than the encoder's context")
    h = model.hidden_states(idx, key_mask=mask)[0, where]  # (n_masks, C)
    probs = torch.softmax(model.mlm_logits(h).float(), dim=-1)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [[(tokenizer.tokens[int(i)], float(p)) for p, i in zip(ps, ids)]
            for ps, ids in zip(top.values, top.indices)]


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], pooling: str = "mean", normalize: bool = True,
                batch_size: int = 32) -> torch.Tensor:
    """`(len(texts), n_embd)` sentence embeddings (see the module docstring), on the CPU."""
    model.kind.require("embed", "embed")
    if not texts:
        raise UserError("no text to embed")
    out = []
    for i in range(0, len(texts), batch_size):
        idx, mask = encode_batch(tokenizer, texts[i:i + batch_size], model.config.context_length, _device(model))
        out.append(embed(model, idx, mask, pooling, normalize).float().cpu())
    return torch.cat(out)
