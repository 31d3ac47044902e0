"""`pretrain --strategy fsdp` under torchrun (gloo, CPU): FSDP2 follows one process, each rank
holds ~1/N of the state, sharded checkpoints resume across process counts, are atomic, and
consolidate into `model.safetensors`; the bad inputs are one-line errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmscratch.checkpoints.sharded import MARKER, latest_sharded, step_folder, temp_folder
from llmscratch.train.state import saved_run

ARGS = dict(model="tiny", tokenizer="bpe:320", context_length=32, batch_size=4, eval_every=3, eval_batches=2,
            sample_tokens=0, warmup_steps=2, lr=3e-3, min_lr_ratio=1.0, precision="fp32", seed=7, dropout=0.0)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _args(corpus: Path, out: Path, **kw) -> list[str]:
    args = ["--data", str(corpus), "--out", str(out), "--no-progress"]
    for k, v in {**ARGS, **kw}.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            args.append(flag)
        else:
            args += [flag, str(v)]
    return args


def _cli(*args: str, nproc: int | None = None) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc else [sys.executable])
    r = subprocess.run([*launcher, "-m", "llmscratch", *args], capture_output=True, text=True, timeout=300, env=ENV)
    return r


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_file):
    """One process, no torchrun (DDP default), 6 steps: the trajectory everything follows."""
    out = tmp_path_factory.mktemp("ref") / "single"
    r = _cli("pretrain", *_args(corpus_file, out, max_steps=6))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_two_fsdp_processes_follow_one_and_hold_half_the_state(tmp_path, corpus_file, reference):
    out = tmp_path / "fsdp2"
    r = _cli("pretrain", *_args(corpus_file, out, max_steps=6, strategy="fsdp"), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(out) == pytest.approx(_losses(reference), abs=1e-4)
    # the run folder ends with consolidated weights: those of the one-process run
    ref, ours = load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert ref.keys() == ours.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], atol=1e-4, rtol=1e-4)
    assert not (out / "train_state.safetensors").exists()  # nothing gathered into one file
    folder = latest_sharded(out)
    assert folder == step_folder(out, 6) and len(list(folder.glob("*.distcp"))) == 2  # one file per rank
    # each rank holds about half of the parameters, gradients and AdamW moments
    held = re.findall(r"fsdp rank (\d)/2 holds params ([\d,]+) B, grads ([\d,]+) B, optimizer state ([\d,]+) B "
                      r"\(the whole model's params: ([\d,]+) B\)", r.stdout)
    assert sorted(h[0] for h in held) == ["0", "1"], r.stdout
    for _, params, grads, optim, full in held:
        params, grads, optim, full = (int(x.replace(",", "")) for x in (params, grads, optim, full))
        print(f"rank holds params {params} B, grads {grads} B, optimizer {optim} B of {full} B")
        assert 0.45 * full < params < 0.55 * full
        assert 0.45 * full < grads < 0.55 * full
        assert 0.9 * full < optim < 1.1 * full  # two moments, each half the model


@pytest.mark.slow
def test_sharded_checkpoint_resumes_on_another_process_count(tmp_path, corpus_file, reference):
    """2 -> 1 and 1 -> 2 processes: stopped at step 3 (a checkpoint), resumed to 6, the
    losses and weights are the uninterrupted run's. A checkpoint folder without its marker
    (a write cut short) is passed over, and the temporary one is cleaned up."""
    ref_losses = _losses(reference)
    ref_weights = load_file(str(reference / "model.safetensors"))
    for first, second in ((2, 1), (1, 2)):
        out = tmp_path / f"w{first}to{second}"
        r = _cli("pretrain", *_args(corpus_file, out, max_steps=3, strategy="fsdp"), nproc=first)
        assert r.returncode == 0, r.stderr[-3000:]
        assert saved_run(out)[1] == 3
        # a later checkpoint whose write was cut short: never loaded
        half = step_folder(out, 5)
        shutil.copytree(step_folder(out, 3), half)
        (half / MARKER).unlink()
        shutil.copytree(step_folder(out, 3), temp_folder(out, 6))
        assert latest_sharded(out) == step_folder(out, 3)
        r = _cli("pretrain", *_args(corpus_file, out, max_steps=6, strategy="fsdp", resume=True), nproc=second)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "resuming from step 3" in r.stdout
        assert _losses(out) == pytest.approx(ref_losses, abs=1e-4), (first, second)
        weights = load_file(str(out / "model.safetensors"))
        for k in ref_weights:
            torch.testing.assert_close(weights[k], ref_weights[k], atol=1e-4, rtol=1e-4)
        assert sorted(p.name for p in (out / "sharded").iterdir()) == ["step-00000006"]


@pytest.mark.slow
def test_consolidate_command_and_a_checkpoint_of_another_shape(tmp_path, corpus_file):
    out = tmp_path / "run"
    r = _cli("pretrain", *_args(corpus_file, out, max_steps=3, strategy="fsdp"), nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    trained = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    r = _cli("consolidate", str(out))
    assert r.returncode == 0, r.stderr
    again = load_file(str(out / "model.safetensors"))
    assert again.keys() == trained.keys()
    for k in trained:
        assert torch.equal(again[k], trained[k]), k
    # the run generates from the consolidated weights, unchanged
    r = _cli("generate", "--model", str(out), "--prompt", "The", "--max-new-tokens", "3", "--seed", "1")
    assert r.returncode == 0, r.stderr
    # a damaged shard (a truncated copy): one line naming the checkpoint, the weights untouched
    shard = next(latest_sharded(out).glob("*.distcp"))
    saved = shard.read_bytes()
    shard.write_bytes(saved[:1000])
    r = _cli("consolidate", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "missing or damaged" in r.stderr and "step-00000003" in r.stderr
    assert load_file(str(out / "model.safetensors")).keys() == trained.keys()
    shard.write_bytes(saved)
    # a config of another shape: one line naming the tensor, nothing written
    conf = json.loads((out / "config.json").read_text())
    conf["model"]["n_embd"] = 32
    (out / "config.json").write_text(json.dumps(conf))
    (out / "model.safetensors").unlink()
    r = _cli("consolidate", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "shape" in r.stderr and "step-00000003" in r.stderr
    assert not (out / "model.safetensors").exists()
    # a resume into another shape is refused before any weight is read: one line (torchrun
    # then adds its own report of the failed process)
    r = _cli("pretrain", *_args(corpus_file, out, max_steps=6, strategy="fsdp", resume=True, n_embd=32), nproc=1)
    assert r.returncode != 0
    assert "error: --resume continues" in r.stderr and "--n-embd (None -> 32)" in r.stderr


def test_fsdp_without_torchrun_is_a_one_line_error(tmp_path, corpus_file):
    out = tmp_path / "o"
    r = _cli("pretrain", *_args(corpus_file, out, max_steps=2, strategy="fsdp"))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and "torchrun" in r.stderr and "--strategy fsdp" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
    r = _cli("consolidate", str(tmp_path))
    assert r.returncode == 2 and "no complete sharded checkpoint" in r.stderr


def test_only_a_marked_checkpoint_counts(tmp_path):
    """The completion rule, without training: a `step-` folder without COMPLETE.json and a
    `.tmp-` folder are both invisible to resume."""
    out = tmp_path / "run"
    assert latest_sharded(out) is None
    for step, marked in ((4, True), (8, False)):
        folder = step_folder(out, step)
        folder.mkdir(parents=True)
        if marked:
            (folder / MARKER).write_text(json.dumps({"step": step, "seen": 1, "settings": {"lr": 1.0}}))
    temp_folder(out, 12).mkdir()
    (temp_folder(out, 12) / MARKER).write_text("{}")  # marked, but never renamed: still a temp
    assert latest_sharded(out) == step_folder(out, 4)
    assert saved_run(out) == ({"lr": 1.0}, 4)


@pytest.mark.slow
def test_sigterm_to_every_process_saves_a_sharded_checkpoint(tmp_path, corpus_file):
    """A scheduler's SIGTERM to the whole job (torchrun and its 2 workers): the workers
    finish the step, write a complete sharded checkpoint together and exit; --resume on 1
    process finishes the run."""
    import signal
    import time

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "llmscratch",
           "pretrain", *_args(corpus_file, out, max_steps=100000, eval_every=100000, strategy="fsdp")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert "checkpoint saved" in err, err[-3000:]
    folder = latest_sharded(out)
    assert folder is not None and len(list(folder.glob("*.distcp"))) == 2
    step = saved_run(out)[1]
    assert step >= 3 and (out / "model.safetensors").is_file()
    r = _cli("pretrain", *_args(corpus_file, out, max_steps=step + 2, eval_every=100000, strategy="fsdp",
                                resume=True), nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(metrics.read_text().splitlines()) == step + 2
