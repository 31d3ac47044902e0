"""The CLI as a new user meets it (issue 18): one-line errors for bad sampling settings and
devices, resume from a run's saved settings, eval on the run's own held-out split, info on a
classifier, the base-model note in chat, help with an example for every command, and the docs
that must agree with the files (notebook list, kernelspec)."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pytest
import torch

from llmscratch.checkpoints.run import save_model
from llmscratch.cli import build_parser, main
from llmscratch.errors import UserError
from llmscratch.decoding.sampling import SamplingError, check_sampling, sample
from llmscratch.models.gpt import GPT, GPTConfig
from llmscratch.tokenizer import get_tokenizer
from llmscratch.train import TrainConfig, pretrain

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(model="tiny", tokenizer="bpe:320", context_length=32, batch_size=4, eval_every=3,
            eval_batches=2, sample_tokens=0, warmup_steps=2, lr=3e-3, precision="fp32", progress=False, seed=7)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus_file) -> Path:
    """A 6-step pretraining run on the 20 KB corpus slice (seconds)."""
    out = tmp_path_factory.mktemp("ux") / "run"
    pretrain(TrainConfig(**TINY, data=str(corpus_file), out=str(out), max_steps=6))
    return out


@pytest.fixture(scope="module")
def random_run(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ux") / "random"
    save_model(GPT(GPTConfig.from_name("tiny", context_length=32)), out, get_tokenizer("gpt2"))
    return out


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------ sampling settings

BAD_SAMPLING = [
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-3), "top_k"),
    (dict(top_k=2.5), "top_k"),
]


@pytest.mark.parametrize("bad,param", BAD_SAMPLING, ids=lambda v: str(v))
def test_each_sampling_rule_is_one_error_naming_the_setting(bad, param):
    with pytest.raises(SamplingError) as e:
        check_sampling(**{"temperature": 0.8, **bad})
    assert e.value.param == param and param in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, UserError)  # the CLI's exit 2, one line
    with pytest.raises(SamplingError):  # sample itself refuses: no torch error about probabilities
        sample(torch.randn(1, 10), **{"temperature": 0.8, **bad})


def test_valid_sampling_settings_pass():
    for ok in (dict(temperature=0.0), dict(temperature=5), dict(top_k=0), dict(top_k=40), dict(top_p=1.0),
               dict(top_p=0.01), dict(temperature=None, top_k=None, top_p=None)):
        check_sampling(**ok)


@pytest.mark.parametrize("flags,param", [
    (["--temperature", "nan"], "temperature"), (["--temperature", "-1"], "temperature"),
    (["--top-p", "1.5"], "top_p"), (["--top-p", "0"], "top_p"), (["--top-k", "-3"], "top_k"),
])
def test_generate_and_chat_refuse_bad_sampling_in_one_line(capsys, random_run, flags, param):
    for cmd in (["generate", "--model", str(random_run), "--prompt", "x"], ["chat", "--model", str(random_run)]):
        assert param in one_line_error(capsys, cmd + flags)


def test_chat_object_checks_its_settings(random_run):
    from llmscratch.decoding.chat import Chat

    model = GPT(GPTConfig.from_name("tiny", context_length=32))
    with pytest.raises(SamplingError, match="top_p"):
        Chat(model, get_tokenizer("gpt2"), "plain", top_p=2.0)


def test_server_answers_400_with_the_same_rule(random_run):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from llmscratch.serve import BackgroundServer, create_app, load_engine

    engine = load_engine(str(random_run), device="cpu", max_tokens_limit=8)
    with BackgroundServer(create_app(engine)) as s:
        for body, param in (({"temperature": 0.5, "top_k": -3}, "top_k"), ({"top_p": 0.0}, "top_p")):
            r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        # NaN is not JSON, but Python's parser (and some clients) accept the token
        r = httpx.post(s.url + "/v1/completions", content=b'{"prompt": "hi", "temperature": NaN}')
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
        # health checks carry no key; browsers' favicon request is not a 404
        assert httpx.get(s.url + "/favicon.ico").status_code == 204
        card = httpx.get(s.url + "/v1/models").json()["data"][0]
        assert card["kind"] == "base" and "not instruction-tuned" in card["note"]


# ------------------------------------------------------------------------- devices, models


def test_unknown_device_is_one_line(capsys, random_run):
    line = one_line_error(capsys, ["generate", "--model", str(random_run), "--prompt", "hi", "--device", "banana"])
    assert "--device banana" in line and "cpu, cuda" in line
    assert "--device xla" in one_line_error(capsys, ["eval", "--model", str(random_run), "--data", "x",
                                                     "--device", "xla"])


def test_generate_needs_a_model_and_warns_on_a_preset(capsys):
    with pytest.raises(SystemExit) as e:  # argparse: required
        main(["generate", "--prompt", "hi there"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "required: --model" in err and len(err.strip().splitlines()) == 2
    assert main(["generate", "--model", "tiny", "--prompt", "hi", "--max-new-tokens", "2", "--seed", "1"]) == 0
    assert "RANDOM weights" in capsys.readouterr().err


def test_generation_defaults_sample():
    from llmscratch.cli import GenerateArgs
    from llmscratch.cli.args import config_from_args

    cfg = config_from_args(GenerateArgs, build_parser().parse_args(["generate", "--model", "m", "--prompt", "p"]))
    assert (cfg.temperature, cfg.top_k) == (0.8, 40)  # benchmarks/sampling_defaults.py


# -------------------------------------------------------------------------------- resume


def test_resume_takes_the_saved_settings_and_safe_overrides(capsys, base_run, tmp_path, corpus_file):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    # none of the original flags (data, model, tokenizer, batch size...) retyped
    assert main(["pretrain", "--out", str(run), "--resume", "--max-steps", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming from step 6 of 8" in out
    assert "--max-steps 8 (the run was started for 6)" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["data"] == str(corpus_file) and saved["batch_size"] == 4 and saved["max_steps"] == 8


def test_resume_refuses_unsafe_overrides_by_name(capsys, base_run):
    line = one_line_error(capsys, ["pretrain", "--out", str(base_run), "--resume", "--max-steps", "9",
                                   "--lr", "0.5", "--model", "small", "--batch-size", "4"])
    assert "--lr (0.003 -> 0.5)" in line and "--model ('tiny' -> 'small')" in line
    assert "--batch-size" not in line  # the same value as saved is fine
    line = one_line_error(capsys, ["pretrain", "--out", str(base_run), "--resume"])
    assert "already finished its 6 steps" in line and "--max-steps" in line
    assert "holds no checkpoint" in one_line_error(capsys, ["pretrain", "--out", str(base_run / "nope"), "--resume"])


# ---------------------------------------------------------------------------------- eval


def test_eval_defaults_to_the_runs_held_out_split(capsys, base_run):
    assert main(["eval", "--model", str(base_run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "the validation split" in out
    loss = float(re.search(r"^loss\s+([\d.]+)", out, re.M)[1])
    records = [json.loads(line) for line in (base_run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r][-1]
    # all validation windows here vs the run's first eval_batches: the same text, near equal
    assert math.isclose(loss, val, rel_tol=0.05)
    data = json.loads((base_run / "config.json").read_text())["train"]["data"]
    assert main(["eval", "--model", str(base_run), "--data", data, "--split", "all", "--no-progress"]) == 0
    assert "the training part included" in capsys.readouterr().out


def test_eval_says_what_it_evaluated_and_needs_a_model(capsys, random_run, corpus_file):
    assert main(["eval", "--model", str(random_run), "--data", str(corpus_file), "--no-progress",
                 "--max-batches", "1"]) == 0
    assert "all of it (the model records no training data" in capsys.readouterr().out
    assert "--data is needed" in one_line_error(capsys, ["eval", "--model", str(random_run)])
    assert "needs --model" in one_line_error(capsys, ["eval"])
    assert "--split val" in one_line_error(capsys, ["eval", "--model", str(random_run), "--data",
                                                    str(corpus_file), "--split", "val"])
    assert "--model MODEL" in build_parser()._subparsers._group_actions[0].choices["eval"].format_usage()


# ---------------------------------------------------------------------------------- info


def test_info_describes_a_classifier_folder(capsys, tmp_path, random_run):
    from llmscratch.finetune.classify import add_classification_head, save_classifier

    model = GPT(GPTConfig.from_name("tiny", context_length=32))
    add_classification_head(model, 2)
    save_classifier(model, tmp_path / "clf", get_tokenizer("gpt2"), ["ham", "spam"], 24)
    assert main(["info", "--model", str(tmp_path / "clf")]) == 0
    out = capsys.readouterr().out
    assert "classifier: 2 labels ['ham', 'spam']" in out and "24 tokens" in out
    assert f"parameters   {model.num_params():,}" in out
    assert main(["info", "--model", str(random_run)]) == 0
    assert "a base language model" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- chat


def test_chat_on_a_base_model_says_so_once_and_prints_no_blank_lines(random_run):
    import io

    from llmscratch.decoding.chat import chat_loop, load_chat

    chat = load_chat(str(random_run), device="cpu", max_new_tokens=6, temperature=0.0)
    assert chat.template.name == "plain"  # the same default as serve (prompts.template_for)
    stdout, stderr = io.StringIO(), io.StringIO()
    # a reply of whitespace only: what a base model often writes
    chat.send = lambda text: iter(["\n", "\n\n", "  ", "\n"])
    chat_loop(chat, io.StringIO("Hello\nAgain\n/exit\n"), stdout, stderr)
    assert stderr.getvalue().count("not instruction-tuned") == 1
    assert stdout.getvalue() == ">>> Hello\n\n\n>>> Again\n\n"  # a transcript; no blank lines streamed
    assert stderr.getvalue().count("no reply") == 2


def test_chat_reply_is_trimmed_and_blank_runs_cut():
    import io

    from llmscratch.decoding.chat import _write_trimmed

    out = io.StringIO()
    assert _write_trimmed(iter(["\n\n", " Hi", "\n\n\n\n\n", "there", "\n\n \n"]), out)
    assert out.getvalue() == "Hi\n\nthere"


# ---------------------------------------------------------------------------------- help


def _all_parsers(parser: argparse.ArgumentParser, name: str = "llmscratch"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _all_parsers(p, f"{name} {sub}")


def test_every_command_has_examples_and_every_option_a_description():
    parsers = list(_all_parsers(build_parser()))
    assert len(parsers) >= 12
    for name, p in parsers:
        text = p.format_help()
        assert "examples:" in text and "  llmscratch " in text.split("examples:")[1], f"{name}: no example"
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            what = f"{name} {'/'.join(a.option_strings) or a.dest}"
            assert a.help, f"{what}: no description"
            assert a.help.count("default:") <= 1, f"{what}: default shown twice"
            if a.choices:
                assert all(str(c) in a.help for c in a.choices), f"{what}: choices not in its help"


def test_a_wrong_value_is_two_lines_not_the_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--precision", "fp8"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 2
    assert "invalid choice: 'fp8'" in err and "pretrain --help" in err


# ---------------------------------------------------------------------------------- docs


def test_readme_lists_every_notebook_and_its_kernel():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Notebooks", 1)[1].split("\n## ", 1)[0]
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert f"`{nb.stem}`" in section, f"README's notebook list lacks {nb.stem}"
        spec = json.loads(nb.read_text(encoding="utf-8"))["metadata"]["kernelspec"]
        assert f'--name {spec["name"]} --display-name "{spec["display_name"]}"' in section, nb.name


# ------------------------------------------------------------------------------ plots


def test_a_short_runs_loss_plot_marks_its_points(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from llmscratch.train.loop import plot_losses

    calls = []
    real = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: calls.append((a, kw)) or real(self, *a, **kw))
    # a one-epoch classifier run: one training record
    plot_losses([{"examples": 16, "train_loss": 0.7, "val_loss": 0.69}], tmp_path / "loss.png", x="examples")
    train = [kw for a, kw in calls if kw.get("label") == "train"]
    assert train and train[0].get("marker") == "o"  # a lone point drawn as a line is invisible
    assert (tmp_path / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("argv", [
    ["pretrain", "--out", "never-written", "--device", "banana"],
    ["bench", "--quick", "--device", "banana"],
    ["classify", "--model", "m", "--device", "banana", "hi"],
    ["serve", "--model", "tiny", "--device", "banana"],
])
def test_every_command_refuses_an_unknown_device_in_one_line(capsys, argv):
    assert "--device banana: not a device" in one_line_error(capsys, argv)
    assert not Path("never-written").exists()


def test_records_and_messages_are_numbered_from_one_like_lines(tmp_path):
    from llmscratch.evaluation.lm import load_responses
    from llmscratch.finetune.data import read_instruction_records

    path = tmp_path / "responses.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b", "response": "c"}, {"instruction": "a"}]))
    with pytest.raises(UserError, match=r"record 2 has no string field 'output'"):
        load_responses(path)
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}))
    with pytest.raises(UserError, match=r"chats.jsonl:1: message 2 has role 'bot'"):
        read_instruction_records(str(chats))
