"""Typed config dataclasses become command-line flags: one generator for every subcommand.

A config is a plain dataclass. Each field is one flag, and everything the flag needs is
written once, on the field:

    @dataclass
    class TrainConfig:
        lr: float = 1e-3
        \"\"\"peak learning rate\"\"\"
        precision: Literal["auto", "fp32", "bf16"] = "auto"
        \"\"\"fp32, bf16 (autocast, fp32 master weights) or auto\"\"\"
        progress: bool = True
        \"\"\"show a progress bar\"\"\"

gives `--lr LR` (a float), `--precision {auto,fp32,bf16}` and `--progress/--no-progress`,
each with the string under the field as its help and the default appended. The type decides
the parsing: `int`, `float`, `str`; `X | None` parses as X; `Literal[...]` gives choices;
`bool` gives a `--x/--no-x` pair. A field without a default is a required flag; a field
declared with `field(repr=False)` is internal (filled in by the code) and has no flag.

Flags leave their attribute unset unless given (`argparse.SUPPRESS`), so `config_from_args`
can layer them: the dataclass's defaults, then a `--config` TOML file, then the flags given.
This is the shape of litgpt's configs, with plain argparse and no dependency.

Why the docs are string literals under the fields and not `field(metadata=...)`: they read
like documentation in the source, and the class stays a plain dataclass a notebook can build.
They are read from the source with `ast`; without a source file (a .pyc-only install) the
flags still work, with shorter help.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import UserError
from ..utils import fields_in_order

__all__ = ["ModelArgs", "Parser", "SamplingArgs", "add_command", "add_config_flags", "config_fields", "config_from_args",
           "field_docs", "given_settings", "load_config_file"]

_NO_DEFAULT = dataclasses.MISSING


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """`{field name: the string literal written right after it}`, for `cls` and its bases
    (a subclass that re-declares a field without a doc keeps the base class's doc)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source shipped: flags without help
            continue
        body = ast.parse(source).body[0].body
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def config_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` that are flags: all but the internal ones (`repr=False`), in the
    order `cls.FIELD_ORDER` gives, if it has one (`utils.fields_in_order`)."""
    return [f for f in fields_in_order(cls) if f.repr]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not _NO_DEFAULT:
        return f.default
    if f.default_factory is not _NO_DEFAULT:
        return f.default_factory()
    return _NO_DEFAULT


def _parse_spec(tp: Any) -> tuple[type, tuple | None]:
    """`(parse function, choices)` for a field type: int | None -> (int, None),
    Literal["a", "b"] -> (str, ("a", "b"))."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _parse_spec(args[0])
        return str, None
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        return type(choices[0]), choices
    if tp in (int, float, str):
        return tp, None
    return str, None


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a wrong flag or value gives two lines, not the whole usage:
    the error, and where the full help is."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n({self.prog} --help lists every option, with examples)\n")


def add_command(sub, name: str, func, help: str, examples: list[str]) -> argparse.ArgumentParser:
    """A subcommand whose description is `func`'s docstring, whose help ends with worked
    examples, and which runs `func(args)`."""
    p = sub.add_parser(name, help=help, description=inspect.cleandoc(func.__doc__ or help),
                       epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p


def _help(doc: str, default: Any, choices: tuple | None = None) -> str:
    text = doc or ""
    if choices and not all(str(c) in text for c in choices):
        text += f" (one of: {', '.join(map(str, choices))})"
    if default not in (_NO_DEFAULT, None, "") and "default" not in text:
        text += f" (default: {default})"
    return text.strip().replace("%", "%%")  # argparse formats help with %


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, required: tuple[str, ...] = (),
                     skip: tuple[str, ...] = (), config_file: bool = False) -> None:
    """Add one flag per field of the dataclass `cls` to `parser` (or an argument group).

    Args:
        parser: the subcommand's parser or argument group.
        cls: the config dataclass.
        required: fields the command needs on its command line even though the dataclass
            has a default for library callers (e.g. `--model` of `finetune classify`).
        skip: fields not offered here.
        config_file: also add `--config FILE`, a TOML file of the same settings that the
            flags override; required fields may then come from the file instead.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    if config_file:
        parser.add_argument("--config", metavar="FILE", default=None,
                            help="TOML file of these settings (names as below, with _ or -); flags override it")
    must = set(required)
    fields = config_fields(cls)
    # what a command cannot run without comes first in --help
    fields.sort(key=lambda f: not (f.name in must or _default(f) is _NO_DEFAULT))
    for f in fields:
        if f.name in skip:
            continue
        default = _default(f)
        is_required = f.name in must or default is _NO_DEFAULT
        choices = _parse_spec(hints[f.name])[1] if hints[f.name] is not bool else None
        helptext = _help(docs.get(f.name, ""), default if f.name not in must else _NO_DEFAULT, choices)
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": helptext}
        if is_required and not config_file:
            kw["required"] = True
        elif is_required:
            kw["help"] += " (required)"
        if hints[f.name] is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
            continue
        parse, choices = _parse_spec(hints[f.name])
        metavar = None if choices else f.name.upper()  # choices show as {a,b,c}
        parser.add_argument(_flag(f.name), type=parse, choices=choices, metavar=metavar, **kw)
    if config_file:  # checked by config_from_args, once the file and the flags are merged
        parser.set_defaults(_required=tuple(sorted(must)))


def load_config_file(path: str, cls: type) -> dict[str, Any]:
    """The settings in the TOML file `path`, keys as field names (`-` or `_`), checked
    against the fields and their types of `cls`."""
    import tomllib

    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"--config {path}: a folder, not a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--config {path}: not valid TOML ({e})") from None
    hints = typing.get_type_hints(cls)
    names = {f.name for f in config_fields(cls)}
    values = {k.replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"--config {path}: unknown setting(s) {unknown}; valid: {sorted(names)}")
    for name, value in values.items():
        if not _fits(value, hints[name]):
            raise UserError(f"--config {path}: {name} = {value!r} is not a valid {_type_name(hints[name])}")
    return values


def _fits(value: Any, tp: Any) -> bool:
    """Whether a TOML value suits a field type (an integer is a fine float)."""
    if tp is bool:
        return isinstance(value, bool)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is Literal:
        return value in typing.get_args(tp)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp in (int, str):
        return isinstance(value, tp) and not isinstance(value, bool)
    return True


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "choice of " + ", ".join(map(repr, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp))


def given_settings(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The settings of `cls` the user gave: the `--config` file's (if the command has one and
    it was given), then the flags on the command line; defaults not included."""
    values = load_config_file(args.config, cls) if getattr(args, "config", None) else {}
    given = vars(args)
    values.update({f.name: given[f.name] for f in config_fields(cls) if f.name in given})
    return values


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """An instance of `cls`: its defaults, then the `--config` file (if the command has one
    and it was given), then the flags given on the command line."""
    values = given_settings(cls, args)
    missing = [f.name for f in config_fields(cls)
               if f.name not in values and (_default(f) is _NO_DEFAULT or f.name in getattr(args, "_required", ()))]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise UserError(f"{', '.join(_flag(n) for n in missing)} {verb} required (on the command line or in --config)")
    return cls(**values)


# ------------------------------------------------------------- settings several commands share


@dataclass(kw_only=True)
class ModelArgs:
    """Which model a command loads, and where."""

    model: str
    """run folder, Hugging Face folder (GPT-2, Llama, Qwen3, Mistral), or GPT preset name
    (random weights, GPT-2's tokenizer)"""
    device: str = "auto"
    """cpu, cuda, cuda:N, mps or auto"""
    dtype: Literal["bf16", "fp16", "fp32", "int8"] | None = None
    """weights' precision for inference: fp32, bf16, fp16, or int8 (weight-only, bf16
    activations; fastest on CPU) (default: as stored, fp32)"""
    kernels: bool = True
    """apply the speed kernels (llmscratch.kernels), each where measured faster on this machine;
    --kernels forces every applicable kernel without measuring; --no-kernels runs the plain
    reference model"""


def kernel_choice(cfg: Any, args: argparse.Namespace) -> bool | str:
    """`kernels` for `load_model`: `"force"` when `--kernels` was given on the command line,
    else `cfg.kernels` (True: each kernel where measured faster; False: the reference model)."""
    return "force" if vars(args).get("kernels") is True else cfg.kernels


@dataclass(kw_only=True)
class SamplingArgs:
    """How tokens are picked."""

    max_new_tokens: int = 100
    """tokens to generate"""
    temperature: float = 0.8
    """divide the logits by this before sampling; 0 = greedy (argmax). The defaults (0.8, top-k
    40) read best from a small model: greedy repeats itself and often writes only blank lines
    (benchmarks/sampling_defaults.py)"""
    top_k: int | None = 40
    """sample from the k likeliest tokens (0 = all)"""
    top_p: float | None = None
    """sample from the smallest set of tokens whose probabilities add up to p, in (0, 1] (default: off)"""
    seed: int | None = None
    """seed for sampling, for the same text every run (default: a new draw each run; also seeds a
    preset's random init)"""


def run_finetune(run, cls, args, what: str = "the model"):
    """A fine-tuning command's body: `run(config)` with the config of class `cls` from the
    flags, in the memory setting training wants; after Ctrl-C or SIGTERM, say on stderr
    where `what` (as trained so far) was saved. Returns `run`'s result."""
    import sys

    from ..kernels import reuse_freed_memory

    reuse_freed_memory()
    result = run(config_from_args(cls, args))
    if result.interrupted:
        print(f"\ninterrupted after {result.metrics['steps']} steps; {what} as trained so far is in {result.out}",
              file=sys.stderr)
    return result
