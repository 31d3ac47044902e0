"""The HTTP routes: `create_app(engine)` wires the endpoints to an `Engine`.

    GET  /                      the chat page (static HTML/JS, streams the reply)
    GET  /health                {"status": "ok", "active": ..., "queued": ...} (no API key needed)
    GET  /openapi.json          the API's OpenAPI document (request bodies included)
    GET  /v1/models             the one model served
    POST /v1/completions        continue a prompt
    POST /v1/chat/completions   answer a conversation (the model's prompt template applied)

A request is parsed (`parse_request`), turned into `SamplingParams` (`sampling_params`),
run by the engine, and answered as one JSON body or as server-sent events (`respond`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
import weakref
from contextlib import asynccontextmanager
from importlib import resources
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from ..decoding.sampling import Sampling, SamplingError
from ..decoding.prompts import encode_chat, template_stops
from .engine import ClientGone, Engine
from .scheduler import SamplingParams
from .schemas import (APIError, ChatRequest, CompletionRequest, openapi_components, request_body,
                      validation_error)
from .embeddings import EmbeddingRequest, add_embeddings_route, refuse_encoder_completions

log = logging.getLogger("llmscratch.serve")

DEFAULT_MAX_TOKENS_COMPLETION = 16
"""`max_tokens` when a completion request gives none (OpenAI's default for /v1/completions)."""

DEFAULT_MAX_TOKENS_CHAT = 256
"""`max_tokens` when a chat request gives none (capped by the server's limit)."""

MAX_BODY_BYTES = 4 * 2**20
"""Largest request body accepted; a bigger one is answered 413 before any tokenizing."""


def chat_page_html() -> str:
    """The chat page shipped in the package (`llmscratch/static/chat.html`)."""
    return resources.files("llmscratch").joinpath("static/chat.html").read_text(encoding="utf-8")


async def parse_request(request: Request, schema, engine: Engine):
    """The validated request body, or an APIError (413, 400, or 404 for another model)."""
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: also an integer of 5,000 digits
        raise APIError(400, f"We could not parse the JSON body of your request ({e}).",
                       code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "We could not parse the JSON body of your request (nested too deeply).",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the JSON body must be an object", code="invalid_json")
    try:
        req = schema.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
    except RecursionError:
        raise APIError(400, "the request is nested too deeply", code="invalid_value") from None
    if req.model is not None and req.model != engine.model_id:
        raise APIError(404, f"The model '{req.model}' does not exist; this server serves "
                            f"'{engine.model_id}'.", param="model", code="model_not_found")
    return req


def sampling_params(req, engine: Engine, default_max: int, extra_stop: list[str]) -> SamplingParams:
    """The request's sampling settings, checked against the server's limits."""
    refuse_encoder_completions(engine)  # an encoder serves /v1/embeddings only
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if max_tokens is None:
        max_tokens = min(default_max, engine.max_tokens_limit)
    if max_tokens > engine.max_tokens_limit:
        raise APIError(400, f"max_tokens is {max_tokens}, above this server's limit of "
                            f"{engine.max_tokens_limit}", param="max_tokens", code="invalid_value")
    temperature = 1.0 if req.temperature is None else req.temperature
    try:  # the library's one check (sampling.Sampling), as generate and chat use it
        Sampling(temperature, req.top_k, req.top_p)
    except SamplingError as e:
        raise APIError(400, str(e), param=e.param, code="invalid_value") from None
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4:
        raise APIError(400, "stop: at most 4 sequences", param="stop", code="invalid_value")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=req.top_p,
        top_k=req.top_k or None,
        seed=req.seed,
        stop=stop + extra_stop,
        n=req.n or 1,
    )


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def respond(request: Request, engine: Engine, req, ids: list[int], p: SamplingParams, chat: bool):
    """Run the generation and answer as one JSON body or as a server-sent event stream
    (with `n > 1`, one choice per row of the batch, told apart by `index`)."""
    # 400/429 now (a stream cannot change its status once started), and the place in the
    # queue taken in the same step, so a burst cannot pass the check together
    ticket = engine.admit(p)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    obj = "chat.completion" if chat else "text_completion"
    base = {"id": rid, "object": obj, "created": int(time.time()), "model": engine.model_id}

    def usage(n: int) -> dict:
        return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

    def choice(text: str | None, finish: str | None, first: bool = False, index: int = 0) -> dict:
        if not chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        if req.stream:
            delta = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", "content": ""}
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": finish}

    # A chat reply starts after "Assistant:" or a newline: drop the leading whitespace
    # the model writes there, even when it arrives as pieces of its own.
    started = [not chat] * p.n  # per choice

    def tidy(piece: str, index: int = 0) -> str:
        if not started[index]:
            piece = piece.lstrip()
            started[index] = bool(piece)
        return piece

    if not req.stream:
        parts: list[list[str]] = [[] for _ in range(p.n)]
        finish: list[str | None] = [None] * p.n
        n = 0
        try:
            async for ev in engine.run(ids, p, request.is_disconnected, ticket):
                if ev.kind == "text":
                    parts[ev.index].append(tidy(ev.text, ev.index))
                elif ev.kind == "error":
                    raise APIError(500, ev.text, "server_error")
                else:
                    finish[ev.index] = ev.finish_reason
                    n += ev.completion_tokens
        except ClientGone:
            return JSONResponse({}, status_code=499)  # nobody is listening any more
        choices = [choice("".join(parts[i]), finish[i], index=i) for i in range(p.n)]
        return JSONResponse(dict(base, choices=choices, usage=usage(n)))

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    chunk = dict(base, object="chat.completion.chunk" if chat else "text_completion")

    async def events() -> AsyncIterator[str]:
        try:
            async for piece in stream():
                yield piece
        finally:  # the client left before the generation started: give its place back
            ticket.give_back()

    async def stream() -> AsyncIterator[str]:
        if chat:
            for i in range(p.n):
                yield sse(dict(chunk, choices=[choice(None, None, first=True, index=i)]))
        n, ended = 0, 0
        try:
            async for ev in engine.run(ids, p, request.is_disconnected, ticket):
                if ev.kind == "text":
                    piece = tidy(ev.text, ev.index)
                    if piece:
                        yield sse(dict(chunk, choices=[choice(piece, None, index=ev.index)]))
                elif ev.kind == "error":
                    yield sse(APIError(500, ev.text, "server_error").body())
                else:
                    yield sse(dict(chunk, choices=[choice(None if chat else "", ev.finish_reason, index=ev.index)]))
                    n, ended = n + ev.completion_tokens, ended + 1
                    if include_usage and ended == p.n:  # after the last choice ends
                        yield sse(dict(chunk, choices=[], usage=usage(n)))
        except ClientGone:
            return
        yield "data: [DONE]\n\n"

    body = events()
    # a body never iterated (the client left before the response started) runs no finally
    loop = asyncio.get_running_loop()
    weakref.finalize(body, give_back_soon, loop, ticket)
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def give_back_soon(loop, ticket) -> None:
    """`ticket.give_back()` on the serving loop (a finalizer may run on any thread)."""
    try:
        loop.call_soon_threadsafe(ticket.give_back)
    except RuntimeError:  # the loop is closed: the server is going down
        pass


def model_card(engine: Engine) -> dict:
    return {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "llmscratch",
            # extensions the chat page shows
            "context_length": engine.context_length, "template": engine.template,
            "max_tokens_limit": engine.max_tokens_limit,
            # "instruct", "base" (never taught to chat) or "random" (a preset), and the warning
            # `serve` printed at start-up for the latter two (chat.model_note)
            "kind": getattr(engine, "kind", None), "note": getattr(engine, "note", None)}


def add_error_handlers(app: FastAPI) -> None:
    """Every error, expected or not, answered in OpenAI's format."""

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else exc.headers
        return ErrorResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = exc.detail if exc.status_code != 404 else f"no such endpoint: {request.method} {request.url.path}"
        # a 405 names the methods that work (Allow), as HTTP asks
        return ErrorResponse(APIError(exc.status_code, str(message), kind).body(), status_code=exc.status_code,
                             headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        return ErrorResponse(APIError(400, str(exc.errors()[0].get("msg"))).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        log.exception("unexpected error answering %s", request.url.path)
        return ErrorResponse(APIError(500, f"internal error: {type(exc).__name__}", "server_error").body(),
                             status_code=500)


class ErrorResponse(JSONResponse):
    """An error body as ASCII JSON: a message may quote what the client sent, and a lone
    surrogate in it ("\\ud800", valid JSON) cannot be encoded as UTF-8, only escaped."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def openapi_document(app: FastAPI) -> dict:
    """FastAPI's OpenAPI document of `app`, with the request bodies the routes read
    themselves (`parse_request`) described under `components.schemas`."""
    if app.openapi_schema is None:
        from importlib.metadata import PackageNotFoundError, version

        from fastapi.openapi.utils import get_openapi

        try:
            release = version("llmscratch")
        except PackageNotFoundError:  # run from a source tree that was never installed
            release = "0"
        doc = get_openapi(title=app.title, version=release, description=app.description, routes=app.routes)
        components = openapi_components([CompletionRequest, ChatRequest, EmbeddingRequest])
        doc.setdefault("components", {}).setdefault("schemas", {}).update(components)
        app.openapi_schema = doc
    return app.openapi_schema


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving `engine`.

    Args:
        engine: the model to serve.
        api_key: if set, every API endpoint requires `Authorization: Bearer <api_key>`.
    """

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
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not reveal how much of the key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           type="invalid_request_error", code="invalid_api_key")

    # /openapi.json behind the key like the API; no /docs pages: they load assets from a CDN
    app = FastAPI(title="llmscratch", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  description="An OpenAI-compatible API over one llmscratch model.")
    add_error_handlers(app)
    authed = [Depends(require_key)]

    @app.get("/openapi.json", dependencies=authed, include_in_schema=False)
    async def openapi():
        return openapi_document(app)
    add_embeddings_route(app, engine, authed, parse_request)  # POST /v1/embeddings (encoders)

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(chat_page_html())

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():  # browsers ask for it; the page declares none
        return Response(status_code=204)

    # No key needed: load balancers and orchestrators probe it without credentials. With a
    # key set it tells only that the server is up and how busy it is (not the model's name).
    @app.get("/health")
    async def health():
        lim = engine.limiter
        status = {"status": "ok", "model": engine.model_id,
                  "active": lim.active if lim else 0, "queued": lim.queued if lim else 0,
                  "max_concurrency": engine.max_concurrency}
        if api_key is not None:
            del status["model"]
        return status

    @app.get("/v1/models", dependencies=authed)
    async def models():
        return {"object": "list", "data": [model_card(engine)]}

    @app.get("/v1/models/{model_id:path}", dependencies=authed)
    async def model(model_id: str):
        if model_id != engine.model_id:
            raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return model_card(engine)

    @app.post("/v1/completions", dependencies=authed, openapi_extra=request_body("CompletionRequest"))
    async def completions(request: Request):
        req = await parse_request(request, CompletionRequest, engine)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo", code="unsupported_parameter")
        p = sampling_params(req, engine, DEFAULT_MAX_TOKENS_COMPLETION, [])
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
        return await respond(request, engine, req, ids, p, chat=False)

    @app.post("/v1/chat/completions", dependencies=authed, openapi_extra=request_body("ChatRequest"))
    async def chat_completions(request: Request):
        req = await parse_request(request, ChatRequest, engine)
        refuse_encoder_completions(engine)  # before the template an encoder has none of
        p = sampling_params(req, engine, DEFAULT_MAX_TOKENS_CHAT, template_stops(engine.template))
        messages = [{"role": m.role, "content": m.text(), "input": m.input} for m in req.messages]
        if not any(m["role"] == "user" for m in messages):
            raise APIError(400, "messages: at least one user message is needed", param="messages")
        try:
            ids = await asyncio.to_thread(encode_chat, engine.tokenizer, messages, engine.template)
        except UserError as e:  # e.g. a tokenizer without <|endoftext|> and a multi-turn template
            raise APIError(400, str(e), param="messages") from None
        engine.check_prompt(ids, "messages")
        return await respond(request, engine, req, ids, p, chat=True)

    return app
