"""Serving: an OpenAI-compatible HTTP API and a web chat page over any model `load_model` reads.

`llmscratch serve --model DIR` (or `serve(...)` / `create_app(...)` from Python) exposes

    GET  /                      a small chat page (static HTML/JS, streams the reply)
    GET  /health                {"status": "ok", "active": ..., "queued": ...}
    GET  /v1/models             the one model served
    POST /v1/completions        continue a prompt
    POST /v1/chat/completions   answer a conversation (the model's prompt template applied)

in the OpenAI wire format, so the `openai` client libraries, `curl` and the page all work.
Request parameters: `max_tokens`, `temperature`, `top_p`, `top_k` (an extension), `stop`
(a string or up to 4), `seed`, `stream` (server-sent events ending in `data: [DONE]`) and
`stream_options.include_usage`. Non-streamed replies carry `usage` token counts.

How a request runs
    Generation is blocking PyTorch work, so it never runs on the event loop: each admitted
    request gets a worker thread that runs `generate_stream` and hands text pieces back to
    the loop through an `asyncio.Queue`. At most `max_concurrency` generations run at once;
    the others wait in a first-come-first-served queue (`FairLimiter`). A client that
    disconnects, while queued or mid-stream, cancels its generation, and the slot is freed
    when the worker has really stopped, so the bound always reflects actual work.
    Requests are not batched together: the model has learned absolute positions and no
    padding mask, so rows of different lengths cannot share one forward pass without
    changing their results; concurrency comes from the bounded pool of workers instead.
    On a CPU, `serve` divides the cores among the workers (`--threads`), because
    oversubscribed intra-op thread teams make batch-1 decoding many times slower.

Chat prompts
    `format_chat` / `encode_chat` lay the messages out with the template named by the run
    folder's `config.json` key `"template"` (written by `finetune instruct`), token for
    token as fine-tuning trained the model: `"alpaca"` (the LLMs-from-scratch book's
    Instruction/Input/Response format) or `"phi3"` (`<|user|>` / `<|assistant|>`), each
    earlier reply closed by <|endoftext|>. A model without a template (a pretrained or
    converted GPT-2) gets the plain-LM fallback, a transcript `"User: ...\\nAssistant:"`.
    Each template also has stop strings that end the reply where the model starts writing
    the user's next turn itself.

Errors
    Bad requests get OpenAI's error body `{"error": {"message", "type", "param", "code"}}`:
    400 for malformed JSON, wrong types or values, `max_tokens` over the server's limit and
    a prompt longer than the model's context window (prompts are not silently truncated);
    401 for a missing or wrong API key; 404 for an unknown model name or path. The prompt
    plus the reply may exceed the context window: generation then slides the window, as
    `generate` does. Any unexpected failure answers 500 and the server keeps running.

Security
    The default bind address is 127.0.0.1. With an API key (`--api-key` or the environment
    variable `LLMSCRATCH_API_KEY`) every API endpoint and `/health` require
    `Authorization: Bearer KEY`. The chat page itself (`GET /`) is static code holding no
    data, and a browser cannot attach that header to a page load, so it is served without
    the key; it asks for the key and sends it with every API call.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Literal, Mapping

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import UserError
from .generate import generate_stream

log = logging.getLogger("llmscratch.serve")

API_KEY_ENV = "LLMSCRATCH_API_KEY"
"""Environment variable read for the API key when `--api-key` is not given."""

DEFAULT_MAX_TOKENS_COMPLETION = 16
"""`max_tokens` when a completion request gives none (OpenAI's default for /v1/completions)."""

DEFAULT_MAX_TOKENS_CHAT = 256
"""`max_tokens` when a chat request gives none (capped by the server's limit)."""

MAX_BODY_BYTES = 4 * 2**20
"""Largest request body accepted; a bigger one is answered 413 before any tokenizing."""

# ---------------------------------------------------------------------- prompt templates

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)

TEMPLATES = ("alpaca", "phi3", "plain")
"""Chat templates `format_chat` knows. `"plain"` is the fallback for models without one."""

_TEMPLATE_ALIASES = {"phi-3": "phi3", "none": "plain", "": "plain"}


@dataclass(frozen=True)
class _Layout:
    """How one template lays a conversation out (the same layout instruction fine-tuning
    trains on, `finetune.instruct.TEMPLATES`: a reply there ends in <|endoftext|>)."""

    default_system: str
    system_fmt: str  # {system}
    user_fmt: str  # {content}{input}; ends with the cue that the assistant speaks next
    input_fmt: str  # {input}
    reply_fmt: str  # {content}
    reply_ends_with_eot: bool
    stops: tuple[str, ...]  # where the model would start writing the user's next turn


_LAYOUTS = {
    "alpaca": _Layout(ALPACA_PREAMBLE, "{system}\n\n", "### Instruction:\n{content}{input}\n\n### Response:\n",
                      "\n\n### Input:\n{input}", "{content}", True,
                      ("### Instruction:", "### Input:", "### Response:")),
    "phi3": _Layout("", "<|system|>\n{system}\n", "<|user|>\n{content}{input}\n<|assistant|>\n",
                    "\n{input}", "{content}", True, ("<|user|>", "<|system|>", "<|end|>")),
    # A base language model has seen no chat format; a transcript is the most natural one.
    # <|endoftext|> would mean "a new document" to it, so turns end with a newline instead.
    "plain": _Layout("", "{system}\n", "User: {content}{input}\nAssistant:", "\n{input}", " {content}\n", False,
                     ("\nUser:",)),
}


def normalize_template(template: str | None) -> str:
    """`"alpaca"`, `"phi3"` or `"plain"` for a template name (None means plain).

    Raises:
        UserError: an unknown name.
    """
    name = (template or "").strip().lower()
    name = _TEMPLATE_ALIASES.get(name, name)
    if name not in TEMPLATES:
        raise UserError(f"unknown prompt template {template!r}; serve supports: {', '.join(TEMPLATES)}")
    return name


def _field(message: Any, key: str, default: Any = None) -> Any:
    """`message[key]` for a dict, `message.key` for an object (pydantic messages)."""
    if isinstance(message, Mapping):
        return message.get(key, default)
    return getattr(message, key, default)


def _chat_segments(messages: Iterable[Any], template: str | None) -> list[str | None]:
    """The conversation as text segments, with None where an <|endoftext|> token goes.

    Segments are tokenized separately, and BPE merges differ across a boundary ("\n\n###"
    is not "\n\n" + "###"), so the cut points follow fine-tuning's `encode_conversation`:
    the system text joins the first user turn, and each reply is a segment of its own.
    """
    layout = _LAYOUTS[normalize_template(template)]
    messages = list(messages)
    system_parts = [str(_field(m, "content") or "") for m in messages
                    if _field(m, "role") in ("system", "developer")]
    system = "\n\n".join(system_parts) if system_parts else layout.default_system
    pending = layout.system_fmt.format(system=system) if system else ""
    out: list[str | None] = []
    for m in messages:
        role, content = _field(m, "role"), str(_field(m, "content") or "")
        if role == "user":
            extra = _field(m, "input") or ""
            extra = layout.input_fmt.format(input=extra) if extra.strip() else ""
            out.append(pending + layout.user_fmt.format(content=content, input=extra))
            pending = ""
        elif role == "assistant":
            out.append(layout.reply_fmt.format(content=content))
            if layout.reply_ends_with_eot:
                out.append(None)
    return [pending] + out if pending else out  # (no user turn: the system text leads)


def format_chat(messages: Iterable[Any], template: str | None = None) -> str:
    """Render a conversation as the prompt text the model continues.

    Args:
        messages: dicts (or objects) with `role` ("system", "developer", "user" or
            "assistant") and `content` (a string). A user message may also carry an
            `input` field: the Alpaca `### Input:` section.
        template: `"alpaca"`, `"phi3"`, or None / `"plain"` for a model without one.

    Returns:
        The prompt, ending where the assistant's reply begins. Single turn:

        - alpaca (the LLMs-from-scratch book's format): `"Below is an instruction that
          describes a task. Write a response that appropriately completes the request."`
          `"\\n\\n### Instruction:\\n{user}"` [`"\\n\\n### Input:\\n{input}"`]
          `"\\n\\n### Response:\\n"`. A system message replaces the preamble.
        - phi3: [`"<|system|>\\n{system}\\n"`] `"<|user|>\\n{user}\\n<|assistant|>\\n"`.
        - plain (fallback for models without a template): [`"{system}\\n"`]
          `"User: {user}\\nAssistant:"`, earlier turns as `"Assistant: {reply}\\n"`.

        Earlier turns repeat the user part with the reply after it. In alpaca and phi3 a
        reply ends with `<|endoftext|>`, as instruction fine-tuning trains the model; the
        text shows it as `"<|endoftext|>"`, the server inserts the token itself
        (`encode_chat`), so a user who types that string cannot forge a turn boundary.
    """
    return "".join("<|endoftext|>" if s is None else s for s in _chat_segments(messages, template))


def encode_chat(tokenizer, messages: Iterable[Any], template: str | None = None) -> list[int]:
    """The token ids of `format_chat(messages, template)`: text encoded with special tokens
    off, the end-of-text token inserted between turns."""
    ids: list[int] = []
    for seg in _chat_segments(messages, template):
        ids.extend([tokenizer.eot_id] if seg is None else tokenizer.encode(seg, allowed_special="none"))
    return ids


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """One Alpaca-style prompt, exactly as the LLMs-from-scratch book formats it.

    Example:
        `alpaca_prompt("Name a colour.")` ->
        "Below is an instruction ...\\n\\n### Instruction:\\nName a colour.\\n\\n### Response:\\n"
    """
    return format_chat([{"role": "user", "content": instruction, "input": input_text}], "alpaca")


def template_stops(template: str | None) -> list[str]:
    """The stop strings a chat reply in `template` ends at (besides <|endoftext|>)."""
    return list(_LAYOUTS[normalize_template(template)].stops)


def read_template(model: str | os.PathLike) -> str | None:
    """The prompt template recorded in a run folder's `config.json` (key `"template"`,
    written by `finetune instruct`), if any."""
    cfg_file = Path(model) / "config.json"
    if not cfg_file.is_file():
        return None  # a preset name: a plain language model
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # load_model reports a broken config.json with the details
    value = cfg.get("template") if isinstance(cfg, dict) else None
    return value if isinstance(value, str) else None


# ------------------------------------------------------------------ incremental decoding

class TextAssembler:
    """Turns generated token ids into text pieces, honouring stop strings.

    A byte-level BPE token can end inside a UTF-8 character, and a stop string can arrive
    split over several tokens, so a piece is released only when it can no longer change:
    text that could still become the start of a stop string is held back until the next
    token decides. When a stop string completes, the text before it is released and
    `stopped` turns true.

    Example (stop "\\n\\n"): tokens "Hi", "\\n", "\\n", "more" -> pieces "Hi", "", then stop.
    """

    def __init__(self, tokenizer, stop: Iterable[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of self.text already released
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that became final (maybe "")."""
        self.ids.append(token)
        # Decoding the whole reply each step keeps multi-token characters right; replies are
        # at most a few thousand tokens and tiktoken decodes them in microseconds.
        self.text = self.tokenizer.decode(self.ids)
        if self.text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 character: wait for the rest of it
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits))
        return self._release(len(self.text) - self._held_back())

    def flush(self) -> str:
        """Release whatever is still held back (generation ended without a stop string)."""
        if self.stopped:
            return ""
        return self._release(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of the unreleased text that begins a stop string."""
        tail = self.text[self.emitted:]
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(tail)), best, -1):
                if s.startswith(tail[-n:]):
                    best = n
                    break
        return best

    def _release(self, end: int) -> str:
        piece = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return piece


# ----------------------------------------------------------------------- fair admission

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


# ---------------------------------------------------------------------------- the engine

class APIError(Exception):
    """An error answered to the client in OpenAI's format."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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
        text = TextAssembler(self.tokenizer, p.stop)
        n = 0
        finish = "length"
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        steps = generate_stream(self.model, idx, p.max_tokens, p.temperature, p.top_k, p.top_p,
                                self.eos_id, p.seed)
        try:
            for tok in steps:
                if cancelled.is_set() or self._cancel_all.is_set():
                    finish = "cancelled"
                    break
                t = int(tok[0])
                if t == self.eos_id:
                    finish = "stop"
                    break
                n += 1
                piece = text.push(t)
                if piece:
                    emit(Event("text", piece))
                if text.stopped:
                    finish = "stop"
                    break
            rest = text.flush()
            if rest:
                emit(Event("text", rest))
            emit(Event("done", finish_reason=finish, completion_tokens=n))
        except Exception as e:  # reported to the client as a 500; the server keeps serving
            log.exception("generation failed")
            emit(Event("error", text=f"generation failed: {type(e).__name__}: {e}"))
        finally:
            steps.close()

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


# ----------------------------------------------------------------------- request schemas

def _schemas():
    """The pydantic request models."""

    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)
        include_usage: bool = False

    class Common(BaseModel):
        # strict: "5" is not a number and 1 is not a bool, as in OpenAI's API; unknown
        # fields (user, logprobs=null, presence_penalty, ...) are accepted and ignored.
        model_config = ConfigDict(extra="ignore", strict=True)
        model: str | None = None
        max_tokens: int | None = Field(None, ge=1)
        temperature: float | None = Field(None, ge=0.0, le=2.0)
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        top_k: int | None = Field(None, ge=0)
        stop: str | list[str] | None = None
        seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
        stream: bool | None = False
        stream_options: StreamOptions | None = None
        n: int | None = Field(1, ge=1, le=1, description="only one choice per request")

    class CompletionRequest(Common):
        prompt: str | list[str] | list[int]
        echo: bool | None = False

    class TextPart(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)
        type: Literal["text"]
        text: str

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)
        role: Literal["system", "developer", "user", "assistant"]
        content: str | list[TextPart] | None = None
        input: str | None = None  # extension: an Alpaca "### Input:" section

        def text(self) -> str:
            if isinstance(self.content, list):
                return "".join(p.text for p in self.content)
            return self.content or ""

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)

    return CompletionRequest, ChatRequest


def _validation_error(exc) -> APIError:
    """A pydantic ValidationError as a 400 naming the first offending field."""
    errors = exc.errors()
    err = errors[0]
    # A field with a union type (prompt: str | list[str] | list[int]) fails once per
    # alternative, each with the alternative's name in its location: report them together.
    branches = {"str", "int", "float", "bool", "list", "none"}

    def is_branch(x) -> bool:
        return isinstance(x, str) and (x in branches or "[" in x)

    loc = [str(x) for x in err.get("loc", ()) if not is_branch(x)]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    alternatives = [str(x) for e in errors if e.get("loc", ())[:1] == err.get("loc", ())[:1]
                    for x in e.get("loc", ()) if is_branch(x)]
    if kind == "missing":
        msg = f"missing required parameter {param!r}"
    elif len(set(alternatives)) > 1:
        param = str(err["loc"][0])
        msg = f"invalid value for {param!r}: expected one of {', '.join(dict.fromkeys(alternatives))}"
    elif param == "n":
        msg = "only n=1 is supported (one choice per request)"
    else:
        msg = f"invalid value for {param!r}: {err.get('msg')}" if param else err.get("msg", "invalid request")
    code = "invalid_type" if kind.endswith("_type") or alternatives else "invalid_value"
    return APIError(400, msg, param=param, code=None if kind == "missing" else code)


# ------------------------------------------------------------------------------ the app

def create_app(engine: Engine, api_key: str | None = None):
    """The FastAPI application serving `engine`.

    Args:
        engine: the model to serve.
        api_key: if set, every API endpoint requires `Authorization: Bearer <api_key>`.
    """
    from contextlib import asynccontextmanager

    CompletionRequest, ChatRequest = _schemas()

    @asynccontextmanager
    async def lifespan(app):
        engine.startup()
        try:
            yield
        finally:
            engine.shutdown()

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest: the time taken does not reveal how much of the key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           type="invalid_request_error", code="invalid_api_key")

    # No /docs or /openapi.json: they would be unauthenticated and load assets from a CDN.
    app = FastAPI(title="llmscratch", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    authed = [Depends(require_key)]

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = exc.detail if exc.status_code != 404 else f"no such endpoint: {request.method} {request.url.path}"
        return JSONResponse(APIError(exc.status_code, str(message), kind).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        return JSONResponse(APIError(400, str(exc.errors()[0].get("msg"))).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        log.exception("unexpected error answering %s", request.url.path)
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", "server_error").body(),
                            status_code=500)

    async def parse(request: Request, schema):
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request ({e}).",
                           code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the JSON body must be an object", code="invalid_json")
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None
        if req.model is not None and req.model != engine.model_id:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves "
                                f"'{engine.model_id}'.", param="model", code="model_not_found")
        return req

    def sampling(req, default_max: int, extra_stop: list[str]) -> SamplingParams:
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if max_tokens is None:
            max_tokens = min(default_max, engine.max_tokens_limit)
        if max_tokens > engine.max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}, above this server's limit of "
                                f"{engine.max_tokens_limit}", param="max_tokens", code="invalid_value")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise APIError(400, "stop: at most 4 sequences", param="stop", code="invalid_value")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=req.top_p,
            top_k=req.top_k or None,
            seed=req.seed,
            stop=stop + extra_stop,
        )

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def respond(request: Request, req, ids: list[int], p: SamplingParams, chat: bool):
        """Run the generation and answer as one JSON body or as a server-sent event stream."""
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        base = {"id": rid, "object": obj, "created": created, "model": engine.model_id}

        def usage(n: int) -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            if req.stream:
                delta = {} if text is None else {"content": text}
                if first:
                    delta = {"role": "assistant", "content": ""}
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text},
                    "logprobs": None, "finish_reason": finish}

        # A chat reply starts after "Assistant:" or a newline: drop the leading whitespace
        # the model writes there, even when it arrives as pieces of its own.
        started = not chat

        def tidy(piece: str) -> str:
            nonlocal started
            if not started:
                piece = piece.lstrip()
                started = bool(piece)
            return piece

        if not req.stream:
            parts: list[str] = []
            try:
                async for ev in engine.run(ids, p, request.is_disconnected):
                    if ev.kind == "text":
                        parts.append(tidy(ev.text))
                    elif ev.kind == "error":
                        raise APIError(500, ev.text, "server_error")
                    else:
                        finish, n = ev.finish_reason, ev.completion_tokens
            except ClientGone:
                return JSONResponse({}, status_code=499)  # nobody is listening any more
            reply = dict(base, choices=[choice("".join(parts), finish)], usage=usage(n))
            return JSONResponse(reply)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        obj_chunk = "chat.completion.chunk" if chat else "text_completion"

        async def events() -> AsyncIterator[str]:
            chunk = dict(base, object=obj_chunk)
            if chat:
                yield sse(dict(chunk, choices=[choice(None, None, first=True)]))
            try:
                async for ev in engine.run(ids, p, request.is_disconnected):
                    if ev.kind == "text":
                        piece = tidy(ev.text)
                        if piece:
                            yield sse(dict(chunk, choices=[choice(piece, None)]))
                    elif ev.kind == "error":
                        yield sse(APIError(500, ev.text, "server_error").body())
                    else:
                        yield sse(dict(chunk, choices=[choice(None if chat else "", ev.finish_reason)]))
                        if include_usage:
                            yield sse(dict(chunk, choices=[], usage=usage(ev.completion_tokens)))
            except ClientGone:
                return
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ endpoints
    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(chat_page_html())

    @app.get("/health", dependencies=authed)
    async def health():
        lim = engine.limiter
        return {"status": "ok", "model": engine.model_id,
                "active": lim.active if lim else 0, "queued": lim.queued if lim else 0,
                "max_concurrency": engine.max_concurrency}

    @app.get("/v1/models", dependencies=authed)
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=authed)
    async def model(model_id: str):
        if model_id != engine.model_id:
            raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return model_card()

    def model_card() -> dict:
        return {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "llmscratch",
                # extensions the chat page shows
                "context_length": engine.context_length, "template": engine.template,
                "max_tokens_limit": engine.max_tokens_limit}

    @app.post("/v1/completions", dependencies=authed)
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo", code="unsupported_parameter")
        p = sampling(req, DEFAULT_MAX_TOKENS_COMPLETION, [])
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request", param="prompt", code="invalid_value")
            prompt = prompt[0]
        if isinstance(prompt, str):
            # tokenizing a long prompt takes a while: keep it off the event loop too
            ids = await asyncio.to_thread(engine.encode_prompt, prompt)
        else:
            ids = list(prompt)
        engine.check_prompt(ids, "prompt")
        return await respond(request, req, ids, p, chat=False)

    @app.post("/v1/chat/completions", dependencies=authed)
    async def chat_completions(request: Request):
        req = await parse(request, ChatRequest)
        p = sampling(req, DEFAULT_MAX_TOKENS_CHAT, template_stops(engine.template))
        messages = [{"role": m.role, "content": m.text(), "input": m.input} for m in req.messages]
        if not any(m["role"] == "user" for m in messages):
            raise APIError(400, "messages: at least one user message is needed", param="messages")
        try:
            ids = await asyncio.to_thread(encode_chat, engine.tokenizer, messages, engine.template)
        except UserError as e:  # e.g. a tokenizer without <|endoftext|> and a multi-turn template
            raise APIError(400, str(e), param="messages") from None
        engine.check_prompt(ids, "messages")
        return await respond(request, req, ids, p, chat=True)

    return app


def chat_page_html() -> str:
    """The chat page shipped in the package (`llmscratch/static/chat.html`)."""
    return resources.files("llmscratch").joinpath("static/chat.html").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------- serve()

class BackgroundServer:
    """Run an app with uvicorn in a background thread: for notebooks, tests and benchmarks.

    Example:
        >>> with BackgroundServer(create_app(engine)) as srv:   # a free port on 127.0.0.1
        ...     openai.OpenAI(base_url=srv.url + "/v1", api_key="-").models.list()
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        # Bind here (port 0: the OS picks a free one) so the port is known before starting.
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="llmscratch-serve", daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def load_engine(model: str, device=None, dtype=None, template: str | None = None,
                model_name: str | None = None, max_concurrency: int = 4,
                max_tokens_limit: int = 1024) -> Engine:
    """Load `model` (run folder, Hugging Face GPT-2 folder or preset) into an `Engine`.

    The chat template is `template` if given, else the run folder's `config.json`
    `"template"`, else the plain-LM fallback.
    """
    from .checkpoint import load_model
    from .utils import pick_device

    device = pick_device(device)
    net, tokenizer = load_model(model, device=device, dtype=dtype)
    chosen = template if template is not None else read_template(model)
    try:
        chosen = normalize_template(chosen)
    except UserError as e:
        raise UserError(f"{model}: {e} (override it with --template)") from None
    name = model_name or (Path(model).name if Path(model).is_dir() else model)
    return Engine(net, tokenizer, name or "model", chosen, max_concurrency, max_tokens_limit)


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, max_concurrency: int = 4,
          max_tokens_limit: int = 1024, api_key: str | None = None, template: str | None = None,
          model_name: str | None = None, device=None, dtype=None, threads: int | None = None,
          log_level: str = "info") -> None:
    """Serve `model` over HTTP until interrupted (Ctrl-C).

    Args:
        model: run folder, Hugging Face GPT-2 folder or preset name.
        host / port: where to listen (127.0.0.1 by default: only this machine).
        max_concurrency: generations at once; more requests wait in a fair queue.
        max_tokens_limit: largest `max_tokens` a request may ask for.
        api_key: require `Authorization: Bearer <api_key>` (default: $LLMSCRATCH_API_KEY).
        template: chat template override (`alpaca`, `phi3`, `plain`).
        model_name: the id clients use (default: the folder's name).
        device / dtype: where and in which precision to run the model.
        threads: PyTorch CPU threads (default: the cores divided among the concurrent
            generations, at least 1).
    """
    import uvicorn

    api_key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    engine = load_engine(model, device, dtype, template, model_name, max_concurrency, max_tokens_limit)
    if engine.device.type == "cpu":
        # Concurrent generations already keep the cores busy; on top of that, each one's
        # intra-op thread team would oversubscribe them, and a team waiting at a barrier for
        # a descheduled thread is slow: batch-1 decoding of a tiny model measured 3 ms/token
        # with 1 thread and 15-75 ms/token with 2 on a busy 2-core machine.
        torch.set_num_threads(threads or max(1, torch.get_num_threads() // max_concurrency))
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("listening on %s without an API key: anyone who can reach it can use the model", host)
    print(f"serving {engine.model_id} ({engine.template} chat template) on http://{host}:{port}/ "
          f"- chat page at /, OpenAI API at /v1" + (" (API key required)" if api_key else ""), flush=True)
    # timeout_graceful_shutdown: on Ctrl-C, give open streams a moment, then cut them
    # (otherwise a long generation would hold the shutdown until it finished)
    uvicorn.run(create_app(engine, api_key), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=3)
