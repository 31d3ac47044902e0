"""The one dataclass -> flags generator (`llmscratch.cli.args`), and the subcommands built on it."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from llmscratch.cli import EvalArgs, GenerateArgs, ServeArgs, build_parser
from llmscratch.cli.args import add_config_flags, config_from_args, field_docs
from llmscratch.errors import UserError
from llmscratch.finetune.classify import ClassifyConfig
from llmscratch.cli.finetune import ChatArgs, EvalInstructArgs
from llmscratch.finetune.instruct import InstructConfig
from llmscratch.train import TrainConfig


@dataclass
class Base:
    lr: float = 1e-3
    """peak learning rate"""
    steps: int = 10
    """optimizer steps, 5% of them warmup"""


@dataclass(kw_only=True)
class Demo(Base):
    name: str
    """what to call it"""
    steps: int = 20  # re-declared without a doc: keeps Base's
    limit: int | None = None
    """at most this many (default: no limit)"""
    mode: Literal["fast", "slow"] = "fast"
    """how to run"""
    progress: bool = True
    """show a progress bar"""
    verbose: bool = False
    """say more"""
    derived: int = field(default=0, repr=False)  # internal: filled in by the code


def _parser(cls=Demo, **kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo")
    add_config_flags(p, cls, **kw)
    return p


def test_types_defaults_and_layers():
    cfg = config_from_args(Demo, _parser().parse_args(["--name", "x"]))
    assert cfg == Demo(name="x")
    args = _parser().parse_args(["--name", "y", "--lr", "0.5", "--steps", "3", "--limit", "7", "--mode", "slow",
                                 "--no-progress", "--verbose"])
    cfg = config_from_args(Demo, args)
    assert (cfg.lr, cfg.steps, cfg.limit, cfg.mode, cfg.progress, cfg.verbose) == (0.5, 3, 7, "slow", False, True)
    assert isinstance(cfg.lr, float) and isinstance(cfg.steps, int)


def test_internal_fields_have_no_flag_and_bad_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["--name", "x", "--derived", "3"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        _parser().parse_args(["--name", "x", "--mode", "medium"])
    assert "invalid choice: 'medium'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["--name", "x", "--steps", "2.5"])
    assert "invalid int value" in capsys.readouterr().err


def test_a_field_without_default_is_a_required_flag(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args([])
    assert "--name" in capsys.readouterr().err


def test_help_is_the_doc_under_each_field_with_the_default():
    docs = field_docs(Demo)
    assert docs["steps"] == "optimizer steps, 5% of them warmup"  # inherited by the re-declaration
    assert "derived" not in docs
    text = _parser().format_help()
    assert "peak learning rate (default: 0.001)" in text
    assert "5% of them warmup (default: 20)" in " ".join(text.split())  # % survives argparse
    assert "at most this many (default: no limit)" in text  # a doc that names its default keeps it
    assert "--mode {fast,slow}" in text and "--progress, --no-progress" in text


def test_config_file_then_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('name = "file"\nlr = 2\nmode = "slow"\nlimit = 4\n')
    p = _parser(config_file=True)
    cfg = config_from_args(Demo, p.parse_args(["--config", str(toml), "--limit", "9"]))
    assert (cfg.name, cfg.lr, cfg.mode, cfg.limit, cfg.steps) == ("file", 2, "slow", 9, 20)


@pytest.mark.parametrize("text, message", [
    ('name = "a"\nbogus = 1\n', "unknown setting(s) ['bogus']"),
    ('name = "a"\nsteps = "ten"\n', "steps = 'ten' is not a valid int"),
    ('name = "a"\nmode = "medium"\n', "mode = 'medium' is not a valid choice of 'fast', 'slow'"),
    ('name = "a"\nprogress = 1\n', "progress = 1 is not a valid bool"),
    ("name = \n", "not valid TOML"),
])
def test_config_file_errors_are_user_errors(tmp_path, text, message):
    toml = tmp_path / "c.toml"
    toml.write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        config_from_args(Demo, _parser(config_file=True).parse_args(["--config", str(toml)]))


def test_required_fields_may_come_from_the_config_file(tmp_path):
    p = _parser(Base, required=("lr",), config_file=True)
    with pytest.raises(UserError, match="--lr is required"):
        config_from_args(Base, p.parse_args([]))
    toml = tmp_path / "c.toml"
    toml.write_text("lr = 0.25\n")
    assert config_from_args(Base, p.parse_args(["--config", str(toml)])).lr == 0.25


# ------------------------------------------------------------------ the real subcommands


def _subparser(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


def _flag_names(cls) -> set[str]:
    out = set()
    for f in dataclasses.fields(cls):
        if f.repr:
            out.add("--" + f.name.replace("_", "-"))
    return out


SUBCOMMANDS = [("info",), ("generate",), ("pretrain",), ("eval",), ("finetune", "classify"), ("export",),
               ("finetune", "instruct"), ("classify",), ("chat",), ("download",), ("convert",), ("bench",),
               ("serve",)]


@pytest.mark.parametrize("path", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_help_has_a_description_and_examples(path):
    text = _subparser(*path).format_help()
    assert "examples:\n  llmscratch " + " ".join(path) in text
    assert len(text.split("\n\n")[1]) > 20  # the description paragraph


@pytest.mark.parametrize("path, configs", [
    (("pretrain",), [TrainConfig]),
    (("finetune", "classify"), [ClassifyConfig]),
    (("finetune", "instruct"), [InstructConfig]),
    (("eval",), [EvalArgs, EvalInstructArgs]),
    (("generate",), [GenerateArgs]),
    (("serve",), [ServeArgs]),
    (("chat",), [ChatArgs]),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_every_config_field_is_a_flag(path, configs):
    flags = _flags(_subparser(*path))
    for cls in configs:
        assert _flag_names(cls) <= flags


def test_the_flags_users_know_are_all_still_there():
    # the flag sets from before the generator, which scripts and the README use
    assert {"--model", "--device", "--dtype", "--prompt", "--max-new-tokens", "--temperature", "--top-k",
            "--top-p", "--seed", "--ignore-eos"} <= _flags(_subparser("generate"))
    assert {"--host", "--port", "--max-concurrency", "--max-tokens-limit", "--api-key", "--template",
            "--model-name", "--threads", "--model", "--device", "--dtype"} <= _flags(_subparser("serve"))
    assert {"--model", "--template", "--system", "--max-new-tokens", "--temperature", "--top-k", "--top-p",
            "--seed", "--device"} <= _flags(_subparser("chat"))
    assert {"--data", "--batch-size", "--context-length", "--max-batches", "--encoding-errors", "--responses",
            "--judge-url", "--judge-model", "--template", "--scores-out"} <= _flags(_subparser("eval"))
    assert {"--model", "--data", "--out", "--epochs", "--lr", "--trainable", "--lora-rank", "--balance",
            "--no-balance", "--no-progress"} <= _flags(_subparser("finetune", "classify"))
    assert {"--model", "--data", "--out", "--template", "--mask-prompt", "--max-test"} <= _flags(
        _subparser("finetune", "instruct"))
    assert {"--config", "--no-progress", "--resume", "--no-kernels", "--precision"} <= _flags(_subparser("pretrain"))


def test_defaults_come_from_the_dataclasses():
    parser = build_parser()
    gen = config_from_args(GenerateArgs, parser.parse_args(["generate", "--model", "tiny", "--prompt", "hi"]))
    assert (gen.model, gen.max_new_tokens, gen.temperature, gen.top_k, gen.ignore_eos) == ("tiny", 100, 0.8, 40, False)
    chat = config_from_args(ChatArgs, parser.parse_args(["chat", "--model", "m"]))
    assert (chat.max_new_tokens, chat.template, chat.device) == (256, None, "auto")
    srv = config_from_args(ServeArgs, parser.parse_args(["serve", "--model", "m"]))
    assert (srv.host, srv.port, srv.max_concurrency, srv.max_tokens_limit) == ("127.0.0.1", 8000, 4, 1024)
    ev = config_from_args(EvalArgs, parser.parse_args(["eval"]))
    assert (ev.model, ev.batch_size, ev.encoding_errors) == ("", 8, "strict")
    ft = config_from_args(ClassifyConfig, parser.parse_args(
        ["finetune", "classify", "--model", "m", "--data", "d", "--out", "o"]))
    assert ft == ClassifyConfig(model="m", data="d", out="o")
    assert config_from_args(TrainConfig, parser.parse_args(["pretrain"])) == TrainConfig()


def test_finetune_without_model_is_a_one_line_error(capsys):
    from llmscratch.cli import main

    assert main(["finetune", "instruct", "--data", "d", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --model is required (on the command line or in --config)"


def test_shared_fields_keep_each_command_s_flag_order():
    from llmscratch.finetune.dpo import DPOConfig

    for cls in (TrainConfig, ClassifyConfig, InstructConfig, DPOConfig):
        names = {f.name for f in dataclasses.fields(cls)}
        assert len(set(cls.FIELD_ORDER)) == len(cls.FIELD_ORDER) and set(cls.FIELD_ORDER) <= names
    text = _subparser("pretrain").format_help()
    order = ["--data", "--model", "--out", "--max-steps", "--batch-size", "--lr", "--seed", "--precision",
             "--progress"]
    assert [text.index(f + " ") for f in order] == sorted(text.index(f + " ") for f in order)
    text = _subparser("finetune", "instruct").format_help()
    order = ["--epochs", "--batch-size", "--lr", "--warmup-fraction", "--lora-rank", "--progress", "--template"]
    assert [text.index(f + " ") for f in order] == sorted(text.index(f + " ") for f in order)
