"""Decoding: turn a model's next-token distributions into text.

`sample` picks one token from logits (greedy, temperature, top-k, top-p) and knows nothing
about models. `generate_stream` is the decoding loop, yielding one new token per row per
step; `generate` collects it into a tensor, and `stream_decode` / `stream_text` turn it
into text pieces (`streaming.StreamDecoder`) for the CLI, `chat` and the server.

With `use_cache=True` (the default) each layer's keys and values are kept in a
pre-allocated KV cache, so a new token costs one position's work instead of the whole
sequence's. Once the sequence fills the context window, the model with learned absolute
positions has to see the last `context_length` tokens at new positions, so from then on
each step recomputes that window (exactly what the uncached loop does) — the cached and
uncached paths give the same tokens. A rotary-position (RoPE) model is recomputed the same
way: its window is re-encoded at positions 0..ctx-1, which is what the uncached loop sees,
and since RoPE attention depends only on distances, it is also what the window means.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterator, Sequence

import torch

from ..errors import UserError
from ..models.gpt import GPT
from .streaming import StreamDecoder


class SamplingError(UserError):
    """A sampling setting out of range; `param` names it (`temperature`, `top_k`, `top_p`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def check_sampling(temperature: float | None = 0.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """The one check of sampling settings, shared by `sample` (so `generate`, `chat` and the
    CLI) and the server's requests (and so the chat page).

    Valid: `temperature` a finite number >= 0 (0 = greedy) or None; `top_k` an integer >= 0
    (0 or None = off); `top_p` a number in (0, 1] (1 or None = off).

    Raises:
        SamplingError: one line naming the setting and the value given.
    """
    def is_number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if temperature is not None and not (is_number(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise SamplingError("temperature", f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0):
        raise SamplingError("top_k", f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if top_p is not None and not (is_number(top_p) and 0 < top_p <= 1):
        raise SamplingError("top_p", f"top_p must be in (0, 1] (1 = off), got {top_p!r}")


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from `(B, V)` logits; returns `(B,)` ids.

    temperature 0 is greedy (argmax). Otherwise logits are divided by the temperature,
    restricted to the `top_k` most likely tokens and/or the smallest set whose probability
    reaches `top_p`, and one token is drawn.

    Raises:
        SamplingError: a setting out of range (`check_sampling`).
    """
    check_sampling(temperature, top_k, top_p)
    if temperature is None or temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the tokens ranked above it already reach top_p; the first
        # token always survives because the mass above it is 0
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _fit_prompt(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    ctx = model.config.context_length
    if idx.shape[1] > ctx:
        warnings.warn(
            f"prompt of {idx.shape[1]} tokens is longer than the context length {ctx}; "
            f"keeping its last {ctx} tokens",
            stacklevel=3,
        )
        idx = idx[:, -ctx:]
    return idx


def _last_logits(model: GPT, idx: torch.Tensor, caches, start: int) -> torch.Tensor:
    """`(B, V)` logits of the last position only: decoding needs no more, and on a long
    prompt the LM head of every other position would be most of the prefill's work."""
    return model.lm_head(model.hidden_states(idx, caches, start)[:, -1])


@torch.inference_mode()
def generate_stream(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield `(B,)` new token ids, one step at a time.

    A row that has produced `eos_id` keeps yielding `eos_id` (padding) until every row is
    done, then the loop stops; so stopping works at any batch size.
    """
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)
    if idx.shape[1] == 0:
        raise ValueError("generate needs a prompt of at least one token")
    idx = _fit_prompt(model, idx)
    ctx = model.config.context_length
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    eos = None
    if eos_id is not None:
        eos = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=idx.device)
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)

    # sized for this call, not the whole context: a 128k-token model would otherwise
    # allocate gigabytes for a short reply (the window slides only once ctx is reached)
    caches = model.make_kv_caches(idx.shape[0], min(ctx, idx.shape[1] + max_new_tokens)) if use_cache else None
    seq = idx
    logits = _last_logits(model, seq, caches, 0)  # prefill: (B, V)
    for _ in range(max_new_tokens):
        nxt = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos is not None:
            nxt = torch.where(done, eos[0], nxt)
            done = done | torch.isin(nxt, eos)
        yield nxt
        if eos is not None and bool(done.all()):
            return
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if seq.shape[1] > ctx:  # slide the window: positions change, recompute it
            seq = seq[:, -ctx:]
            logits = _last_logits(model, seq, caches, 0)
        elif use_cache:
            logits = _last_logits(model, nxt[:, None], caches, seq.shape[1] - 1)
        else:
            logits = _last_logits(model, seq, None, 0)


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
) -> torch.Tensor:
    """Continue `idx` by up to `max_new_tokens` tokens.

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

    Returns:
        `(B, T' + n)` ids: the (possibly truncated) prompt followed by the new tokens.
    """
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        new = list(generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p,
                                   eos_id, seed, use_cache))
    finally:
        model.train(was_training)
    prompt = idx[:, -model.config.context_length:]
    if not new:
        return prompt.clone()
    return torch.cat([prompt, torch.stack(new, dim=1)], dim=1)


def stream_decode(
    model: GPT,
    decoder: StreamDecoder,
    ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
) -> Iterator[str]:
    """Continue the prompt `ids` (batch size 1), yielding `decoder`'s text piece per token.

    A piece is "" while the decoder holds text back (half a character, the possible start
    of a stop string), so a caller can check for cancellation between tokens. Generation
    ends at the decoder's `eos_id` or stop strings; `decoder.n_tokens` and
    `decoder.finish_reason` tell afterwards how many tokens it took and why it ended.
    """
    device = device or next(model.parameters()).device
    idx = torch.tensor([list(ids)], dtype=torch.long, device=device)
    steps = generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p, decoder.eos_id, seed)
    try:
        yield from decoder.pieces(int(tok[0]) for tok in steps)
    finally:
        steps.close()  # frees the KV cache now, also when the caller stops early


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
) -> Iterator[str]:
    """Yield the continuation of `prompt` as text, piece by piece (batch size 1).

    Pieces are whole characters (a byte-level token can end inside one) and the text ends
    before the first of the `stop` strings; see `streaming.StreamDecoder`.
    """
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.eot_id]  # an empty prompt starts a new document
    decoder = StreamDecoder(tokenizer, stop, tokenizer.eot_id if stop_at_eos else None)
    was_training = model.training
    model.eval()
    try:
        for piece in stream_decode(model, decoder, ids, max_new_tokens, temperature, top_k, top_p, seed,
                                   device):
            if piece:
                yield piece
    finally:
        model.train(was_training)
