"""The serving engine: one model, a bounded pool of generation slots, a fair queue.

Generation is blocking PyTorch work, so it never runs on the event loop: each admitted
request gets a worker thread that runs `generate.stream_decode` and hands text pieces back
to the loop through an `asyncio.Queue`. At most `max_concurrency` generations run at once;
the others wait in a first-come-first-served queue (`FairLimiter`). A client that
disconnects, while queued or mid-stream, cancels its generation, and the slot is freed
when the worker has really stopped, so the bound always reflects actual work.

Requests are not batched together: the model has learned absolute positions and no
padding mask, so rows of different lengths cannot share one forward pass without changing
their results; concurrency comes from the bounded pool of workers instead.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Literal

from ..errors import UserError
from ..generate import stream_decode
from ..prompts import normalize_template, template_for
from ..streaming import StreamDecoder
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

    async def acquire(self) -> None:
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
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


@dataclass
class SamplingParams:
    """What one request asks of the decoder (already validated)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Event:
    """One message from a worker thread: a text piece, the end, or a failure."""

    kind: Literal["text", "done", "error"]
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0


class Engine:
    """A model and tokenizer plus the machinery to run generations off the event loop.

    Args:
        model / tokenizer: what `load_model` returns.
        model_id: the name clients use in `"model"`.
        template: chat template (`"alpaca"`, `"phi3"`, `"plain"`/None).
        max_concurrency: generations running at once; further requests queue fairly.
        max_tokens_limit: the largest `max_tokens` a request may ask for.
    """

    def __init__(self, model, tokenizer, model_id: str, template: str | None = None,
                 max_concurrency: int = 4, max_tokens_limit: int = 1024):
        if max_tokens_limit < 1:
            raise UserError(f"max tokens limit must be at least 1, got {max_tokens_limit}")
        if max_concurrency < 1:
            raise UserError(f"max concurrency must be at least 1, got {max_concurrency}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.template = normalize_template(template)
        self.max_concurrency = max_concurrency
        self.max_tokens_limit = max_tokens_limit
        self.context_length = model.config.context_length
        self.vocab_size = model.config.vocab_size
        self.device = next(model.parameters()).device
        try:
            self.eos_id: int | None = tokenizer.eot_id
        except UserError:
            self.eos_id = None  # a word-level tokenizer without <|endoftext|>: length only
        self.created = int(time.time())
        # made by startup(), on the serving loop: an asyncio object belongs to one loop
        self.limiter: FairLimiter | None = None
        self.executor: ThreadPoolExecutor | None = None
        self._cancel_all = threading.Event()

    def startup(self) -> None:
        """Called on the serving event loop before the first request."""
        self.limiter = FairLimiter(self.max_concurrency)
        # one worker per slot: an admitted request never waits for a thread
        self.executor = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="llmscratch-gen")
        self._cancel_all.clear()

    def shutdown(self) -> None:
        """Stop every running generation (they check between tokens) and the workers."""
        self._cancel_all.set()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -------------------------------------------------------------- one generation
    def _generate(self, ids: list[int], p: SamplingParams, emit, cancelled: threading.Event) -> None:
        """Worker thread: decode up to `p.max_tokens` tokens, `emit`ting Events as text firms up."""
        decoder = StreamDecoder(self.tokenizer, p.stop, self.eos_id)
        try:
            pieces = stream_decode(self.model, decoder, ids, p.max_tokens, p.temperature, p.top_k, p.top_p,
                                   p.seed, self.device)
            finish = None
            for piece in pieces:  # one per token: cancellation is checked between tokens
                if cancelled.is_set() or self._cancel_all.is_set():
                    finish = "cancelled"
                    pieces.close()
                    break
                if piece:
                    emit(Event("text", piece))
            finish = finish or decoder.finish_reason or "length"
            emit(Event("done", finish_reason=finish, completion_tokens=decoder.n_tokens))
        except Exception as e:  # reported to the client as a 500; the server keeps serving
            log.exception("generation failed")
            emit(Event("error", text=f"generation failed: {type(e).__name__}: {e}"))

    async def run(self, ids: list[int], p: SamplingParams, is_disconnected) -> AsyncIterator[Event]:
        """Queue for a slot, then generate in a worker thread, yielding its Events.

        Args:
            ids: prompt token ids (already checked against the context length).
            p: sampling parameters.
            is_disconnected: an async callable; when it returns true the generation is
                cancelled (checked while queued and between pieces).

        Leaving the iteration early (the client went away, or the task was cancelled)
        cancels the generation; its slot frees once the worker has stopped.
        """
        if self.limiter is None or self.executor is None:
            raise RuntimeError("Engine.startup() was not called (create_app's lifespan calls it)")
        loop = asyncio.get_running_loop()
        await self._acquire(is_disconnected)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # the loop is closed: the server is going down
                cancelled.set()

        try:
            fut = loop.run_in_executor(self.executor, self._generate, ids, p, emit, cancelled)
        except RuntimeError:  # the executor was shut down
            self.limiter.release()
            raise APIError(503, "the server is shutting down", "server_error") from None
        fut.add_done_callback(lambda _: self.limiter.release())
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await is_disconnected():
                        raise ClientGone() from None
                    continue
                yield ev
                if ev.kind != "text":
                    return
        finally:
            cancelled.set()  # no-op if the worker already finished

    async def _acquire(self, is_disconnected) -> None:
        """Wait for a slot, giving up if the client disconnects while queued."""
        task = asyncio.ensure_future(self.limiter.acquire())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    task.result()
                    return
                if await is_disconnected():
                    raise ClientGone()
        except BaseException:
            if not task.done():
                task.cancel()  # leaves the queue; FairLimiter passes on a slot that just arrived
                try:
                    await task
                except asyncio.CancelledError:
                    pass
            elif not task.cancelled() and task.exception() is None:
                self.limiter.release()  # admitted just as we were cancelled: give it back
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
                max_tokens_limit: int = 1024, kernels: bool = True) -> Engine:
    """Load `model` (run folder, Hugging Face GPT-2 folder or preset) into an `Engine`,
    with the speed kernels applied unless `kernels=False` (`load_model`).

    The chat template follows `prompts.template_for`, as `chat` does: `template` if given,
    else the run folder's recorded one, else the plain-LM transcript.
    """
    from ..checkpoint import load_model
    from ..utils import pick_device

    device = pick_device(device)
    net, tokenizer = load_model(model, device=device, dtype=dtype, kernels=kernels)
    chosen = template_for(model, template).name
    name = model_name or (Path(model).name if Path(model).is_dir() else model)
    return Engine(net, tokenizer, name or "model", chosen, max_concurrency, max_tokens_limit)
