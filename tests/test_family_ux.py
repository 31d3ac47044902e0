"""What a new user of the model family sees (issue 30): progress in a piped log, a piped
chat transcript, and the outputs that say what happened."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmscratch.checkpoints.run import save_model
from llmscratch.models.gpt import GPT, GPTConfig
from llmscratch.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def random_run(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("family") / "random"
    save_model(GPT(GPTConfig.from_name("tiny", context_length=32)), out, get_tokenizer("gpt2"))
    return out


def test_progress_in_a_piped_log_is_plain_lines(tmp_path, corpus_file):
    """stderr not a terminal: no carriage-return redraws, a plain line at the start and at the
    end of the bar (and one per $LLMSCRATCH_PROGRESS_INTERVAL seconds between)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("LLMSCRATCH_PROGRESS_INTERVAL", None)
    done = subprocess.run(
        [sys.executable, "-m", "llmscratch", "pretrain", "--data", str(corpus_file), "--model", "tiny",
         "--tokenizer", "bpe:300", "--context-length", "32", "--batch-size", "4", "--max-steps", "8",
         "--eval-every", "4", "--eval-batches", "1", "--sample-tokens", "0", "--warmup-steps", "2",
         "--precision", "fp32", "--no-kernels", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert "\r" not in err
    bar = [line for line in err.splitlines() if "/8 [" in line]
    assert bar and "8/8" in bar[-1] and "100%" in bar[-1]
    assert len(bar) <= 4  # the 30 s interval: start, end (and an eval's redraw), not one per step


def test_progress_bar_interval_and_terminal(monkeypatch):
    from llmscratch.utils import progress_bar

    monkeypatch.setenv("LLMSCRATCH_PROGRESS_INTERVAL", "0")
    log = io.StringIO()
    for _ in progress_bar(range(5), desc="x", file=log):
        pass
    lines = log.getvalue().splitlines()
    assert len(lines) >= 5 and lines[-1].startswith("x: 100%") and "\r" not in log.getvalue()

    class Tty(io.StringIO):
        def isatty(self):
            return True

    term = Tty()
    for _ in progress_bar(range(5), desc="x", file=term):
        pass
    assert "\r" in term.getvalue()  # a terminal keeps the redrawn bar


def test_piped_chat_is_a_transcript(random_run):
    from llmscratch.decoding.chat import chat_loop, load_chat

    chat = load_chat(str(random_run), device="cpu", max_new_tokens=6, temperature=0.0)
    replies = iter([["I am", " fine."], ["A model", "\n\nof text."]])
    chat.send = lambda text: iter(next(replies))
    stdout, stderr = io.StringIO(), io.StringIO()
    assert chat_loop(chat, io.StringIO("Hello\nWho are you?\n"), stdout, stderr) == 2
    assert stdout.getvalue() == ">>> Hello\nI am fine.\n\n>>> Who are you?\nA model\n\nof text.\n"


def test_info_shows_real_widths_counts_and_flops(tmp_path, capsys):
    """`info`: a BERT's MLP width where the config says 0/None, a classifier's parameter count
    as fine-tuning printed it (count_params), a tiny Llama's FLOPs not rounded to 0.00."""
    from llmscratch.cli.main import main
    from llmscratch.finetune.classify import add_classification_head, save_classifier
    from llmscratch.finetune.common import count_params
    from llmscratch.models.bert import Bert, BertConfig
    from llmscratch.tokenizer import WordPieceTokenizer

    tok = WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(195)])
    bert = Bert(BertConfig.from_name("bert-tiny", vocab_size=200, context_length=32))
    save_model(bert, tmp_path / "bert", tok)
    assert main(["info", "--model", str(tmp_path / "bert")]) in (0, None)
    out = capsys.readouterr().out
    assert f"(the MLP width {bert.config.mlp_width})" in out or f"intermediate_size  {bert.config.mlp_width}" in out
    add_classification_head(bert, 2)
    save_classifier(bert, tmp_path / "clf", tok, ["ham", "spam"], 16)
    assert main(["info", "--model", str(tmp_path / "clf")]) in (0, None)
    assert f"parameters   {count_params(bert)[1]:,}" in capsys.readouterr().out
    assert main(["info", "--model", "llama-tiny"]) in (0, None)
    flops = [line for line in capsys.readouterr().out.splitlines() if line.startswith("training")][0]
    assert "0.00 GFLOP" not in flops and float(flops.split()[1]) > 0
