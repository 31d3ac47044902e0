"""The public decoding functions: one-call shortcuts onto the decoding `engine.Engine`.

`generate` continues a batch of prompts into a tensor of ids, `stream_text` streams the
continuation of one text prompt piece by piece, and `generate_batch` decodes prompts of
different lengths as one ragged batch. Each builds an `Engine` and a `sampling.Sampling`
and calls the engine.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from ..models.gpt import GPT
from .batching import DecodeRow
from .engine import Engine
from .sampling import Sampling


def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    context_shift: bool = False,
) -> torch.Tensor:
    """Continue `idx` by up to `max_new_tokens` tokens (`Engine.generate`).

    Args:
        model: a `GPT` (switched to eval mode for the call).
        idx: `(B, T)` (or `(T,)`) prompt ids. Prompts longer than the context window are
            left-truncated with a warning.
        max_new_tokens: how many tokens to add (fewer if every row hits `eos_id`).
        temperature: 0 for greedy decoding; higher is more random.
        top_k / top_p: restrict sampling to the k likeliest tokens / the nucleus of mass p.
        eos_id: stop a row when it emits this id (or any of these ids); finished rows are
            padded with it.
        seed: seeds a private generator, so the same call gives the same tokens.
        use_cache: use the KV cache (same tokens as without, much faster).
        context_shift: past the context window, drop its oldest half once and decode cached
            (llama.cpp's context shift) instead of re-encoding the whole window per token;
            faster there, but the tokens past the window change (see `Engine`).

    Returns:
        `(B, T' + n)` ids: the (possibly truncated) prompt followed by the new tokens.
    """
    return Engine(model).generate(idx, max_new_tokens, Sampling(temperature, top_k, top_p, seed), eos_id,
                                  use_cache, context_shift)


def stream_text(
    model: GPT,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
    device: torch.device | str | None = None,
    stop: Sequence[str] = (),
    context_shift: bool = False,
) -> Iterator[str]:
    """Yield the continuation of `prompt` as text, piece by piece (batch size 1, `Engine.stream`).

    Pieces are whole characters (a byte-level token can end inside one) and the text ends
    before the first of the `stop` strings; see `streaming.StreamDecoder`. `device` is
    accepted for compatibility; the model's own device is used. `context_shift`: see
    `generate`.
    """
    engine = Engine(model, tokenizer)
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.eot_id]  # an empty prompt starts a new document
    row = engine.row(ids, max_new_tokens, Sampling(temperature, top_k, top_p, seed),
                     engine.eos_id if stop_at_eos else None, stop)
    with engine.evaluating():
        for piece in engine.stream(row, context_shift):
            if piece:
                yield piece


def generate_batch(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    temperature: float | Sequence[float] = 0.0,
    top_k: int | None | Sequence[int | None] = None,
    top_p: float | None | Sequence[float | None] = None,
    eos_id: int | Sequence[int] | None = None,
    seed: int | None | Sequence[int | None] = None,
    stop: Sequence[str] = (),
    tokenizer=None,
    batch_size: int | None = None,
    context_shift: bool = False,
) -> list[DecodeRow]:
    """Continue prompts of different lengths as one ragged batch (`Engine.run`).

    Each row's tokens equal `generate` on that prompt alone with the same settings (greedy,
    or sampled with the same seed): see `batching` for why.

    Args:
        model: a `GPT` (switched to eval mode for the call).
        prompts: token-id lists, of any lengths; one longer than the context window is
            left-truncated with a warning (as `generate` does).
        max_new_tokens, temperature, top_k, top_p, seed: one value for every row, or a list
            with one per prompt.
        eos_id: ends a row when produced (kept as its last token).
        stop: stop strings ending a row (needs `tokenizer`); `row.text` is then the reply.
        tokenizer: decodes each row's text as it is generated (`DecodeRow.text`).
        batch_size: rows decoded at once (default: all); more prompts wait for a free slot.
        context_shift: see `generate` (the same tokens as `generate` with it).

    Returns:
        One finished `DecodeRow` per prompt, in order: `.tokens`, `.finish_reason`, `.text`.
    """
    engine = Engine(model, tokenizer)
    n = len(prompts)
    settings = [_per_row(v, n, name) for v, name in ((max_new_tokens, "max_new_tokens"),
                                                      (temperature, "temperature"), (top_k, "top_k"),
                                                      (top_p, "top_p"), (seed, "seed"))]
    rows = [engine.row(p, m, Sampling(t, k, tp, s), eos_id, stop)
            for p, m, t, k, tp, s in zip(prompts, *settings)]
    return engine.run(rows, batch_size, context_shift=context_shift)


def _per_row(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n
