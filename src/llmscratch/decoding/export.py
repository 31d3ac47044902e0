"""`export`: a run folder or Hugging Face folder as a GGUF file, with an Ollama `Modelfile`.

The GGUF itself (tensors, hyperparameters, tokenizer) is `checkpoints/gguf.py`; this module
adds what belongs to decoding: the model's chat template and stop strings, and the sampling
defaults, written both into the GGUF (`tokenizer.chat_template`, `general.sampling.*`) and
into a `Modelfile` beside it for `ollama create`.

Chat templates, by the rule `prompts.template_for` uses everywhere else:
- a model with a Jinja template of its own (a Llama 3 / Qwen3 `tokenizer_config.json`): that
  template goes into the GGUF as is; for Ollama, which uses Go templates, it is translated by
  rendering it on marked messages, reading off each role's prefix and suffix, and checking
  that the Go template built from them lays out other conversations exactly as the Jinja one
  does. A template that fails the check (one that rewrites earlier turns, say) gets no
  TEMPLATE line and a warning: Ollama then falls back to guessing from the GGUF's template.
- our named templates (`alpaca` recorded by `finetune instruct`, `phi3`, `plain`): written
  both as Jinja (`jinja_template`) and as Go (`go_template`), each laying a conversation out
  token for token as `prompts.format_chat` does.

Example::

    export(ExportConfig(model="runs/instruct", out="instruct.gguf", dtype="q8_0"))
    # -> instruct.gguf and instruct.Modelfile;  ollama create instruct -f instruct.Modelfile
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import UserError
from ..utils import atomic_write
from .prompts import MODEL_TEMPLATE, Template, template_for

__all__ = ["ExportConfig", "export", "jinja_template", "go_template", "modelfile_text", "translate_jinja"]


@dataclass(frozen=True)
class ExportConfig:
    """What `llmscratch export` writes."""

    model: str
    """run folder or Hugging Face folder of a decoder (GPT-2, Llama or Qwen3 style)"""
    out: str
    """the .gguf file to write; an Ollama Modelfile is written beside it (NAME.Modelfile)"""
    format: Literal["gguf"] = "gguf"
    """the file format: gguf (llama.cpp, Ollama, LM Studio)"""
    dtype: Literal["f32", "f16", "bf16", "q8_0"] = "f32"
    """weight precision in the file: f32, f16, bf16, or q8_0 (8-bit blocks of 32 values)"""
    force: bool = False
    """overwrite an existing .gguf and Modelfile"""
    template: str | None = None
    """chat template: alpaca, phi3, plain or model (default: the one the run recorded, else the model's own)"""
    temperature: float = 0.8
    """sampling default written to the Modelfile and the GGUF"""
    top_k: int | None = 40
    """sampling default (0 = off)"""
    top_p: float | None = None
    """sampling default (unset = off)"""
    modelfile: bool = True
    """write the Ollama Modelfile beside the .gguf"""


EOT = "<|endoftext|>"


# --------------------------------------------------------------------------- our templates


def _lit(text: str) -> str:
    """A Jinja string literal (JSON's escapes are Jinja's)."""
    return json.dumps(text, ensure_ascii=False)


def _parts(fmt: str, key: str) -> tuple[str, str]:
    """`fmt` split around its `{key}` (with `{input}` dropped: chat messages carry none)."""
    fmt = fmt.replace("{input}", "")
    before, _, after = fmt.partition("{" + key + "}")
    return before.replace("{{", "{").replace("}}", "}"), after.replace("{{", "{").replace("}}", "}")


def jinja_template(template: Template) -> str:
    """One of our named templates as a Jinja chat template (Hugging Face's conventions:
    `messages`, each with `role` and `content`) that renders what `format_chat` lays out."""
    sys_pre, sys_post = _parts(template.system_fmt, "system")
    user_pre, user_post = _parts(template.user_fmt, "content")
    reply_pre, reply_post = _parts(template.reply_fmt, "content")
    eot = EOT if template.reply_ends_with_eot else ""
    return (
        "{%- set ns = namespace(system='', has_system=false, pending='') -%}"
        "{%- for m in messages -%}{%- if m['role'] == 'system' or m['role'] == 'developer' -%}"
        "{%- if ns.has_system -%}{%- set ns.system = ns.system + '\\n\\n' -%}{%- endif -%}"
        "{%- set ns.system = ns.system + m['content'] -%}{%- set ns.has_system = true -%}"
        "{%- endif -%}{%- endfor -%}"
        f"{{%- if not ns.has_system -%}}{{%- set ns.system = {_lit(template.default_system)} -%}}{{%- endif -%}}"
        f"{{%- if ns.system -%}}{{%- set ns.pending = {_lit(sys_pre)} + ns.system + {_lit(sys_post)} -%}}{{%- endif -%}}"
        "{%- for m in messages -%}"
        f"{{%- if m['role'] == 'user' -%}}{{{{ ns.pending + {_lit(user_pre)} + m['content'] + {_lit(user_post)} }}}}"
        "{%- set ns.pending = '' -%}"
        f"{{%- elif m['role'] == 'assistant' -%}}{{{{ {_lit(reply_pre)} + m['content'] + {_lit(reply_post + eot)} }}}}"
        "{%- endif -%}{%- endfor -%}"
        "{{- ns.pending -}}"
    )


def _go(text: str) -> str:
    """Literal text in a Go template (only `{{` needs escaping)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(template: Template) -> tuple[str, str]:
    """`(TEMPLATE, SYSTEM)` for an Ollama Modelfile: one of our named templates in Go's
    template language (Ollama's `.System` and `.Messages`), its default system text apart."""
    sys_pre, sys_post = _parts(template.system_fmt, "system")
    user_pre, user_post = _parts(template.user_fmt, "content")
    reply_pre, reply_post = _parts(template.reply_fmt, "content")
    eot = EOT if template.reply_ends_with_eot else ""
    go = (f"{{{{ if .System }}}}{_go(sys_pre)}{{{{ .System }}}}{_go(sys_post)}{{{{ end }}}}"
          "{{ range .Messages }}"
          f"{{{{ if eq .Role \"user\" }}}}{_go(user_pre)}{{{{ .Content }}}}{_go(user_post)}"
          f"{{{{ else if eq .Role \"assistant\" }}}}{_go(reply_pre)}{{{{ .Content }}}}{_go(reply_post + eot)}"
          "{{ end }}{{ end }}")
    return go, template.default_system


# --------------------------------------------------------------------------- a model's own Jinja

_MARK = {"system": "\x01SYSTEM\x01", "user": "\x01USER{}\x01", "assistant": "\x01ASSISTANT{}\x01"}


@dataclass(frozen=True)
class _Layout:
    """Each role's text before and after its content, as a template writes it."""

    header: str  # before the first user turn when there is no system message
    system_pre: str  # before the system text (includes whatever header comes with it)
    system_post: str
    user_pre: str
    user_post: str
    assistant_pre: str
    assistant_post: str
    cue: str  # the generation prompt after the last user turn

    def render(self, messages: list[dict]) -> str:
        """What the Go template built from this layout renders (ending with the cue)."""
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        out = [self.system_pre + system + self.system_post if system else self.header]
        for m in messages:
            if m["role"] == "user":
                out.append(self.user_pre + m["content"] + self.user_post)
            elif m["role"] == "assistant":
                out.append(self.assistant_pre + m["content"] + self.assistant_post)
        return "".join(out) + self.cue

    def go(self) -> str:
        return (f"{{{{ if .System }}}}{_go(self.system_pre)}{{{{ .System }}}}{_go(self.system_post)}"
                f"{{{{ else }}}}{_go(self.header)}{{{{ end }}}}"
                "{{ range .Messages }}"
                f"{{{{ if eq .Role \"user\" }}}}{_go(self.user_pre)}{{{{ .Content }}}}{_go(self.user_post)}"
                f"{{{{ else if eq .Role \"assistant\" }}}}{_go(self.assistant_pre)}{{{{ .Content }}}}"
                f"{_go(self.assistant_post)}{{{{ end }}}}{{{{ end }}}}{_go(self.cue)}")


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n:]


def _layout(render, specials=()) -> _Layout:
    """Read each role's prefix and suffix off renderings of marked conversations."""
    s, u1, a1, u2 = _MARK["system"], _MARK["user"].format(1), _MARK["assistant"].format(1), _MARK["user"].format(2)
    conv = [{"role": "system", "content": s}, {"role": "user", "content": u1},
            {"role": "assistant", "content": a1}, {"role": "user", "content": u2}]
    full, closed = render(conv, True), render(conv, False)
    alone = render(conv[1:2], False)
    at = [full.index(x) for x in (s, u1, a1, u2)]
    if at != sorted(at) or not closed.startswith(full[:at[3] + len(u2)]):
        raise ValueError("messages out of order")
    end_s, end_u1, end_a1, end_u2 = (at[i] + len(x) for i, x in enumerate((s, u1, a1, u2)))
    user_post = closed[end_u2:]
    junction_sys_user, junction_asst_user = full[end_s:at[1]], full[end_a1:at[3]]
    before_alone = alone[:alone.index(u1)]
    user_pre = _common_suffix(_common_suffix(before_alone, junction_asst_user), junction_sys_user)
    # "<|begin_of_text|>" and "<|eot_id|>" share the ending "|>": cut at a special token instead
    starts = [i for i in range(len(user_pre)) if any(user_pre.startswith(t, i) for t in specials)]
    if starts:
        user_pre = user_pre[starts[0]:]
    u1_to_a1 = full[end_u1:at[2]]
    if not u1_to_a1.startswith(user_post) or not full[end_u2:].startswith(user_post):
        raise ValueError("user suffix differs between turns")
    return _Layout(
        header=before_alone[:len(before_alone) - len(user_pre)], system_pre=full[:at[0]],
        system_post=junction_sys_user[:len(junction_sys_user) - len(user_pre)],
        user_pre=user_pre, user_post=user_post, assistant_pre=u1_to_a1[len(user_post):],
        assistant_post=junction_asst_user[:len(junction_asst_user) - len(user_pre)],
        cue=full[end_u2 + len(user_post):])


_CHECKS = [
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"},
     {"role": "user", "content": "Three"}, {"role": "assistant", "content": "Four"}, {"role": "user", "content": "5"}],
]


def translate_jinja(render, specials=()) -> tuple[str, list[str]] | None:
    """`(Go template, stop strings)` for a Jinja chat template given as its renderer
    (`render(messages, add_generation_prompt)`) and its special tokens' texts, or None when the translation does not lay
    every check conversation out exactly as the Jinja template does."""
    try:
        layout = _layout(render, tuple(specials))
        if any(layout.render(c) != render(c, True) for c in _CHECKS):
            return None
    except (ValueError, UserError):
        return None
    stops = [t for t in (layout.assistant_post.strip(), layout.user_pre.strip()) if t]
    return layout.go(), stops


# --------------------------------------------------------------------------- the Modelfile


def _quote(value: str) -> str:
    """A Modelfile string: triple-quoted when it spans lines or holds a quote."""
    if '"""' in value:
        raise UserError(f"cannot write {value[:40]!r} into a Modelfile (it contains \"\"\")")
    return f'"""{value}"""' if ("\n" in value or '"' in value) else f'"{value}"'


def modelfile_text(gguf_name: str, template: str | None, system: str, stops: list[str],
                   temperature: float, top_k: int | None, top_p: float | None) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_name` (a path relative to the Modelfile)."""
    lines = ["# Ollama: ollama create NAME -f THIS_FILE; ollama run NAME", f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f"TEMPLATE {_quote(template)}")
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    for stop in dict.fromkeys(stops):
        lines.append(f"PARAMETER stop {_quote(stop)}")
    lines.append(f"PARAMETER temperature {temperature:g}")
    if top_k:
        lines.append(f"PARAMETER top_k {top_k}")
    if top_p is not None:
        lines.append(f"PARAMETER top_p {top_p:g}")
    return "\n".join(lines) + "\n"


def modelfile_path(out: Path) -> Path:
    """Where the Modelfile of `out` (a .gguf) goes: `NAME.Modelfile` beside it."""
    return out.with_name(out.stem + ".Modelfile")


def export(cfg: ExportConfig) -> tuple[Path, Path | None]:
    """Write the GGUF file (and the Modelfile beside it); return both paths.

    Raises:
        UserError: a bad format or model folder, or anything `write_gguf` refuses.
    """
    from ..checkpoints.gguf import write_gguf
    from ..checkpoints.run import is_run_dir, load_model
    from .sampling import check_sampling

    if cfg.format != "gguf":
        raise UserError(f"unknown export format {cfg.format!r}; the one format is gguf")
    check_sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    source = Path(cfg.model).expanduser()
    if not source.is_dir():
        raise UserError(f"--model {cfg.model}: no such folder (export takes a run folder or a Hugging Face folder)")
    out = Path(cfg.out).expanduser()
    if out.suffix.lower() != ".gguf":
        raise UserError(f"--out {cfg.out}: the file name must end in .gguf")
    if out.exists() and not cfg.force:
        raise UserError(f"{out}: already exists (use --force to overwrite)")
    side = modelfile_path(out)
    if cfg.modelfile and side.exists() and not cfg.force:
        raise UserError(f"{side}: already exists (use --force to overwrite)")
    if is_run_dir(source) and not (source / "tokenizer.json").is_file():
        raise UserError(f"{source}: no tokenizer.json; a GGUF carries the model's tokenizer, so export needs "
                        "the one it was trained with")
    model, tokenizer = load_model(str(source))
    template = template_for(source, cfg.template)
    if template.name == MODEL_TEMPLATE:
        jinja = getattr(tokenizer, "chat_template", None)
        translated = translate_jinja(tokenizer.render_chat, tokenizer.special_tokens) if jinja else None
        go, system = (translated[0], "") if translated else (None, "")
        stops = translated[1] if translated else []
        if cfg.modelfile and translated is None:
            warnings.warn(f"{source}: its chat template could not be translated to Ollama's; the Modelfile has no "
                          "TEMPLATE (Ollama guesses one from the GGUF's)", stacklevel=2)
    else:
        jinja = jinja_template(template)
        go, system = go_template(template)
        stops = list(template.stops) + ([EOT] if template.reply_ends_with_eot else [])
    eos = getattr(tokenizer, "eos_token", None) or (EOT if EOT in getattr(tokenizer, "special_tokens", {}) else None)
    if eos:
        stops.append(eos)
    sampling = {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p}
    path = write_gguf(model, tokenizer, out, dtype=cfg.dtype, chat_template=jinja, force=cfg.force,
                      sampling=sampling)
    if not cfg.modelfile:
        return path, None
    with atomic_write(side) as f:
        f.write(modelfile_text(out.name, go, system, stops, cfg.temperature, cfg.top_k, cfg.top_p))
    return path, side

