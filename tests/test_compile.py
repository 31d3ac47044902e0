"""`--compile`: training through `torch.compile` gives the eager run's losses and weights (a
tiny model on the CPU, a few steps, no dropout: compiled code draws other masks), and the
run folder it writes is a plain one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmscratch.checkpoints.run import load_model
from llmscratch.cli.main import main


def have_compiler() -> bool:
    return shutil.which("cc") is not None or shutil.which("gcc") is not None


@pytest.mark.slow
@pytest.mark.skipif(not have_compiler(), reason="torch.compile on the CPU needs a C compiler (cc)")
def test_compiled_pretraining_equals_eager(tmp_path, corpus_file):
    def run(name, *flags):
        out = tmp_path / name
        argv = ["pretrain", "--model", "tiny", "--tokenizer", "bpe:300", "--data", str(corpus_file),
                "--context-length", "16", "--batch-size", "2", "--max-steps", "3", "--eval-every", "3",
                "--eval-batches", "1", "--sample-tokens", "0", "--seed", "5", "--no-kernels", "--no-progress",
                "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--dropout", "0", "--out", str(out), *flags]
        assert main(argv) == 0
        return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    eager, eager_log = run("eager")
    compiled, compiled_log = run("compiled", "--compile")
    assert json.loads((compiled / "config.json").read_text())["train"]["compile"] is True
    for a, b in zip(eager_log, compiled_log, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4, abs=1e-4)
    m1, _ = load_model(str(eager))
    m2, _ = load_model(str(compiled))  # saved without torch.compile's wrapper ("_orig_mod.")
    for (k, a), (k2, b) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert k == k2
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)
