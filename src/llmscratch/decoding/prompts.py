"""Chat prompts: how a conversation becomes the token ids a model continues.

One module, because the layout a model is fine-tuned on (`finetune instruct`) must be the
layout it is later prompted with (`chat`, `serve`, `eval instruct`) token for token: a
model trained on "### Response:\\n" and then asked with "### Response: " answers worse.

Templates
    `"alpaca"`  the LLMs-from-scratch book's Instruction / Input / Response layout;
    `"phi3"`    Microsoft Phi-3's `<|user|>` / `<|assistant|>` markers, written as text;
    `"model"`   the model's own Jinja chat template, from its tokenizer (a Hugging Face
                folder's `tokenizer_config.json`: Llama 3's headers, Qwen3's `<|im_start|>`),
                rendered by `tokenizer.hf.HFTokenizer.render_chat`;
    `"plain"`   a transcript `"User: ...\\nAssistant:"` for a model never tuned on a chat
                format (a pretrained or converted GPT-2): it is the most natural prompt for
                a base language model, and `<|endoftext|>` would mean "a new document" to
                it, so its turns end with a newline instead.
    In alpaca and phi3 each assistant reply ends with `<|endoftext|>`, so the model learns
    to stop. Every template also has stop strings: where a model that does not stop starts
    writing the user's next turn itself.

Which template a model gets (one rule, `template_for`)
    an explicit `--template`, else the `"template"` its run folder's config.json records
    (written by `finetune instruct`), else `"model"` when the model's tokenizer carries a
    chat template of its own (Llama 3.2 Instruct, Qwen3, SmolLM2), else `"plain"`: a model
    without either was never instruction-tuned. `DEFAULT_TEMPLATE` ("alpaca", the book's) is only what
    `finetune instruct` trains with when not told otherwise, and it is then recorded.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import UserError

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)

DEFAULT_TEMPLATE = "alpaca"
"""The template instruction fine-tuning uses unless told otherwise (and records)."""

NO_TEMPLATE = "plain"
"""The template of a model with none recorded: it was never tuned on a chat format."""

MODEL_TEMPLATE = "model"
"""The template that is the model's own (its tokenizer's Jinja chat template)."""


@dataclass(frozen=True)
class Template:
    """How a conversation is laid out as text.

    The layout is `system_fmt` (once, when there is system text) joined to the first user
    turn, then per exchange `user_fmt` (ending with the cue that the assistant speaks next)
    and `reply_fmt`, followed by `<|endoftext|>` when `reply_ends_with_eot`.
    """

    name: str
    default_system: str
    system_fmt: str  # {system}
    user_fmt: str  # {content} and {input} (the formatted input_fmt or "")
    input_fmt: str  # {input}
    reply_fmt: str = "{content}"
    reply_ends_with_eot: bool = True
    stops: tuple[str, ...] = ()  # where the model would start writing the user's next turn

    def system_text(self, system: str | None) -> str:
        text = self.default_system if system is None else system
        return self.system_fmt.format(system=text) if text else ""

    def user_text(self, content: str, input: str = "") -> str:
        extra = self.input_fmt.format(input=input) if input and input.strip() else ""
        return self.user_fmt.format(content=content, input=extra)

    def prompt(self, instruction: str, input: str = "") -> str:
        """The whole single-turn prompt, as text (what the response follows)."""
        return self.system_text(None) + self.user_text(instruction, input)

    def jinja(self) -> str | None:
        """This layout as a Hugging Face Jinja chat template (`tokenizer_config.json`'s
        `chat_template`), rendering the text `encode_conversation` encodes, `<|endoftext|>`
        written as `eos_token`; None for `"model"` (the tokenizer's own template). Written
        into folders `convert` exports, so transformers' `apply_chat_template` lays a
        conversation out as this model was tuned on."""
        if self.name == MODEL_TEMPLATE:
            return None
        q = json.dumps
        system = _jinja_format(self.system_fmt, system="ns.system")
        extra = _jinja_format(self.input_fmt, input="m['input']")
        user = _jinja_format(self.user_fmt, content="m['content']",
                             input=f"(({extra}) if m['input'] is defined and m['input'] and m['input'].strip() else '')")
        reply = _jinja_format(self.reply_fmt, content="m['content']")
        eos = " ~ eos_token" if self.reply_ends_with_eot else ""
        return ("{%- set ns = namespace(parts=[]) -%}"
                "{%- for m in messages if m['role'] in ['system', 'developer'] -%}"
                "{%- set ns.parts = ns.parts + [m['content'] or ''] -%}{%- endfor -%}"
                f"{{%- set ns.system = ns.parts | join({q(chr(10) * 2)}) if ns.parts else {q(self.default_system)} -%}}"
                f"{{%- if ns.system -%}}{{{{ {system} }}}}{{%- endif -%}}"
                "{%- for m in messages -%}"
                f"{{%- if m['role'] == 'user' -%}}{{{{ {user} }}}}"
                f"{{%- elif m['role'] == 'assistant' -%}}{{{{ {reply}{eos} }}}}{{%- endif -%}}"
                "{%- endfor -%}")


def _jinja_format(fmt: str, **fields: str) -> str:
    """A `str.format` string as a Jinja expression: literals quoted, `{name}` replaced by
    the Jinja expression `fields[name]`, joined with `~`."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(fmt):
        if literal:
            parts.append(json.dumps(literal))
        if name is not None:
            parts.append(f"({fields[name]} or '')")
    return " ~ ".join(parts) or "''"


TEMPLATES = {
    # The Stanford Alpaca layout, as used by the book's chapter 7.
    "alpaca": Template(
        name="alpaca",
        default_system=ALPACA_PREAMBLE,
        system_fmt="{system}\n\n",
        user_fmt="### Instruction:\n{content}{input}\n\n### Response:\n",
        input_fmt="\n\n### Input:\n{input}",
        stops=("### Instruction:", "### Input:", "### Response:"),
    ),
    # Microsoft Phi-3's chat markers (written as plain text: GPT-2's BPE has no such tokens).
    "phi3": Template(
        name="phi3",
        default_system="",
        system_fmt="<|system|>\n{system}\n",
        user_fmt="<|user|>\n{content}{input}\n<|assistant|>\n",
        input_fmt="\n{input}",
        stops=("<|user|>", "<|system|>", "<|end|>"),
    ),
    # A transcript, for base language models.
    "plain": Template(
        name="plain",
        default_system="",
        system_fmt="{system}\n",
        user_fmt="User: {content}{input}\nAssistant:",
        input_fmt="\n{input}",
        reply_fmt=" {content}\n",
        reply_ends_with_eot=False,
        stops=("\nUser:",),
    ),
    # The model's own chat template: the layout is the tokenizer's Jinja template (the
    # format strings here are unused), and its replies end with the model's end token.
    MODEL_TEMPLATE: Template(name=MODEL_TEMPLATE, default_system="", system_fmt="", user_fmt="", input_fmt=""),
}

_ALIASES = {"phi-3": "phi3", "none": "plain", "": "plain"}


def get_template(template: str | Template | None, for_training: bool = False) -> Template:
    """The `Template` for a name (None means `"plain"`), or `template` itself.

    Args:
        for_training: only templates whose replies end with `<|endoftext|>`: a model
            fine-tuned on replies without it never learns to stop.

    Raises:
        UserError: an unknown name (or, for training, one without an end-of-text).
    """
    if isinstance(template, Template):
        found = template
    else:
        name = (template or "").strip().lower()
        name = _ALIASES.get(name, name)
        if name not in TEMPLATES:
            raise UserError(f"unknown prompt template {template!r}; choose one of: {', '.join(TEMPLATES)}")
        found = TEMPLATES[name]
    if for_training and not found.reply_ends_with_eot:
        trainable = ", ".join(n for n, t in TEMPLATES.items() if t.reply_ends_with_eot)
        raise UserError(f"template {found.name!r} is the transcript for models never instruction-tuned "
                        f"(its replies carry no <|endoftext|> to learn to stop from); fine-tune with: {trainable}")
    return found


def normalize_template(template: str | None) -> str:
    """`"alpaca"`, `"phi3"` or `"plain"` for a template name (None means plain)."""
    return get_template(template).name


def template_stops(template: str | Template | None) -> list[str]:
    """The stop strings a reply in `template` ends at (besides <|endoftext|>)."""
    return list(get_template(template).stops)


def read_template(model: str | os.PathLike) -> str | None:
    """The template recorded in a run folder's `config.json` (key `"template"`, written by
    `finetune instruct`), or None (a preset name, a base model, an unreadable config)."""
    cfg_file = Path(model) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # load_model reports a broken config.json with the details
    value = cfg.get("template") if isinstance(cfg, dict) else None
    return value if isinstance(value, str) else None


def has_own_template(model: str | os.PathLike) -> bool:
    """Whether the model folder's tokenizer carries a chat template of its own: a Hugging
    Face folder's `tokenizer_config.json` `chat_template` (or `chat_template.jinja`), or a
    run folder's saved `HFTokenizer` with one. Never raises."""
    folder = Path(model)
    if (folder / "chat_template.jinja").is_file():
        return True
    for name, key in (("tokenizer_config.json", "chat_template"), ("tokenizer.json", "chat_template")):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get(key):
            return True
    return False


def template_for(model: str | os.PathLike, override: str | None = None) -> Template:
    """The template to prompt `model` with: `override`, else the recorded one, else the
    model's own (`has_own_template`), else plain.

    Raises:
        UserError: the override or the recorded name is unknown.
    """
    if override is not None:
        return get_template(override)
    try:
        default = MODEL_TEMPLATE if has_own_template(model) else NO_TEMPLATE
        return get_template(read_template(model) or default)
    except UserError as e:
        raise UserError(f"{model}: {e} (override it with --template)") from None


# ------------------------------------------------------------------------ the layout

def _field(message: Any, key: str, default: Any = None) -> Any:
    """`message[key]` for a dict, `message.key` for an object (pydantic messages)."""
    if isinstance(message, Mapping):
        return message.get(key, default)
    return getattr(message, key, default)


def _segments(template: Template, messages: Iterable[Any]) -> list[tuple[str | None, bool]]:
    """The conversation as `(text, is_response)` segments; text None is an <|endoftext|>.

    Segments are tokenized separately, and BPE merges differ across a boundary ("\\n\\n###"
    is not "\\n\\n" + "###"), so where the cuts fall is part of the format: the system text
    joins the first user turn, and each reply is a segment of its own.
    """
    messages = list(messages)
    system_parts = [str(_field(m, "content") or "") for m in messages
                    if _field(m, "role") in ("system", "developer")]
    pending = template.system_text("\n\n".join(system_parts) if system_parts else None)
    out: list[tuple[str | None, bool]] = []
    for m in messages:
        role, content = _field(m, "role"), str(_field(m, "content") or "")
        if role == "user":
            out.append((pending + template.user_text(content, _field(m, "input") or ""), False))
            pending = ""
        elif role == "assistant":
            out.append((template.reply_fmt.format(content=content), True))
            if template.reply_ends_with_eot:
                out.append((None, True))
    return [(pending, False)] + out if pending else out  # (no user turn: the system text leads)


def encode_conversation(tokenizer, template: str | Template | None, messages: Iterable[Any],
                        for_generation: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation, and which of them are the assistant's.

    Args:
        tokenizer: any llmscratch tokenizer (`<|endoftext|>` is needed only where a
            template puts one).
        template: a `Template` or its name.
        messages: dicts (or objects) with `role` ("system", "developer", "user" or
            "assistant") and `content`; a user message may carry `input` (Alpaca's
            `### Input:` section). System messages replace the template's preamble.
        for_generation: the conversation ends with a user turn; the ids end with the cue
            for the assistant's reply (a prompt to generate from).

    Returns:
        `(ids, is_response)`, same length. In alpaca and phi3 every reply is followed by
        `<|endoftext|>`, which counts as response (the model must learn to stop). Text is
        encoded with special tokens off: "<|endoftext|>" typed by a user is just text, so
        it cannot forge a turn boundary.

    Example (alpaca): user "Add 2+2", assistant "4" ->
        "Below is an instruction ...\\n\\n### Instruction:\\nAdd 2+2\\n\\n### Response:\\n" "4" <eot>
    """
    messages = list(messages)
    if for_generation and messages and _field(messages[-1], "role") == "assistant":
        raise ValueError("for_generation needs a conversation that ends with a user turn")
    template = get_template(template)
    if template.name == MODEL_TEMPLATE:
        return _encode_with_own_template(tokenizer, messages, for_generation)
    ids: list[int] = []
    mask: list[bool] = []
    for text, response in _segments(template, messages):
        new = [tokenizer.eot_id] if text is None else tokenizer.encode(text, allowed_special="none")
        ids.extend(new)
        mask.extend([response] * len(new))
    return ids, mask


def _own_template_segments(tokenizer, messages: list, for_generation: bool) -> list[tuple[str, bool]]:
    """The conversation rendered once by the tokenizer's own chat template, cut into
    `(text, is_response)` segments.

    A reply is its content as the rendered text holds it (found in order, stripped of
    surrounding whitespace, which templates such as Llama 3's trim) through the end-of-turn
    token that follows it (`eos_token`): what the model must learn to write, and to stop.
    Rendering once, rather than diffing renderings of growing prefixes, keeps templates that
    rewrite earlier turns (Qwen3 drops the reasoning of all but the latest reply) usable.
    """
    render = getattr(tokenizer, "render_chat", None)
    if render is None:
        raise UserError(f"template 'model' needs a tokenizer with a chat template of its own; the "
                        f"{tokenizer.name} tokenizer has none (choose --template alpaca, phi3 or plain)")
    plain = [{"role": _field(m, "role"), "content": str(_field(m, "content") or "")} for m in messages]
    # as the built-in templates end a user turn with the assistant's cue, so does this
    cue = for_generation or (bool(plain) and plain[-1]["role"] != "assistant")
    text = render(plain, add_generation_prompt=cue)
    if for_generation:  # a prompt: one piece, tokenized exactly as transformers would
        return [(text, False)]
    eos = getattr(tokenizer, "eos_token", None)
    out: list[tuple[str, bool]] = []
    pos = 0
    for m in plain:
        content = m["content"].strip()
        if m["role"] != "assistant" or not content:
            continue
        start = text.find(content, pos)
        if start < 0:
            raise UserError("the model's chat template does not write an assistant reply as given, so the "
                            "reply tokens cannot be found; choose --template alpaca, phi3 or plain")
        end = start + len(content)
        rest = text[end:]
        if eos and rest.lstrip().startswith(eos):  # the end-of-turn token right after it
            end += len(rest) - len(rest.lstrip()) + len(eos)
        out += [(text[pos:start], False), (text[start:end], True)]
        pos = end
    out.append((text[pos:], False))
    return [(t, response) for t, response in out if t]


def _encode_with_own_template(tokenizer, messages: list, for_generation: bool) -> tuple[list[int], list[bool]]:
    """`encode_conversation` for the model's own template. The template writes its markers
    (`<|im_start|>`, `<|eot_id|>`) as text, so the rendered text is encoded with special
    tokens recognised, as transformers' `apply_chat_template` does."""
    ids: list[int] = []
    mask: list[bool] = []
    for text, response in _own_template_segments(tokenizer, messages, for_generation):
        new = tokenizer.encode(text, allowed_special="all")
        ids.extend(new)
        mask.extend([response] * len(new))
    return ids, mask


def encode_chat(tokenizer, messages: Iterable[Any], template: str | Template | None = None) -> list[int]:
    """The prompt ids for a conversation that ends with a user turn (`encode_conversation`'s ids)."""
    return encode_conversation(tokenizer, template, messages)[0]


def format_chat(messages: Iterable[Any], template: str | Template | None = None) -> str:
    """A conversation as the prompt text the model continues, `<|endoftext|>` written out.

    Single turn:
        - alpaca: `ALPACA_PREAMBLE` `"\\n\\n### Instruction:\\n{user}"`
          [`"\\n\\n### Input:\\n{input}"`] `"\\n\\n### Response:\\n"`; a system message
          replaces the preamble.
        - phi3: [`"<|system|>\\n{system}\\n"`] `"<|user|>\\n{user}\\n<|assistant|>\\n"`.
        - plain: [`"{system}\\n"`] `"User: {user}\\nAssistant:"`, earlier replies as
          `" {reply}\\n"`.
    The text shows the turn boundary as `"<|endoftext|>"`; `encode_conversation` inserts
    the token itself.
    """
    template = get_template(template)
    if template.name == MODEL_TEMPLATE:
        raise UserError("template 'model' is the tokenizer's own: lay the conversation out with "
                        "tokenizer.render_chat(messages, add_generation_prompt=True)")
    return "".join("<|endoftext|>" if t is None else t for t, _ in _segments(template, messages))


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """One Alpaca prompt, exactly as the LLMs-from-scratch book formats it.

    Example:
        `alpaca_prompt("Name a colour.")` ->
        "Below is an instruction ...\\n\\n### Instruction:\\nName a colour.\\n\\n### Response:\\n"
    """
    return TEMPLATES["alpaca"].prompt(instruction, input_text)
