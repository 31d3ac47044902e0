"""Serving: an OpenAI-compatible HTTP API and a web chat page over any model `load_model` reads.

`llmscratch serve --model DIR` (or `serve(...)` / `create_app(...)` from Python) exposes

    GET  /                      a small chat page (static HTML/JS, streams the reply)
    GET  /health                {"status": "ok", "active": ..., "queued": ...} (no API key needed)
    GET  /openapi.json          the API's OpenAPI document (request bodies included)
    GET  /v1/models             the one model served
    POST /v1/completions        continue a prompt
    POST /v1/chat/completions   answer a conversation (the model's prompt template applied)

in the OpenAI wire format, so the `openai` client libraries, `curl` and the page all work.
Request parameters: `max_tokens`, `temperature`, `top_p`, `top_k` (an extension), `stop`
(a string or up to 4), `seed`, `stream` (server-sent events ending in `data: [DONE]`) and
`stream_options.include_usage` and `n` (choices, as rows of the batch). Non-streamed replies
carry `usage` token counts.

The parts
    `engine`   the model, the generation slots and the fair queue (`Engine`, `FairLimiter`);
               a full queue answers 429 with Retry-After; a client that disconnects,
               queued or mid-stream, cancels its generation.
    `scheduler` the decoding threads, off the event loop, on the decoding engine's ragged
               batches: continuous batching (requests join and leave one running batch at
               token boundaries, `--max-batch-size`), or with `--max-batch-size 1` one
               single-row scheduler per slot.
    `schemas`  the OpenAI wire format: request models and the error body (`APIError`).
    `app`      the routes (`create_app`).
    `server`   process start-up: `serve()` (uvicorn, `llmscratch serve`) and
               `BackgroundServer`. On a CPU, `serve` divides the cores among the workers
               (`--threads`): oversubscribed intra-op thread teams make batch-1 decoding
               many times slower.
    Prompt templates come from `llmscratch.decoding.prompts` and the streamed text from
    `llmscratch.decoding.streaming`, the same ones `chat` and fine-tuning use.

Chat prompts
    The messages are laid out with the template `prompts.template_for` picks, as `chat`
    does: the run folder's recorded `"template"` (written by `finetune instruct`), token for
    token as fine-tuning trained the model, else the plain-LM transcript
    `"User: ...\\nAssistant:"`. Each template's stop strings end the reply where the model
    starts writing the user's next turn itself.

Errors
    Bad requests get OpenAI's error body `{"error": {"message", "type", "param", "code"}}`:
    400 for malformed JSON, wrong types or values, `max_tokens` over the server's limit and
    a prompt longer than the model's context window (prompts are not silently truncated);
    401 for a missing or wrong API key; 404 for an unknown model name or path; 429 with
    `Retry-After` when `--max-queue` requests already wait (`code: rate_limit_exceeded`,
    what OpenAI's clients retry on). The prompt
    plus the reply may exceed the context window: generation then slides the window, as
    `generate` does. Any unexpected failure answers 500 and the server keeps running.

Security
    The default bind address is 127.0.0.1. With an API key (`--api-key` or the environment
    variable `LLMSCRATCH_API_KEY`) every API endpoint requires `Authorization: Bearer KEY`;
    `/health` does not (health checks carry no credentials) and then omits the model's name.
    The chat page itself (`GET /`) is static code holding no data, and a browser cannot attach that header to a page load, so it is served without
    the key; it asks for the key and sends it with every API call.
"""

from ..decoding.prompts import (
    ALPACA_PREAMBLE,
    TEMPLATES,
    alpaca_prompt,
    encode_chat,
    format_chat,
    normalize_template,
    read_template,
    template_stops,
)
from ..decoding.streaming import StreamDecoder
from .app import DEFAULT_MAX_TOKENS_CHAT, DEFAULT_MAX_TOKENS_COMPLETION, MAX_BODY_BYTES, chat_page_html, create_app
from .engine import ClientGone, Engine, FairLimiter, load_engine
from .scheduler import Event, SamplingParams
from .schemas import APIError
from .server import API_KEY_ENV, BackgroundServer, serve

TextAssembler = StreamDecoder
"""The streaming decoder under the name it had here before `llmscratch.decoding.streaming`."""

__all__ = [
    "ALPACA_PREAMBLE", "API_KEY_ENV", "APIError", "BackgroundServer", "ClientGone",
    "DEFAULT_MAX_TOKENS_CHAT", "DEFAULT_MAX_TOKENS_COMPLETION", "Engine", "Event", "FairLimiter",
    "MAX_BODY_BYTES", "SamplingParams", "TEMPLATES", "TextAssembler", "alpaca_prompt", "chat_page_html",
    "create_app", "encode_chat", "format_chat", "load_engine", "normalize_template", "read_template",
    "serve", "template_stops",
]
