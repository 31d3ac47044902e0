"""The decoding engine: every caller that turns a model's logits into text goes through it.

`Engine` wraps a model (and, for text, its tokenizer). The CLI's `generate`, `chat`, the
server, evaluation, fine-tuning's test responses and pretraining's samples all decode
through one of its three ways, which share the sampling (`sampling.Sampling`), the KV
caches, the streaming of whole characters with stop strings (`streaming.StreamDecoder`)
and one signal of how a sequence ended (`DecodeRow.finish_reason`: "stop", "length",
"cancelled", "error"):

- `steps` / `generate`: a rectangular batch in lockstep (prompts of one length, one seeded
  generator for the batch), yielding one token per row per step; `generate` collects it
  into a tensor.
- `stream`: one `DecodeRow` alone, at batch size 1, yielding its text piece per token.
- `decode` / `run`: ragged rows (`batching.BatchDecoder`): prompts of any length decoded
  together, a finished row's slot going to the next one; `batch` hands the server's
  scheduler a `BatchDecoder` to feed requests as they arrive.

A row's tokens are the same whichever way decodes it (greedy, or sampled with its seed).

With `use_cache=True` (the default) `steps` keeps each layer's keys and values in a
pre-allocated KV cache, so a new token costs one position's work instead of the whole
sequence's. Once the sequence fills the context window, the model with learned absolute
positions has to see the last `context_length` tokens at new positions, so from then on
each step recomputes that window (exactly what the uncached loop does) — the cached and
uncached paths give the same tokens. A rotary-position (RoPE) model is recomputed the same
way: its window is re-encoded at positions 0..ctx-1, which is what the uncached loop sees,
and since RoPE attention depends only on distances, it is also what the window means.

`context_shift=True` (opt-in, every way above) trades that exactness for speed past the
window: when the sequence overflows it, the oldest half is dropped and the newest half
(`batching.shifted_window`) re-encoded once; decoding then goes on cached until the window is
full again. Tokens past the window change (each is predicted from between half and all of the
window), identically in `steps`, `stream` and the ragged batches.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Sequence

import torch

from ..errors import UserError
from .batching import PREFILL_CHUNK, BatchDecoder, DecodeRow, shifted_window
from .sampling import GREEDY, Sampling
from .streaming import StreamDecoder


class Engine:
    """Decode with `model`; with a `tokenizer`, rows also stream their text.

    Args:
        model: a `GPT` (or any model with `make_kv_caches`, `hidden_states`, `lm_head` and
            `config.context_length`).
        tokenizer: decodes rows' text (`row`); its `<|endoftext|>` is `eos_id` (None for a
            tokenizer without one, or no tokenizer).
    """

    def __init__(self, model, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = model.config.context_length
        self.device = next(model.parameters()).device
        try:
            self.eos_id: int | None = tokenizer.eot_id if tokenizer is not None else None
        except UserError:  # a word-level tokenizer without <|endoftext|>: length and stops only
            self.eos_id = None

    # ------------------------------------------------------------------ rows
    def row(self, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling = GREEDY,
            eos_id: int | Sequence[int] | None = None, stop: Sequence[str] = (), tag=None) -> DecodeRow:
        """One sequence to decode (`stream`, `decode`, the server's batch).

        A prompt longer than the context window keeps its last `context_length` tokens (with
        a warning, as `generate` does). With a tokenizer the row streams its text (whole
        characters, ending before the first of the `stop` strings); `eos_id` ends it (pass
        `engine.eos_id` for the tokenizer's end-of-text).
        """
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the text")
        prompt = self.fit_prompt([int(t) for t in prompt])
        decoder = StreamDecoder(self.tokenizer, stop) if self.tokenizer is not None else None
        return DecodeRow(prompt, max_new_tokens, sampling.temperature, sampling.top_k, sampling.top_p,
                         sampling.seed, eos_id, decoder, tag)

    def fit_prompt(self, prompt: Sequence[int]) -> Sequence[int]:
        """`prompt` (ids, or a `(B, T)` tensor) cut to its last `context_length` tokens, with a
        warning when that drops some. An empty prompt is refused."""
        n = prompt.shape[-1] if isinstance(prompt, torch.Tensor) else len(prompt)
        if n == 0:
            raise ValueError("generate needs a prompt of at least one token")
        ctx = self.context_length
        if n > ctx:
            warnings.warn(f"prompt of {n} tokens is longer than the context length {ctx}; "
                          f"keeping its last {ctx} tokens", stacklevel=3)
            prompt = prompt[..., -ctx:] if isinstance(prompt, torch.Tensor) else prompt[-ctx:]
        return prompt

    @contextlib.contextmanager
    def evaluating(self):
        """The model in eval mode for the block, back in its own mode afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------ lockstep batches
    def _last_logits(self, idx: torch.Tensor, caches, start: int) -> torch.Tensor:
        """`(B, V)` logits of the last position only: decoding needs no more, and on a long
        prompt the LM head of every other position would be most of the prefill's work."""
        return self.model.lm_head(self.model.hidden_states(idx, caches, start)[:, -1])

    @torch.inference_mode()
    def steps(self, idx: torch.Tensor, max_new_tokens: int, sampling: Sampling = GREEDY,
              eos_id: int | Sequence[int] | None = None, use_cache: bool = True,
              context_shift: bool = False) -> Iterator[torch.Tensor]:
        """Yield `(B,)` new token ids for the `(B, T)` prompts `idx`, one step at a time.

        A row that has produced `eos_id` keeps yielding `eos_id` (padding) until every row is
        done, then the loop stops; so stopping works at any batch size. Past the context
        window each step re-encodes the last `context_length` tokens, or with
        `context_shift` the newest half of them once per half window (see above).
        """
        if idx.dim() == 1:
            idx = idx.unsqueeze(0)
        idx = self.fit_prompt(idx)
        model, ctx = self.model, self.context_length
        generator = sampling.generator(idx.device)
        eos = None
        if eos_id is not None:
            eos = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=idx.device)
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)

        # sized for this call, not the whole context: a 128k-token model would otherwise
        # allocate gigabytes for a short reply (the window slides only once ctx is reached)
        caches = model.make_kv_caches(idx.shape[0], min(ctx, idx.shape[1] + max_new_tokens)) if use_cache else None
        seq = idx
        logits = self._last_logits(seq, caches, 0)  # prefill: (B, V)
        for _ in range(max_new_tokens):
            nxt = sampling.pick(logits, generator)  # (B,)
            if eos is not None:
                nxt = torch.where(done, eos[0], nxt)
                done = done | torch.isin(nxt, eos)
            yield nxt
            if eos is not None and bool(done.all()):
                return
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            if seq.shape[1] > ctx:  # slide the window: positions change, recompute it
                seq = seq[:, -(shifted_window(ctx) if context_shift else ctx):]
                logits = self._last_logits(seq, caches, 0)
            elif use_cache:
                logits = self._last_logits(nxt[:, None], caches, seq.shape[1] - 1)
            else:
                logits = self._last_logits(seq, None, 0)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, sampling: Sampling = GREEDY,
                 eos_id: int | Sequence[int] | None = None, use_cache: bool = True,
                 context_shift: bool = False) -> torch.Tensor:
        """`(B, T' + n)` ids: the prompts `idx` (cut to the context window) followed by up to
        `max_new_tokens` new tokens (`steps`; rows finished at `eos_id` padded with it)."""
        if idx.dim() == 1:
            idx = idx.unsqueeze(0)
        with self.evaluating():
            new = list(self.steps(idx, max_new_tokens, sampling, eos_id, use_cache, context_shift))
        prompt = idx[:, -self.context_length:]
        if not new:
            return prompt.clone()
        return torch.cat([prompt, torch.stack(new, dim=1)], dim=1)

    def stream(self, row: DecodeRow, context_shift: bool = False) -> Iterator[str]:
        """Decode `row` alone (batch size 1), yielding the text piece of every token.

        A piece is "" while the row's decoder holds text back (half a character, the
        possible start of a stop string), so a caller can act between tokens. Afterwards
        `row.tokens` and `row.finish_reason` tell what it produced and why it ended. The
        model is used as it is (call inside `evaluating` for eval mode).
        """
        if row.finish_empty():
            return
        idx = torch.tensor([row.prompt], dtype=torch.long, device=self.device)
        steps = self.steps(idx, row.max_new_tokens, row.sampling, context_shift=context_shift)
        try:
            for tok in steps:
                yield row.push(int(tok[0]))
                if row.done:
                    break
        finally:
            steps.close()  # frees the KV cache now, also when the caller stops early

    # ------------------------------------------------------------------ ragged batches
    def batch(self, max_rows: int, prefill_chunk: int | None = PREFILL_CHUNK,
              context_shift: bool = False) -> BatchDecoder:
        """A `BatchDecoder` of `max_rows` slots on this model, for a caller that feeds rows
        as they come (the server's scheduler); prompts longer than `prefill_chunk` tokens
        are prefilled that many tokens per step (None or 0: in one pass); `context_shift`:
        see above."""
        return BatchDecoder(self.model, max_rows, prefill_chunk, context_shift)

    def decode(self, rows: Sequence[DecodeRow], batch_size: int | None = None,
               prefill_chunk: int | None = PREFILL_CHUNK, context_shift: bool = False
               ) -> Iterator[tuple[DecodeRow, int, str]]:
        """Decode `rows` with at most `batch_size` at once (default: all), yielding
        `BatchDecoder.step`'s `(row, token, piece)` events; a finished row's slot goes to the
        next waiting row (`prefill_chunk`: see `batch`)."""
        waiting = list(rows)
        dec = self.batch(max(1, min(batch_size or len(waiting), len(waiting))), prefill_chunk, context_shift)
        while waiting or dec.active:
            take = min(dec.free, len(waiting))
            if take:
                dec.add(waiting[:take])
                waiting = waiting[take:]
            if dec.active:
                yield from dec.step()

    def run(self, rows: Sequence[DecodeRow], batch_size: int | None = None,
            on_done: Callable[[DecodeRow], None] | None = None,
            prefill_chunk: int | None = PREFILL_CHUNK, context_shift: bool = False) -> list[DecodeRow]:
        """`decode` `rows` to the end in eval mode, calling `on_done` as each one finishes;
        returns the rows (with their `tokens`, `finish_reason` and `text`)."""
        with self.evaluating():
            for row, _, _ in self.decode(rows, batch_size, prefill_chunk, context_shift):
                if row.done and on_done is not None:
                    on_done(row)
        return list(rows)
