"""`HFTokenizer`: a Hugging Face `tokenizer.json` (Llama 3, Qwen3, SmolLM2, ...) and the
model's chat template, as a `Tokenizer` the rest of the package accepts.

The encoding itself is done by the `tokenizers` library, the one made for that file format
(its pre-tokenizer regexes, byte-level BPE, added tokens); this class adapts it to our
interface: `encode` / `encode_ordinary` (special tokens written in the text kept as text),
`decode`, `special_tokens`, `eot_id` (the model's end-of-sequence token, from
`tokenizer_config.json`'s `eos_token`), and `save` / `load` inside our run folders.

The chat template is the folder's Jinja template (`tokenizer_config.json`'s
`chat_template`, or the `chat_template.jinja` file newer transformers write beside it),
rendered with jinja2 in a sandbox as transformers renders it (`trim_blocks`,
`lstrip_blocks`, `raise_exception`, `bos_token` / `eos_token` in scope). `prompts.py` uses
it for the template named `"model"`.

Example::

    tok = HFTokenizer.from_folder("checkpoints/qwen3-0.6b")
    text = tok.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserError
from ..utils import read_json, read_text, write_json
from .base import Tokenizer, valid_unicode

HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_TEMPLATE_FILE = "chat_template.jinja"


def _token_text(value: Any) -> str | None:
    """`eos_token` as tokenizer_config.json writes it: a string or `{"content": ...}`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def is_hf_tokenizer_file(data: dict) -> bool:
    """Whether a parsed JSON object is a `tokenizers` file (not one of our own)."""
    return "type" not in data and isinstance(data.get("model"), dict)


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer plus the model's chat template and special tokens."""

    type_name = "hf"

    def __init__(self, tokenizer_json: str | dict, chat_template: str | None = None,
                 eos_token: str | None = None, bos_token: str | None = None):
        from tokenizers import Tokenizer as Backend

        self._json = tokenizer_json if isinstance(tokenizer_json, str) else json.dumps(tokenizer_json)
        try:
            self._backend = Backend.from_str(self._json)
        except Exception as e:  # the library raises its own exception type
            raise UserError(f"not a readable Hugging Face tokenizer.json ({e})") from None
        self.chat_template = chat_template
        self.bos_token = bos_token
        added = json.loads(self._json).get("added_tokens") or []
        self.special_tokens = {t["content"]: t["id"] for t in added if t.get("special")}
        if eos_token is None and "<|endoftext|>" in self.special_tokens:
            eos_token = "<|endoftext|>"
        self.eos_token = eos_token

    # ------------------------------------------------------------------ files

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "HFTokenizer":
        """A Hugging Face model folder's `tokenizer.json`, with `tokenizer_config.json`'s
        `eos_token`, `bos_token` and chat template when the folder has them."""
        folder = Path(folder)
        file = folder / HF_TOKENIZER_FILE
        if not file.is_file():
            raise UserError(f"{folder}: no {HF_TOKENIZER_FILE} (the model's tokenizer)")
        config = {}
        if (folder / HF_TOKENIZER_CONFIG).is_file():
            config = read_json(folder / HF_TOKENIZER_CONFIG)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the "default" one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is None and (folder / HF_TEMPLATE_FILE).is_file():
            template = read_text(folder / HF_TEMPLATE_FILE)
        if template is not None and not isinstance(template, str):
            raise UserError(f"{folder / HF_TOKENIZER_CONFIG}: field 'chat_template' must be a string")
        text = read_text(file)
        try:
            return cls(text, template, _token_text(config.get("eos_token")), _token_text(config.get("bos_token")))
        except UserError as e:
            raise UserError(f"{file}: {e}") from None

    def save_hf(self, folder: str | os.PathLike) -> Path:
        """Write `tokenizer.json` + `tokenizer_config.json` (loadable by transformers'
        `AutoTokenizer` and by `from_folder`)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / HF_TOKENIZER_FILE).write_text(self._json, encoding="utf-8")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                  "bos_token": self.bos_token}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_json(folder / HF_TOKENIZER_CONFIG, config)
        return folder

    def _to_dict(self) -> dict[str, Any]:
        return {"tokenizer": json.loads(self._json), "chat_template": self.chat_template,
                "eos_token": self.eos_token, "bos_token": self.bos_token}

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> "HFTokenizer":
        return cls(data["tokenizer"], data.get("chat_template"), data.get("eos_token"), data.get("bos_token"))

    # ------------------------------------------------------------------ the interface

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def definition(self) -> dict:
        """The parsed `tokenizer.json` (a fresh copy): its model, pre-tokenizer, added tokens."""
        return json.loads(self._json)

    @property
    def eot_id(self) -> int:
        """The end-of-sequence id (`eos_token`): where a document or a reply ends."""
        if self.eos_token is None or self.token_to_id(self.eos_token) is None:
            raise UserError("this Hugging Face tokenizer has no end-of-sequence token "
                            "(tokenizer_config.json 'eos_token')")
        return self.token_to_id(self.eos_token)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def train(self, text: str, vocab_size: int, verbose: bool = False) -> Tokenizer:
        raise UserError("a Hugging Face tokenizer is loaded from its tokenizer.json, not trained here; "
                        "train a BPETokenizer instead")

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text` with special tokens written in it treated as plain text, and
        no BOS or other post-processing added."""
        self._backend.encode_special_tokens = True
        try:
            return self._backend.encode(valid_unicode(text), add_special_tokens=False).ids
        finally:
            self._backend.encode_special_tokens = False

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        size = self.vocab_size
        bad = [i for i in ids if not 0 <= int(i) < size]
        if bad:
            raise UserError(f"token id {bad[0]} is not in the vocabulary (size {size})")
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

    # ------------------------------------------------------------------ chat template

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as the model's own template lays it out (as transformers'
        `apply_chat_template(..., tokenize=False)` would).

        Raises:
            UserError: the tokenizer has no chat template, or the template fails (its own
                `raise_exception` message, e.g. roles out of order).
        """
        if not self.chat_template:
            raise UserError("this tokenizer has no chat template (tokenizer_config.json 'chat_template'); "
                            "choose one with --template alpaca, phi3 or plain")
        import jinja2

        template = _compile(self.chat_template)
        budget = _RenderBudget()
        try:
            out, n = [], 0
            for chunk in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                           bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                           **{_BUDGET: budget}):
                n += len(chunk)
                if n > MAX_TEMPLATE_OUTPUT:
                    raise jinja2.sandbox.SecurityError(f"output longer than {MAX_TEMPLATE_OUTPUT:,} characters")
                budget.charge(1)
                out.append(chunk)
            return "".join(out)
        except _TemplateError as e:
            raise UserError(f"chat template: {e}") from None
        except jinja2.sandbox.SecurityError as e:
            raise UserError(f"chat template refused: {e}") from None
        except (jinja2.TemplateError, TypeError, ValueError, OverflowError, RecursionError) as e:
            raise UserError(f"chat template failed: {type(e).__name__}: {e}") from None


class _TemplateError(Exception):
    pass


# A chat template comes with a model folder, which may come from anyone: it renders in
# jinja2's sandbox (no attribute tricks, no file or code access), and within these bounds,
# so a template cannot hold a server thread or its memory either.
MAX_TEMPLATE_OUTPUT = 1_000_000
"""Characters a chat template may produce (a real one makes a few thousand)."""
MAX_TEMPLATE_STEPS = 1_000_000
"""`range` elements, operators and output chunks one rendering may spend."""
MAX_TEMPLATE_SECONDS = 5.0
"""Wall-clock time one rendering may take."""
_BUDGET = "__llmscratch_budget"


class _RenderBudget:
    """The steps and the time one rendering has left."""

    def __init__(self):
        self.steps = 0
        self.deadline = time.monotonic() + MAX_TEMPLATE_SECONDS

    def charge(self, n: int) -> None:
        from jinja2.sandbox import SecurityError

        self.steps += n
        if self.steps > MAX_TEMPLATE_STEPS:
            raise SecurityError(f"more than {MAX_TEMPLATE_STEPS:,} steps")
        if time.monotonic() > self.deadline:
            raise SecurityError(f"took longer than {MAX_TEMPLATE_SECONDS:g} s")


def _budget_of(context) -> _RenderBudget:
    budget = context.get(_BUDGET)
    return budget if isinstance(budget, _RenderBudget) else _RenderBudget()


def _sized(value) -> int | None:
    return len(value) if isinstance(value, (str, list, tuple)) else None


def _bounded_sandbox():
    """jinja2's immutable sandbox with the size of `*`, `**` and `+` results and the
    length of `range` bounded, and every such operation charged to the rendering's budget."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+"])

        def call_binop(self, context, operator, left, right):
            _budget_of(context).charge(1)
            size = None
            if operator == "*":
                for seq, k in ((left, right), (right, left)):
                    if _sized(seq) is not None and isinstance(k, int):
                        size = len(seq) * k
            elif operator == "+" and _sized(left) is not None and _sized(right) is not None:
                size = len(left) + len(right)
            elif operator == "**" and isinstance(left, (int, float)) and isinstance(right, (int, float)):
                if abs(left) > 1 and right > 64:
                    raise SecurityError("power too large")
            if size is not None and size > MAX_TEMPLATE_OUTPUT:
                raise SecurityError(f"a result of {size:,} items (at most {MAX_TEMPLATE_OUTPUT:,})")
            return super().call_binop(context, operator, left, right)

    @jinja2.pass_context
    def bounded_range(context, *args):
        r = range(*args)
        _budget_of(context).charge(len(r))
        return r

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["range"] = bounded_range
    return env


def _raise(message: str):
    raise _TemplateError(message)


_COMPILED: dict[str, Any] = {}


def _compile(source: str):
    """A sandboxed jinja2 template, set up as transformers sets up chat templates."""
    if source not in _COMPILED:
        import jinja2

        env = _bounded_sandbox()
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            _COMPILED[source] = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"chat template: not valid Jinja (line {e.lineno}: {e.message})") from None
    return _COMPILED[source]
