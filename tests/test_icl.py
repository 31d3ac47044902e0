"""The in-context-learning pieces: the `repeats:` training corpus (synthetic repeated spans
mixed with a corpus) and `pretrain --eval-task` (task accuracy logged at each evaluation)."""

from __future__ import annotations

import json

import pytest

from llmscratch.cli import main
from llmscratch.data.corpora import load_text
from llmscratch.data.synthetic import SEPARATORS, mix_repeats, parse_repeats_spec, repeat_documents, vocabulary
from llmscratch.errors import UserError
from llmscratch.evaluation.watch import parse_eval_tasks, task_evaluator
from llmscratch.train import TrainConfig, pretrain

# --------------------------------------------------------------------------- the corpus


def test_spec_parsing():
    assert parse_repeats_spec("repeats:python-docs") == ({"share": 0.5, "seed": 0}, "python-docs")
    assert parse_repeats_spec("repeats:share=0.25,seed=9:some/file.txt") == ({"share": 0.25, "seed": 9},
                                                                              "some/file.txt")


@pytest.mark.parametrize("spec, message", [
    ("repeats:", "no corpus after"),
    ("repeats:share=1.5:python-docs", "share must be between 0 and 1"),
    ("repeats:share=abc:python-docs", "share must be a number"),
    ("repeats:seed=1.5:python-docs", "seed must be an integer"),
    ("repeats:size=3:python-docs", "unknown option 'size'"),
])
def test_bad_spec_is_a_one_line_error(spec, message):
    with pytest.raises(UserError, match=message) as e:
        parse_repeats_spec(spec)
    assert "\n" not in str(e.value)


def test_every_synthetic_document_repeats_its_spans():
    words = [f"w{i}" for i in range(50)]
    docs = repeat_documents(words, 20_000, seed=3)
    assert sum(len(d) for d in docs) >= 20_000
    episodes = blocks = 0
    for doc in docs:
        lines = doc.split("\n")
        if len(lines) in (2, 3) and len(set(lines)) == 1:  # the classic form: a block, then itself again
            blocks += 1
            sep = next((s for s in SEPARATORS[1:] if s in lines[0]), " ")
            assert 20 <= len(lines[0].split(sep)) <= 60
            continue
        for line in lines:  # an episode: span, filler, the same span
            k = max(k for k in range(1, len(line) // 2 + 1)
                    if line[:k] == line[-k:] and line[k] == " " and line[-k - 1] == " ")
            span = line[:k]
            sep = next((s for s in SEPARATORS[1:] if s in span), " ")
            assert 2 <= len(span.split(sep)) <= 10, line
            episodes += 1
    assert blocks and episodes  # both kinds


def test_the_mix_is_deterministic_and_has_its_share(docs_text):
    base = [("docs", docs_text[:40_000])]
    a = mix_repeats(base, share=0.5, seed=1)
    assert a == mix_repeats(base, share=0.5, seed=1)
    assert a != mix_repeats(base, share=0.5, seed=2)
    synthetic = sum(len(t) for n, t in a if n.startswith("repeats:"))
    natural = sum(len(t) for n, t in a if not n.startswith("repeats:"))
    assert natural == 40_000 and 0.45 < synthetic / (synthetic + natural) < 0.55
    assert a[0][0] == "docs:0" and a[-1][0].startswith("repeats:")  # the corpus cut up, synthetic between
    names = [n for n, _ in a]
    assert names.index("docs:1") < names.index(f"repeats:{len([n for n in names if 'repeats' in n]) - 1}")
    # the spans are the corpus's own words, never an evaluation task's assignments
    words = set(vocabulary([docs_text[:40_000]]))
    assert all(w in words for _, t in a if _.startswith("repeats:") for w in t.split() if w.isalpha())
    assert not any('= "' in t for n, t in a if n.startswith("repeats:"))


def test_load_text_reads_the_spec(corpus_file):
    docs = load_text(f"repeats:share=0.3:{corpus_file}")
    assert docs[0].text.startswith(corpus_file.read_text(encoding="utf-8")[:100])
    assert any(d.name.startswith("repeats:") for d in docs)
    with pytest.raises(UserError, match="no such file"):
        load_text("repeats:/no/such/corpus.txt")


def test_cli_bad_repeats_spec_is_one_line(capsys, tmp_path):
    # its own --out: the default runs/pretrain may hold README command 1's run in a user's clone
    assert main(["pretrain", "--data", "repeats:share=2:python-docs", "--max-steps", "1",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "share must be between 0 and 1" in err and "\n" not in err and "Traceback" not in err


# --------------------------------------------------------------------------- the eval hook


def test_parse_eval_tasks():
    assert parse_eval_tasks("copy,copy:3, pattern") == [("copy", 0), ("copy", 3), ("pattern", 0)]
    with pytest.raises(UserError, match="NAME or NAME:SHOTS"):
        parse_eval_tasks("copy:x")


def test_bad_task_name_fails_before_training():
    with pytest.raises(UserError, match="--eval-task.*not a built-in task") as e:
        task_evaluator("cpoy")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="--shots 500 needs"):
        task_evaluator("copy:500")


def test_pretrain_logs_task_accuracy(tmp_path, corpus_file, capsys):
    out = tmp_path / "run"
    code = main(["pretrain", "--data", f"repeats:{corpus_file}", "--model", "tiny", "--tokenizer", "bpe:300",
                 "--max-steps", "4", "--eval-every", "2", "--eval-batches", "1", "--batch-size", "2",
                 "--context-length", "64", "--sample-tokens", "0", "--eval-task", "copy,pattern:1",
                 "--eval-task-limit", "8", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["task_copy_acc"] in {k / 8 for k in range(9)}  # a share of the 8 examples scored
        assert 0 <= r["task_pattern_1shot_acc"] <= 1
    assert evals[1]["process_cpu_s"] > evals[0]["process_cpu_s"] > 0  # what the skill cost, in CPU seconds
    assert "task_copy_acc" in capsys.readouterr().out  # shown with the validation loss


def test_cli_bad_eval_task_is_one_line(tmp_path, capsys):
    assert main(["pretrain", "--data", "python-docs", "--eval-task", "nope", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--eval-task" in err and "not a built-in task" in err and "\n" not in err
    assert not (tmp_path / "r").exists()  # failed before the run folder was made


def test_pretrain_without_the_evaluator_says_how():
    with pytest.raises(UserError, match="pretrain_watching"):
        pretrain(TrainConfig(eval_task="copy"))
