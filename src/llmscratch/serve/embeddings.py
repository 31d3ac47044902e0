"""`POST /v1/embeddings` (OpenAI's format) when the served model is an encoder.

`llmscratch serve --model ENCODER_RUN` serves an `EncoderEngine` instead of the decoding
`Engine`: `/v1/models` and `/health` work as before, `/v1/embeddings` answers with
mean-pooled, L2-normalised sentence embeddings (`encoder_tasks.embed_texts`), and the
completion routes answer 400 (an encoder does not continue text). A decoder's server
answers `/v1/embeddings` with 400 in turn.

The request: `input` (a string, a list of strings, a list of token ids or a list of such
lists), `encoding_format` (`float`, or `base64`: little-endian float32, what the `openai`
client asks for by default), optional `model` and `dimensions` (not supported: 400 unless
equal to the model's width). Inputs longer than the encoder's context are truncated (a
warning in the server log), as OpenAI's API refuses them only above its own limit.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time

import torch
from fastapi import Request
from pydantic import Field

from ..models.bert import embed
from ..decoding.encoder import embed_texts
from .schemas import APIError, StrictModel, request_body

log = logging.getLogger("llmscratch.serve")

MAX_INPUTS = 256
"""Most inputs one request may embed."""


class EmbeddingRequest(StrictModel):
    """POST /v1/embeddings."""

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: str | None = "float"
    dimensions: int | None = Field(None, ge=1)


class EncoderEngine:
    """An encoder and its tokenizer behind the server (the parts of `Engine` the routes use)."""

    template = "no"  # "serving NAME (no chat template)": an encoder does not chat
    batched = False
    max_tokens_limit = 0
    max_concurrency = 1
    limiter = None
    kind = "encoder"
    note = None

    def __init__(self, model, tokenizer, model_id: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.context_length = model.config.context_length
        self.created = int(time.time())
        self.device = next(model.parameters()).device
        self._lock = threading.Lock()  # one forward pass at a time: they use every core anyway

    def startup(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def embed(self, inputs: list) -> tuple[torch.Tensor, int]:
        """`(vectors (N, n_embd), tokens used)` for strings or token-id lists."""
        with self._lock:
            if isinstance(inputs[0], str):
                with _log_warnings():
                    vectors = embed_texts(self.model, self.tokenizer, inputs)
                n = sum(min(len(self.tokenizer.encode(t)) + 2, self.context_length) for t in inputs)
                return vectors, n
            out = []
            for ids in inputs:
                if len(ids) > self.context_length:
                    log.warning("embedding input of %d tokens truncated to %d", len(ids), self.context_length)
                    ids = ids[:self.context_length]
                if any(not 0 <= i < self.tokenizer.vocab_size for i in ids):
                    raise APIError(400, f"token ids must be in [0, {self.tokenizer.vocab_size})", param="input")
                idx = torch.tensor([ids], device=self.device)
                with torch.no_grad():
                    out.append(embed(self.model, idx).float().cpu())
            return torch.cat(out), sum(min(len(ids), self.context_length) for ids in inputs)


class _log_warnings:
    """Send truncation warnings to the server log instead of stderr."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings(record=True)
        self._caught = self._ctx.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        for w in self._caught:
            log.warning("%s", w.message)


def _inputs(req: EmbeddingRequest) -> list:
    x = req.input
    if isinstance(x, str):
        x = [x]
    elif x and isinstance(x[0], int):
        x = [x]
    if not x:
        raise APIError(400, "input must not be empty", param="input")
    if len(x) > MAX_INPUTS:
        raise APIError(400, f"at most {MAX_INPUTS} inputs per request", param="input")
    if any(len(i) == 0 for i in x):
        raise APIError(400, "input must not contain empty strings or empty token lists", param="input")
    return x


def add_embeddings_route(app, engine, dependencies, parse_request) -> None:
    """Add `POST /v1/embeddings` to `app` (`parse_request` is `app.parse_request`)."""

    @app.post("/v1/embeddings", dependencies=dependencies, openapi_extra=request_body("EmbeddingRequest"))
    async def embeddings(request: Request):
        req = await parse_request(request, EmbeddingRequest, engine)
        if not engine.model.kind.can("embed"):
            raise APIError(400, f"'{engine.model_id}' is a decoder (GPT): embeddings need an encoder (BERT) "
                                "model; serve one with llmscratch serve --model ENCODER_RUN", param="model",
                           code="unsupported_model")
        if req.encoding_format not in ("float", "base64"):
            raise APIError(400, "encoding_format must be 'float' or 'base64'", param="encoding_format")
        width = engine.model.config.n_embd
        if req.dimensions is not None and req.dimensions != width:
            raise APIError(400, f"this model's embeddings have {width} dimensions; 'dimensions' cannot change it",
                           param="dimensions")
        inputs = _inputs(req)
        vectors, n_tokens = await asyncio.to_thread(engine.embed, inputs)
        data = []
        for i, v in enumerate(vectors):
            if req.encoding_format == "base64":
                value = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
            else:
                value = v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": engine.model_id,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}


def refuse_encoder_completions(engine) -> None:
    """The completion routes' check: an encoder does not continue text (400)."""
    if not engine.model.kind.can("generate"):
        raise APIError(400, f"'{engine.model_id}' is an encoder (BERT): it serves /v1/embeddings, not completions",
                       param="model", code="unsupported_model")
