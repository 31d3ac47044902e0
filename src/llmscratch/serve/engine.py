"""The serving engine: one model, generation slots, a fair queue, continuous batching.

Generation is blocking PyTorch work, so it never runs on the event loop. Requests first
take a slot from `FairLimiter` (first come, first served; at most `max_queue` may wait, a
request beyond that is answered 429 with `Retry-After`), then go to the decoding engine's
ragged batches (`decoding.engine`): scheduler threads (`Scheduler`) take them from one
first-in-first-out inbox and decode them as rows of a `batching.BatchDecoder`. At each token
boundary a scheduler admits the requests that arrived (one prefill pass for the newcomers),
samples one token for every row, streams each row's text to its request, retires the rows
that finished (their slots go to the next requests) and runs one joint decode step for the
rest. Each request's tokens are the ones it would get alone (left-aligned rows with their
own positions and a key mask; its own sampling settings and seeded generator).

- Batched (`max_batch_size > 1`, the default): one scheduler decodes every admitted
  request together in `max_batch_size` rows (continuous batching). The KV cache is
  slot-based: rows allocated once and reused (see `batching` for why slots rather than
  pages, and `kv_bytes_per_row` for the memory). `n > 1` choices are `n` rows of the same
  prompt.
- Unbatched (`max_batch_size == 1`): `max_concurrency` schedulers of one row each, so as
  many requests decode at once, each at batch size 1 in its own thread.

Either way a client that disconnects, while queued or mid-stream, cancels its generation
at the next token boundary, and its slot is released once the decoding has really let go
of it, so the counts always reflect actual work.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from pathlib import Path
from typing import AsyncIterator

from ..decoding import engine as decoding
from ..decoding.batching import PREFILL_CHUNK
from ..decoding.prompts import normalize_template, template_for
from ..errors import UserError
from .scheduler import Event, Job, SamplingParams, Scheduler
from .schemas import APIError

log = logging.getLogger("llmscratch.serve")


class FairLimiter:
    """At most `limit` holders at once; waiters are admitted strictly first come, first served.

    `release` hands the slot directly to the oldest waiter, so a newcomer can never slip in
    ahead of someone already queued (which a plain lock-and-retry scheme allows).
    Must be used from one event loop.
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise UserError(f"max concurrency must be at least 1, got {limit}")
        self.limit = limit
        self.active = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def queued(self) -> int:
        return sum(not f.done() for f in self._waiters)

    def enter(self) -> asyncio.Future:
        """Take a slot now or a place in the queue, without waiting: the future is done
        once the slot is this caller's (at once when one is free). Give it back with
        `leave`, or `release` the slot once it is done."""
        fut = asyncio.get_running_loop().create_future()
        if self.active < self.limit and not self._waiters:
            self.active += 1
            fut.set_result(None)
        else:
            self._waiters.append(fut)
        return fut

    def leave(self, fut: asyncio.Future) -> None:
        """Give up what `enter` gave: the slot if it arrived, else the place in the queue."""
        if fut.done() and not fut.cancelled():
            self.release()
            return
        fut.cancel()
        try:
            self._waiters.remove(fut)
        except ValueError:
            pass

    async def acquire(self) -> None:
        fut = self.enter()
        if fut.done():
            return
        try:
            await fut  # resolved by release(), which passes its slot on (active unchanged)
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot arrived just as we gave up: pass it on
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.active -= 1


class ClientGone(Exception):
    """The client disconnected before its reply was complete."""


class Ticket:
    """A request's admission (`Engine.admit`): its place in the queue, or the slot it holds.

    Taken when the request is checked, before any await, so a burst cannot pass the queue
    check together; `Engine.run` claims it, and `give_back` returns one never claimed (a
    stream whose client left before it started)."""

    def __init__(self, limiter: FairLimiter):
        self.limiter = limiter
        self.place = limiter.enter()
        self.claimed = False

    def give_back(self) -> None:
        if not self.claimed:
            self.claimed = True
            self.limiter.leave(self.place)


class Engine:
    """A model and tokenizer plus the machinery to run generations off the event loop.

    Args:
        model / tokenizer: what `load_model` returns.
        model_id: the name clients use in `"model"`.
        template: chat template (`"alpaca"`, `"phi3"`, `"plain"`/None).
        max_concurrency: without batching (`max_batch_size=1`), generations running at
            once, each in its own one-row scheduler; further requests queue fairly.
        max_tokens_limit: the largest `max_tokens` a request may ask for.
        max_batch_size: rows decoded together by the batching scheduler (the slots; `n`
            choices take `n`); 1 turns batching off.
        max_queue: requests that may wait for a slot; one more is answered 429.
        prefill_chunk: batching, a prompt longer than this is prefilled this many tokens per
            decode step, so the running requests keep getting tokens (0: in one pass).
        context_shift: a request past the context window drops the oldest half of it once
            and decodes cached (`decoding.engine`; changes the tokens past the window).
    """

    def __init__(self, model, tokenizer, model_id: str, template: str | None = None,
                 max_concurrency: int = 4, max_tokens_limit: int = 1024, max_batch_size: int = 32,
                 max_queue: int = 256, prefill_chunk: int = PREFILL_CHUNK, context_shift: bool = False):
        if max_tokens_limit < 1:
            raise UserError(f"max tokens limit must be at least 1, got {max_tokens_limit}")
        if max_concurrency < 1:
            raise UserError(f"max concurrency must be at least 1, got {max_concurrency}")
        if max_batch_size < 1:
            raise UserError(f"max batch size must be at least 1, got {max_batch_size}")
        if max_queue < 0:
            raise UserError(f"max queue must be at least 0, got {max_queue}")
        if prefill_chunk < 0:
            raise UserError(f"prefill chunk must be at least 0 (0 = off), got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.context_shift = context_shift
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.decoding = decoding.Engine(self.model, tokenizer)  # eos_id: None without <|endoftext|>
        self.model_id = model_id
        self.template = normalize_template(template)
        self.max_concurrency = max_concurrency
        self.max_tokens_limit = max_tokens_limit
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batched = max_batch_size > 1
        self.context_length = model.config.context_length
        self.vocab_size = model.config.vocab_size
        self.device = self.decoding.device
        self.eos_id = self.decoding.eos_id
        self.created = int(time.time())
        # made by startup(), on the serving loop: an asyncio object belongs to one loop
        self.limiter: FairLimiter | None = None
        self.schedulers: list[Scheduler] = []
        self.inbox: collections.deque[Job] = collections.deque()  # admitted, not yet decoding
        self.cond = threading.Condition()  # guards inbox and stopping
        self.stopping = False
        self.cancel_all = threading.Event()  # set by shutdown: every scheduler drops its rows
        self._durations: collections.deque[float] = collections.deque(maxlen=64)  # for Retry-After

    @property
    def slots(self) -> int:
        """Requests generating at once: the batch rows, or the unbatched one-row schedulers."""
        return self.max_batch_size if self.batched else self.max_concurrency

    @property
    def scheduler(self) -> Scheduler | None:
        """The continuous-batching scheduler (None unbatched, or before `startup`)."""
        return self.schedulers[0] if self.batched and self.schedulers else None

    @property
    def rows_in_use(self) -> int:
        """Rows being decoded (the KV-cache slots in use); 0 when idle."""
        return sum(s.decoder.active for s in self.schedulers)

    def startup(self) -> None:
        """Called on the serving event loop before the first request."""
        self.limiter = FairLimiter(self.slots)
        self.cancel_all.clear()
        self.stopping = False
        if self.batched:
            self.schedulers = [Scheduler(self, self.max_batch_size, "llmscratch-batch")]
        else:  # one scheduler per slot: an admitted request never waits for a thread
            self.schedulers = [Scheduler(self, 1, f"llmscratch-gen-{i}") for i in range(self.max_concurrency)]
        for s in self.schedulers:
            s.thread.start()

    def shutdown(self) -> None:
        """Stop every running generation (they check between tokens) and the schedulers."""
        self.cancel_all.set()
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        for s in self.schedulers:
            s.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        """Queue an admitted request for the next scheduler with free rows."""
        with self.cond:
            if self.stopping:
                raise RuntimeError("the engine has stopped")
            self.inbox.append(job)
            self.cond.notify_all()

    def check_admission(self, p: SamplingParams) -> None:
        """What `run` would refuse, raised before a response starts (a stream cannot change
        its status later): `n` the engine cannot serve (400), a full queue (429)."""
        self._check_n(p)
        self.check_queue()

    def admit(self, p: SamplingParams) -> Ticket:
        """`check_admission`, then a place in the queue (or a slot) taken at once: checking
        and queueing with no await between them keeps `max_queue` under any burst."""
        self.check_admission(p)
        if self.limiter is None:
            raise RuntimeError("Engine.startup() was not called (create_app's lifespan calls it)")
        return Ticket(self.limiter)

    def _check_n(self, p: SamplingParams) -> None:
        if p.n > 1 and not self.batched:
            raise APIError(400, "n > 1 needs the batching engine (this server runs with --max-batch-size 1)",
                           param="n", code="unsupported_parameter")
        if p.n > self.max_batch_size:
            raise APIError(400, f"n is {p.n}, above this server's batch size of {self.max_batch_size}",
                           param="n", code="invalid_value")

    def check_queue(self) -> None:
        """Answer 429 (with `Retry-After`) when `max_queue` requests already wait for a slot."""
        lim = self.limiter
        if lim is None or (lim.active < lim.limit and not lim.queued) or lim.queued < self.max_queue:
            return
        raise APIError(429, f"The server is busy ({lim.queued} requests waiting); retry after a moment.",
                       type="requests", code="rate_limit_exceeded",
                       headers={"Retry-After": str(self.retry_after())})

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved on: the median recent request time
        times the waves of slots the queue holds, 1 to 60."""
        recent = sorted(self._durations)
        typical = recent[len(recent) // 2] if recent else 1.0
        waves = 1 + (self.limiter.queued if self.limiter else 0) / self.slots
        return int(min(60, max(1, math.ceil(typical * waves))))

    # -------------------------------------------------------------- one generation
    async def run(self, ids: list[int], p: SamplingParams, is_disconnected,
                  ticket: Ticket | None = None) -> AsyncIterator[Event]:
        """Queue for a slot, then generate (rows of a scheduler's batch), yielding the Events:
        text pieces and one "done" per choice, or an "error".

        Args:
            ids: prompt token ids (already checked against the context length).
            p: sampling parameters.
            is_disconnected: an async callable; when it returns true the generation is
                cancelled (checked while queued, and every half second while decoding).
            ticket: the request's `admit`; None takes one now (a 429 if the queue is full).

        Leaving the iteration early (the client went away, or the task was cancelled)
        cancels the generation; its slot frees once its rows have left the batch.
        """
        if self.limiter is None or not self.schedulers:
            raise RuntimeError("Engine.startup() was not called (create_app's lifespan calls it)")
        if ticket is None:
            ticket = self.admit(p)
        ticket.claimed = True
        loop = asyncio.get_running_loop()
        await self._acquire(ticket.place, is_disconnected)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        cancelled = threading.Event()
        t0 = time.monotonic()

        def release() -> None:
            self._durations.append(time.monotonic() - t0)
            self.limiter.release()

        def emit(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # the loop is closed: the server is going down
                cancelled.set()

        try:
            self.submit(Job(ids, p, emit, cancelled, lambda: loop.call_soon_threadsafe(release)))
        except RuntimeError:  # the engine was shut down
            self.limiter.release()
            raise APIError(503, "the server is shutting down", "server_error") from None
        pending = p.n  # choices not finished yet
        checked = time.monotonic()
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    ev = None
                # also while pieces keep coming: a non-streamed reply's client that gave up
                # is only seen by asking
                if ev is None or time.monotonic() - checked > 0.5:
                    checked = time.monotonic()
                    if await is_disconnected():
                        raise ClientGone() from None
                if ev is None:
                    continue
                yield ev
                pending -= ev.kind == "done"
                if ev.kind == "error" or not pending:
                    return
        finally:
            cancelled.set()  # no-op if the generation already finished

    async def _acquire(self, place: asyncio.Future, is_disconnected) -> None:
        """Wait until `place` (`FairLimiter.enter`) holds a slot, giving up if the client
        disconnects while queued."""
        try:
            while not place.done():
                done, _ = await asyncio.wait({place}, timeout=0.5)
                if not done and await is_disconnected():
                    raise ClientGone()
        except BaseException:
            # leaves the queue, or passes on a slot that arrived just as we gave up
            self.limiter.leave(place)
            raise

    # -------------------------------------------------------------- request helpers
    def encode_prompt(self, text: str) -> list[int]:
        """A completion prompt's ids. As in OpenAI's API, "<|endoftext|>" in a raw prompt is
        the document separator; an empty prompt starts a new document."""
        ids = self.tokenizer.encode(text, allowed_special="all")
        return ids or ([self.eos_id] if self.eos_id is not None else ids)

    def check_prompt(self, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, "the prompt is empty (and the tokenizer has no <|endoftext|> to start from)",
                           param=param)
        if len(ids) > self.context_length:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context_length} tokens, but the "
                f"prompt has {len(ids)} tokens. Shorten the prompt (or the conversation).",
                param=param, code="context_length_exceeded",
            )
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})",
                           param=param, code="invalid_value")


def load_engine(model: str, device=None, dtype=None, template: str | None = None,
                model_name: str | None = None, max_concurrency: int = 4,
                max_tokens_limit: int = 1024, kernels: bool = True, max_batch_size: int = 32,
                max_queue: int = 256, prefill_chunk: int = PREFILL_CHUNK, context_shift: bool = False) -> Engine:
    """Load `model` (run folder, Hugging Face GPT-2 folder or preset) into an `Engine`,
    with the speed kernels applied unless `kernels=False` (`load_model`).

    The chat template follows `prompts.template_for`, as `chat` does: `template` if given,
    else the run folder's recorded one, else the plain-LM transcript.
    """
    from ..checkpoints.run import load_model
    from ..utils import pick_device

    device = pick_device(device)
    net, tokenizer = load_model(model, device=device, dtype=dtype, kernels=kernels)
    if net.kind.can("embed"):  # an encoder serves /v1/embeddings (serve/embeddings.py)
        from .embeddings import EncoderEngine

        return EncoderEngine(net, tokenizer, model_name or (Path(model).name if Path(model).is_dir() else model))
    chosen = template_for(model, template).name
    name = model_name or (Path(model).name if Path(model).is_dir() else model)
    engine = Engine(net, tokenizer, name or "model", chosen, max_concurrency, max_tokens_limit,
                    max_batch_size, max_queue, prefill_chunk, context_shift)
    from ..decoding.chat import model_kind, model_note

    # shown by /v1/models and the chat page: "base" and "random" models were never taught to chat
    engine.kind, engine.note = model_kind(model), model_note(model, chosen)
    return engine
