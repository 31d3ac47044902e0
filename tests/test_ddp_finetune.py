"""Instruction tuning and DPO under torchrun follow one process's trajectory.

Pretraining, masked LM and classification have their DDP tests beside them; these two
objectives run on the same loop, and here two CPU processes (gloo) must reproduce the
single-process losses and weights step for step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import synthetic_instructions
from llmscratch import GPT, GPTConfig
from llmscratch.checkpoints.run import save_model
from llmscratch.tokenizer import BPETokenizer

pytestmark = pytest.mark.slow


def _records():
    return synthetic_instructions(40, seed=3)


def _pairs():
    return [{**r, "chosen": r["output"], "rejected": "No. " + r["output"][::-1]} for r in _records()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "base"
    corpus = " ".join(r["instruction"] + " " + r["input"] + " " + r["output"] for r in _records())
    tok = BPETokenizer().train(corpus * 3 + " ### Instruction: ### Input: ### Response: Below is an instruction", 320)
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=128, n_embd=32, n_layer=2, n_head=2)),
               out, tok, extra={"template": "alpaca"})
    return out


def _run(args, ddp: bool):
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if ddp \
        else [sys.executable]
    r = subprocess.run([*prefix, "-m", "llmscratch", *args], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]


def _losses(out):
    return [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "train_loss" in json.loads(line)]


def _same_run(single, ddp, steps):
    assert len(_losses(single)) == steps
    assert _losses(ddp) == pytest.approx(_losses(single), abs=1e-4)
    ws, wd = load_file(str(single / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert ws.keys() == wd.keys()
    for k in ws:
        torch.testing.assert_close(wd[k], ws[k], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("objective", ["instruct", "dpo"])
def test_ddp_matches_one_process(objective, tmp_path, tiny_run):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(_records() if objective == "instruct" else _pairs()))

    def args(out):
        return ["finetune", objective, "--model", str(tiny_run), "--data", str(data), "--out", str(out),
                "--batch-size", "8", "--epochs", "1", "--lr", "1e-3", "--split", "0.8,0.1,0.1",
                "--max-new-tokens", "2", "--no-progress"]

    _run(args(tmp_path / "single"), ddp=False)
    _run(args(tmp_path / "ddp"), ddp=True)
    _same_run(tmp_path / "single", tmp_path / "ddp", steps=4)  # 32 training records, 8 a step
