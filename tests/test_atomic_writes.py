"""Writes are atomic, and what a killed write leaves behind is cleaned when a run resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from llmscratch.train import TrainConfig, pretrain
from llmscratch.utils import atomic_write, remove_stale_temporaries

_WRITE_THEN_HANG = r"""
import sys, time
from llmscratch.utils import atomic_write
with atomic_write(sys.argv[1]) as f:
    f.write("half of it")
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def test_kill_9_mid_write_keeps_the_old_file_and_the_temporary_is_cleaned(tmp_path):
    target = tmp_path / "metrics.jsonl"
    with atomic_write(target) as f:
        f.write("the old content\n")
    proc = subprocess.Popen([sys.executable, "-c", _WRITE_THEN_HANG, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert target.read_text() == "the old content\n"  # never a half-written file
    left = [p for p in tmp_path.iterdir() if p != target]
    assert len(left) == 1 and left[0].name.startswith(".metrics.jsonl.") and left[0].suffix == ".tmp"
    keep = tmp_path / "notes.tmp"  # a user's own file that merely ends in .tmp stays
    keep.write_text("mine")
    assert remove_stale_temporaries(tmp_path) == left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "notes.tmp"]


def test_resume_removes_temporaries_a_killed_run_left(tmp_path, corpus_file):
    opts = dict(model="tiny", tokenizer="bpe:320", context_length=32, batch_size=4, eval_every=3,
                eval_batches=1, sample_tokens=0, warmup_steps=1, precision="fp32", progress=False,
                data=str(corpus_file), out=str(tmp_path / "run"), max_steps=3)
    out = pretrain(TrainConfig(**opts)).out
    stale = [out / ".model.safetensors.a1b2c3d4.tmp", out / ".train_state.safetensors.x_9y8z7w.tmp",
             out / ".metrics.jsonl.qwertyui.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    res = pretrain(TrainConfig(**{**opts, "max_steps": 4, "resume": True}))
    assert res.step == 4
    assert not [p for p in stale if p.exists()]
    assert not list(out.glob(".*.tmp"))
