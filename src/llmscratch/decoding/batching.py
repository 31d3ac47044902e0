"""Ragged batches: prompts of different lengths decoded together, rows joining and leaving.

`engine.Engine.steps` decodes a rectangular batch: every row starts together and has the
same length. Real traffic is ragged: prompts differ in length, replies end at different
times, and new requests arrive while others are half done. `BatchDecoder` decodes such a
batch one token boundary at a time: `add` prefills newcomers, `step` samples one token for
every row, retires the rows that finished and runs one joint forward pass for the others.
`Engine.decode` runs a list of rows through it (a `batch_size` bound turns it into
continuous batching: a finished row's place goes to the next row at once); the server's
scheduler (`serve.engine`) feeds it requests as they arrive.

Each row's output equals decoding its prompt alone (greedy: the same tokens; sampled with a
seed: the same tokens as `generate` with that seed), because

- rows are left-aligned to a shared cursor: all rows' newest tokens sit in the same KV-cache
  column, so one decode step writes one column for everyone; a row's own tokens occupy the
  columns `[start, cursor)` and a key mask (False before `start`) hides the rest — other
  requests' stale keys, padding — from its queries;
- each token's position is its place in its own row (`cursor - start`), not the column, so
  learned and rotary position embeddings see what they would see alone;
- every row samples with its own settings and its own seeded generator.

The KV cache is slot-based: one cache of `max_rows` rows, made once and reused by every
request that comes through. Live rows are kept packed at the front (a row that finishes is
replaced by the last live row, one row's copy), so a step's forward pass uses a view of the
first `n` rows, never a gather. The cache starts with `INITIAL_COLUMNS` columns. When the
cursor reaches its end, the columns before the oldest live row's start are dropped (one
shift of the live rows) if that frees a quarter of them; otherwise the columns double, up
to the context length (a copy, a handful of times in a decoder's life): memory follows
the longest live row, not the context. A row that alone fills the whole context slides its
window as `generate` does (each further token recomputes its last `context_length`
tokens, outside the joint pass).

Chunked prefill: a prompt longer than `prefill_chunk` tokens (256 by default) is not
prefilled in one pass, which would stall every running row for the whole prompt; it is
encoded `prefill_chunk` tokens per `step` into a private one-row cache, between the running
rows' decode passes, and joins the batch (its keys and values copied into its slot, where
`add` would have written them) once the whole prompt is in. Its tokens are those of the
unchunked prefill: the same positions and the same causal attention, computed in pieces.

Context shift (`context_shift=True`, opt-in): a row that fills the context drops the oldest
half of its window once, re-encodes the rest into its own cache, and decodes cached from
there until the window is full again (llama.cpp's context shift) — one pass of half a window
every half window of tokens, instead of a whole window per token. It changes the tokens past
the window (each sees between half and all of the window, not always all of it), the same
way in `Engine.steps`, so batched and single decoding still agree.

Why slots and not
pages: on a CPU with a few dozen rows, a contiguous per-row cache is what
`scaled_dot_product_attention` reads fastest and needs no gather or block table; its cost
is that every slot reserves as many columns as the longest live row needs (at most
`kv_bytes_per_row`), which paging would share between short rows — worth it on a GPU with
hundreds of rows, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..models.attention import KVCache
from ..models.gpt import kv_cache_bytes
from .sampling import Sampling
from .streaming import StreamDecoder


@dataclass(eq=False)
class DecodeRow:
    """One sequence to continue, with its own settings, and what decoding it produced.

    Args:
        prompt: token ids (1 to `context_length` of them).
        max_new_tokens: the most tokens to add.
        temperature / top_k / top_p / seed: the row's `sampling.Sampling` (checked when
            the row is made, so a bad row never fails a shared batch); seeded, the row has
            its own generator (the same tokens as `generate` with this seed).
        eos_id: ends the row when produced (an id or several); the id is kept in `tokens`
            but never decoded into text.
        decoder: a `StreamDecoder` the other tokens are pushed to: its stop strings end the
            row, and `step` reports the text pieces it releases.
        tag: anything the caller wants to find the row by (the server's request).

    Filled in by decoding: `tokens` (the new ids) and `finish_reason`, the one signal of how
    a row ended: "stop" (eos or a stop string), "length" (`max_new_tokens` reached),
    "cancelled" or "error" (set by whoever took the row out).
    """

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_id: int | Sequence[int] | None = None
    decoder: StreamDecoder | None = None
    tag: Any = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None  # with finish_reason "error" from `step`: what failed

    def __post_init__(self):
        # checked here, not at the first token: a bad row must never fail a shared batch
        self.sampling = Sampling(self.temperature, self.top_k, self.top_p, self.seed)
        self.prompt = [int(t) for t in self.prompt]
        eos = self.eos_id
        self._eos = set() if eos is None else ({int(eos)} if isinstance(eos, int) else {int(e) for e in eos})
        self._generator: torch.Generator | None = None
        self._logits: torch.Tensor | None = None  # (1, V): the next token's, once prefilled
        self._ids: list[int] = list(self.prompt)  # prompt + new tokens (for a sliding window)
        self._pieces: list[str] = []

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def n_tokens(self) -> int:
        """The reply's length in tokens (its usage count): `tokens` without a final eos."""
        return len(self.tokens) - bool(self.tokens and self.tokens[-1] in self._eos)

    @property
    def text(self) -> str:
        """The reply's text so far (with a `decoder`): the pieces released, which end before
        a stop string."""
        return "".join(self._pieces)

    def finish_empty(self) -> bool:
        """Finish a row asked for no tokens at all ("length"); return whether it is done."""
        if self.max_new_tokens <= 0 and self.finish_reason is None:
            self.finish_reason = "length"
        return self.done

    def push(self, token: int) -> str:
        """Record a sampled token; return the text it released; finish the row if it ends it."""
        self.tokens.append(token)
        self._ids.append(token)
        piece = ""
        if token in self._eos:
            self.finish_reason = "stop"
        elif self.decoder is not None:
            piece = self.decoder.push(token)
            if self.decoder.stopped:
                self.finish_reason = "stop"
        if self.finish_reason is None and len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None and self.decoder is not None:
            piece += self.decoder.flush()
        if piece:
            self._pieces.append(piece)
        return piece


class _RowsView:
    """Rows `lo:hi` of one layer's `KVCache`: the same storage, written in place by the
    layer's own `KVCache.update` rule."""

    update = KVCache.update

    def __init__(self, cache: KVCache, lo: int, hi: int):
        self.k, self.v = cache.k[lo:hi], cache.v[lo:hi]


def kv_bytes_per_row(model, dtype: torch.dtype | None = None) -> int:
    """Bytes of KV cache one row (one slot) takes at most: every layer's keys and values for
    the whole context (`model.kv_cache_bytes` of the shape; 72 MiB for GPT-2 124M in fp32:
    12 layers x 2 x 1024 positions x 768 x 4 bytes)."""
    dtype = dtype or next(model.parameters()).dtype
    cfg = model.config
    return kv_cache_bytes(cfg, cfg.context_length, 1, torch.empty((), dtype=dtype).element_size())


INITIAL_COLUMNS = 128
"""Cache columns a `BatchDecoder` starts with; it doubles them as rows grow longer."""

def shifted_window(ctx: int) -> int:
    """Tokens a context shift keeps of a full window of `ctx` (the newest half, rounded up)."""
    return ctx - ctx // 2


PREFILL_CHUNK = 256
"""Prompt tokens a `BatchDecoder` encodes per step for a prompt that joins a running batch
(a longer prompt is prefilled in chunks between decode steps); None or 0 turns it off."""


@dataclass(eq=False)
class _Prefill:
    """A long prompt being encoded chunk by chunk into its own one-row cache."""

    row: DecodeRow
    caches: list
    done: int = 0  # prompt tokens encoded so far


class BatchDecoder:
    """Decode up to `max_rows` rows as one batch; rows join (`add`) and leave between steps.

    Args:
        model: a `GPT` (or any model with `make_kv_caches`, `hidden_states`, `lm_head` and
            `config.context_length`), in eval mode.
        max_rows: the slots: rows decoded at once (the cache is allocated for this many).
        prefill_chunk: a prompt longer than this is prefilled this many tokens per `step`,
            between the running rows' decode passes (`PREFILL_CHUNK`; None or 0: in one pass).
        context_shift: a row past the context window drops the oldest half of it and decodes
            cached (`shifted_window`) instead of re-encoding the whole window every token;
            changes the tokens past the window (off by default).

    Not thread-safe: one thread drives it (the server's scheduler thread).
    """

    def __init__(self, model, max_rows: int, prefill_chunk: int | None = PREFILL_CHUNK,
                 context_shift: bool = False):
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        if prefill_chunk is not None and prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0 (0 = off), got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk or None
        self.context_shift = context_shift
        self.model = model
        self.max_rows = max_rows
        self.ctx = model.config.context_length
        self.device = next(model.parameters()).device
        self.capacity = 0  # cache columns allocated: grown on demand up to the context length
        self.caches = self._new_caches(min(self.ctx, INITIAL_COLUMNS))
        self.rows: list[DecodeRow] = []  # packed: rows[i] lives in cache row i
        self.windowed: list[DecodeRow] = []  # rows that fill the context: recomputed each step
        self.own: dict[DecodeRow, list] = {}  # context shift: a windowed row's [caches, tokens in them]
        self.prefilling: list[_Prefill] = []  # long prompts being encoded a chunk per step
        self.starts = [0] * max_rows  # first cache column of each packed row
        self.pos = 0  # the shared cursor: the next column every packed row writes

    # ------------------------------------------------------------------ bookkeeping
    @torch.inference_mode()
    def _new_caches(self, columns: int) -> list:
        caches = self.model.make_kv_caches(self.max_rows, columns)
        for c in caches:
            # Masked-off columns are still multiplied by a zero weight, and uninitialized
            # memory may hold NaN (NaN * 0 = NaN): start from zeros. Later stale columns
            # (other rows' old keys, padding) are finite.
            c.k.zero_()
            c.v.zero_()
        self.capacity = columns
        return caches

    def _reserve(self, columns: int) -> None:
        """Make sure the cache has `columns` columns: double it (up to the context length)
        and copy the live rows over when it has not."""
        if columns <= self.capacity:
            return
        old, n = self.caches, len(self.rows)
        self.caches = self._new_caches(min(self.ctx, max(columns, 2 * self.capacity)))
        for o, c in zip(old, self.caches):
            c.k[:n, :, : self.pos] = o.k[:n, :, : self.pos]
            c.v[:n, :, : self.pos] = o.v[:n, :, : self.pos]

    @property
    def active(self) -> int:
        """Rows being decoded (slots in use)."""
        return len(self.rows) + len(self.windowed) + len(self.prefilling)

    @property
    def free(self) -> int:
        return self.max_rows - self.active

    def _move(self, dst: int, src: int) -> None:
        """Copy packed row `src`'s cache into row `dst`."""
        for c in self.caches:
            c.k[dst, :, : self.pos] = c.k[src, :, : self.pos]
            c.v[dst, :, : self.pos] = c.v[src, :, : self.pos]
        self.starts[dst] = self.starts[src]
        self.rows[dst] = self.rows[src]

    def _remove(self, i: int) -> DecodeRow:
        """Take packed row `i` out, filling its place with the last packed row."""
        row, last = self.rows[i], len(self.rows) - 1
        if i != last:
            self._move(i, last)
        self.rows.pop()
        if not self.rows:
            self.pos = 0
        return row

    def _shift(self, d: int) -> None:
        """Move every packed row's columns by `d` (right if positive, left if negative)."""
        n, pos = len(self.rows), self.pos
        lo = max(0, -d)  # columns before `lo` are dropped when shifting left
        for c in self.caches:
            for buf in (c.k, c.v):
                buf[:n, :, lo + d: pos + d] = buf[:n, :, lo:pos].clone()
        for i in range(n):
            self.starts[i] += d
        self.pos += d

    def _make_room(self) -> None:
        """The cursor is at the end of the allocated columns: shift the rows left to the
        oldest live start if that frees enough, else grow the cache; at the end of the
        context, rows that fill all of it slide their window from now on."""
        if self.capacity < self.ctx and min(self.starts[: len(self.rows)]) < max(1, self.capacity // 4):
            self._reserve(self.pos + 1)
            return
        if self.pos == self.ctx:
            for i in reversed(range(len(self.rows))):
                if self.starts[i] == 0:
                    self.windowed.append(self._remove(i))
        if self.rows:
            self._shift(-min(self.starts[: len(self.rows)]))

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def add(self, new: Sequence[DecodeRow]) -> None:
        """Prefill `new` rows (one forward pass, left-padded) so that the next `step`
        samples their first tokens. Rows with `max_new_tokens <= 0` finish at once. A prompt
        longer than `prefill_chunk` is only queued here: the coming steps encode it a chunk
        at a time, and the step after its last chunk samples its first token."""
        new = [r for r in new if not r.finish_empty()]
        if not new:
            return
        if len(new) > self.free:
            raise ValueError(f"{len(new)} new rows but only {self.free} free slots")
        for r in new:
            if not 1 <= len(r.prompt) <= self.ctx:
                raise ValueError(f"a prompt must have 1 to {self.ctx} tokens, got {len(r.prompt)}")
        chunk = self.prefill_chunk
        for r in new:
            if chunk is not None and len(r.prompt) > chunk:
                self.prefilling.append(_Prefill(r, self.model.make_kv_caches(1, len(r.prompt))))
        new = [r for r in new if chunk is None or len(r.prompt) <= chunk]
        if new:
            self._prefill_together(new)

    def _prefill_together(self, new: list[DecodeRow]) -> None:
        """One left-padded forward pass for `new` rows, written into their slots."""
        width = max(len(r.prompt) for r in new)
        n, pos = self._slots_for(width)
        k = len(new)
        idx = torch.zeros(k, width, dtype=torch.long)
        for i, r in enumerate(new):
            idx[i, width - len(r.prompt):] = torch.tensor(r.prompt)
            self.starts[n + i] = pos - len(r.prompt)
        starts = torch.tensor(self.starts[n: n + k])
        positions = key_mask = None
        if pos != width or any(len(r.prompt) != width for r in new):
            key_mask = torch.arange(pos)[None, :] >= starts[:, None]  # (k, pos)
            positions = (torch.arange(pos - width, pos)[None, :] - starts[:, None]).clamp(min=0)
            key_mask, positions = key_mask.to(self.device), positions.to(self.device)
        views = [_RowsView(c, n, n + k) for c in self.caches]
        hidden = self.model.hidden_states(idx.to(self.device), views, pos - width, positions, key_mask)
        logits = self.model.lm_head(hidden[:, -1])  # (k, V)
        for i, r in enumerate(new):
            self._admit(r, logits[i: i + 1])

    def _advance_prefill(self) -> list[tuple[DecodeRow, int, str]]:
        """Encode up to `prefill_chunk` prompt tokens of the queued long prompts (oldest
        first); a prompt encoded to its end joins the batch. Returns an error event for a
        prompt whose pass failed (that row alone ends)."""
        budget, events = self.prefill_chunk, []
        while self.prefilling and budget > 0:
            p = self.prefilling[0]
            prompt = p.row.prompt
            end = min(len(prompt), p.done + budget)
            try:
                idx = torch.tensor([prompt[p.done:end]], device=self.device)
                hidden = self.model.hidden_states(idx, p.caches, p.done)
            except Exception as e:  # this prompt fails alone; the running rows go on
                self.prefilling.pop(0)
                p.row.finish_reason, p.row.error = "error", f"{type(e).__name__}: {e}"
                events.append((p.row, -1, ""))
                continue
            budget -= end - p.done
            p.done = end
            if end == len(prompt):
                self.prefilling.pop(0)
                self._join(p, self.model.lm_head(hidden[:, -1]))
        return events

    def _join(self, p: _Prefill, logits: torch.Tensor) -> None:
        """A fully encoded prompt takes its slot: its keys and values copied to the columns
        `_prefill_together` would have written (`[pos - len, pos)`)."""
        width = len(p.row.prompt)
        n, pos = self._slots_for(width)
        for c, own in zip(self.caches, p.caches):
            c.k[n, :, pos - width: pos] = own.k[0, :, :width]
            c.v[n, :, pos - width: pos] = own.v[0, :, :width]
        self.starts[n] = pos - width
        self._admit(p.row, logits)

    def _slots_for(self, width: int) -> tuple[int, int]:
        """Columns for prompts of up to `width` tokens ending at the shared cursor (the
        packed rows shifted right if it is not that far yet): `(first free slot, cursor)`."""
        if not self.rows:
            self.pos = 0
        self._reserve(max(width, self.pos))
        if width > self.pos:
            self._shift(width - self.pos)
        return len(self.rows), self.pos

    def _admit(self, r: DecodeRow, logits: torch.Tensor) -> None:
        """`r` joins the packed rows, its first token to be sampled from `logits`."""
        r._logits = logits
        r._generator = r.sampling.generator(self.device)
        self.rows.append(r)

    @torch.inference_mode()
    def step(self) -> list[tuple[DecodeRow, int, str]]:
        """Sample one token for every row, retire the rows that finished, run the forward
        pass that gives the others their next logits, then encode the next chunk of the
        long prompts waiting to join (`prefill_chunk`).

        Returns:
            `(row, token, text piece)` for every row, in no particular order; `row.done`
            tells which ones finished with this token (they are no longer in the batch).
            A row whose draw fails ends alone: finish_reason "error", `row.error` saying
            why, token -1 (the other rows go on); so does a long prompt whose chunk
            failed.
        """
        events = []
        for r in self.rows + self.windowed:
            try:
                tok = int(r.sampling.pick(r._logits, r._generator)[0])
            except Exception as e:  # one row's failure must not end the others' requests
                r._logits = None
                r.finish_reason, r.error = "error", f"{type(e).__name__}: {e}"
                events.append((r, -1, ""))
                continue
            r._logits = None
            events.append((r, tok, r.push(tok)))
        for i in reversed(range(len(self.rows))):
            if self.rows[i].done:
                self._remove(i)
        self.windowed = [r for r in self.windowed if not r.done]
        self.own = {r: c for r, c in self.own.items() if not r.done}
        self._forward()
        if self.prefilling:
            events += self._advance_prefill()
        return events

    def cancel(self, row: DecodeRow) -> None:
        """Take `row` out of the batch now (its slot is free for the next `add`)."""
        if row in self.rows:
            with torch.inference_mode():
                self._remove(self.rows.index(row))
        elif row in self.windowed:
            self.windowed.remove(row)
            self.own.pop(row, None)
        else:
            self.prefilling = [p for p in self.prefilling if p.row is not row]
        if row.finish_reason is None:
            row.finish_reason = "cancelled"

    def _forward(self) -> None:
        """Next-token logits of every live row: one joint step for the packed rows (their
        newest token written at the cursor), a window recompute for each windowed one."""
        if self.rows and self.pos == self.capacity:
            self._make_room()
        n = len(self.rows)
        if n:
            pos = self.pos
            idx = torch.tensor([[r._ids[-1]] for r in self.rows], device=self.device)
            starts = self.starts[:n]
            positions = key_mask = None
            if any(starts):  # rows of one length from column 0 need neither
                st = torch.tensor(starts, device=self.device)
                positions = (pos - st)[:, None]
                key_mask = torch.arange(pos + 1, device=self.device)[None, :] >= st[:, None]
            views = [_RowsView(c, 0, n) for c in self.caches]
            hidden = self.model.hidden_states(idx, views, pos, positions, key_mask)
            logits = self.model.lm_head(hidden[:, -1])
            self.pos += 1
            for i, r in enumerate(self.rows):
                r._logits = logits[i: i + 1]
        for r in self.windowed:
            if self.context_shift:
                r._logits = self._shifted_step(r)
                continue
            window = torch.tensor([r._ids[-self.ctx:]], device=self.device)
            r._logits = self.model.lm_head(self.model.hidden_states(window)[:, -1])

    def _shifted_step(self, r: DecodeRow) -> torch.Tensor:
        """A windowed row's next logits with context shift: its newest token appended to its
        own cache, or, when that cache is full, its newest `shifted_window` tokens re-encoded
        from position 0 (what `Engine.steps` does with `context_shift`)."""
        own = self.own.get(r)
        if own is None or own[1] == self.ctx:
            caches = own[0] if own else self.model.make_kv_caches(1, self.ctx)
            keep = shifted_window(self.ctx)
            self.own[r] = own = [caches, keep]
            idx, start = r._ids[-keep:], 0
        else:
            idx, start = r._ids[-1:], own[1]
            own[1] += 1
        hidden = self.model.hidden_states(torch.tensor([idx], device=self.device), own[0], start)
        return self.model.lm_head(hidden[:, -1])
