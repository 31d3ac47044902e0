"""The OpenAI wire format: request bodies as pydantic models, and errors as OpenAI's body.

Validation is strict, as in OpenAI's API ("5" is not a number, 1 is not a bool), and
unknown fields (`user`, `logprobs: null`, `presence_penalty`, ...) are accepted and
ignored, so off-the-shelf clients work. A request that fails validation is answered 400
with the first offending field as `param` (`validation_error`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered to the client in OpenAI's format."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers  # e.g. Retry-After on a 429

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


MAX_N = 16
"""Most choices (`n`) one request may ask for; the server's batch size may allow fewer."""


class StrictModel(BaseModel):
    """The base of every request body: types checked strictly, unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


class Common(StrictModel):
    """The sampling fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    # Types here; the ranges of temperature, top_p and top_k are the library's one rule
    # (sampling.check_sampling, applied by app.sampling_params), as for generate and chat.
    # The cap of 2 on temperature is OpenAI's API limit.
    temperature: float | None = Field(None, le=2.0)
    top_p: float | None = None
    top_k: int | None = None  # an extension
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=MAX_N, description="choices: rows of one batch (batching engine only)")


class CompletionRequest(Common):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int]
    echo: bool | None = False


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class Message(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    input: str | None = None  # extension: an Alpaca "### Input:" section

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(Common):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def validation_error(exc: ValidationError) -> APIError:
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
        msg = f"n must be an integer from 1 to {MAX_N}"
    else:
        msg = f"invalid value for {param!r}: {err.get('msg')}" if param else err.get("msg", "invalid request")
    code = "invalid_type" if kind.endswith("_type") or alternatives else "invalid_value"
    return APIError(400, msg, param=param, code=None if kind == "missing" else code)


def request_body(name: str) -> dict:
    """A route's `openapi_extra`: its JSON body is the schema `name` (one of `openapi_models`'
    models, listed under the schema's components)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}}


def openapi_components(models) -> dict:
    """The JSON schemas of the request `models` (and the models they use), keyed by name,
    for the OpenAPI document's `components.schemas`."""
    from pydantic.json_schema import models_json_schema

    _, defs = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    return defs.get("$defs", {})
