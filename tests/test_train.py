"""The pretraining loop: schedule, exact resume, DDP equivalence, run folder, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import sigterm_after_steps
from llmscratch.errors import UserError
from llmscratch.train import TrainConfig, get_lr, pretrain

TINY = dict(model="tiny", tokenizer="bpe:320", context_length=32, batch_size=4,
            eval_every=5, eval_batches=2, sample_tokens=4, warmup_steps=3, lr=3e-3,
            precision="fp32", progress=False, seed=7)


@pytest.fixture(autouse=True)
def _tiny_corpus(corpus_file, monkeypatch):
    """Every run here trains on a 20 KB slice of the embedded corpus (conftest)."""
    monkeypatch.setitem(TINY, "data", str(corpus_file))


def cfg(tmp_path: Path, name: str = "run", **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(tmp_path / name), **kw})


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def losses(out: Path) -> list[float]:
    return [json.loads(l)["train_loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warmup_then_cosine_to_floor():
    c = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert get_lr(0, c) == pytest.approx(0.1)
    assert get_lr(9, c) == pytest.approx(1.0)
    assert get_lr(10, c) == pytest.approx(1.0)
    assert get_lr(60, c) == pytest.approx(0.55)  # halfway down the cosine
    assert get_lr(110, c) == pytest.approx(0.1)
    lrs = [get_lr(s, c) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_run_folder_and_loss_falls(tmp_path):
    res = pretrain(cfg(tmp_path, max_steps=30, eval_every=10))
    out = res.out
    for f in ("config.json", "model.safetensors", "tokenizer.json", "train_state.safetensors",
              "metrics.jsonl", "loss.png"):
        assert (out / f).is_file(), f
    conf = json.loads((out / "config.json").read_text())
    assert conf["format"] == "llmscratch" and conf["model"]["vocab_size"] == 320
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 31))
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert recs[-1]["train_loss"] < recs[0]["train_loss"] - 1.0
    assert res.val_bpb == pytest.approx(evals[-1]["val_bpb"])
    # the saved model loads and generates
    from llmscratch.checkpoints.run import load_model
    from llmscratch.decoding.generate import generate

    model, tok = load_model(str(out))
    assert tok.vocab_size == 320
    tokens = generate(model, torch.tensor([[1, 2]]), 5)
    assert tokens.shape == (1, 7)
    with torch.no_grad():  # each new token (KV cache) is the argmax of a full forward pass
        assert torch.equal(model(tokens[:, :-1])[0, 1:].argmax(-1), tokens[0, 2:])
    # the trained weights, not a fresh init: the last step's, as the resume state holds them
    from safetensors.torch import load_file

    state = load_file(str(out / "train_state.safetensors"))
    for k, v in model.state_dict().items():
        if "model." + k in state:
            assert torch.equal(v, state["model." + k]), k
    assert sum(k.startswith("model.") for k in state) >= len(model.state_dict()) - 1  # a tied head


def test_shape_flags_reshape_the_preset_and_wordpiece_trains_a_decoder(tmp_path):
    from llmscratch.checkpoints.run import load_model
    from llmscratch.tokenizer import WordPieceTokenizer

    out = pretrain(cfg(tmp_path, max_steps=3, n_layer=1, n_head=2, n_embd=48, tokenizer="wordpiece:300")).out
    shape = json.loads((out / "config.json").read_text())["model"]
    assert (shape["n_layer"], shape["n_head"], shape["n_embd"], shape["context_length"]) == (1, 2, 48, 32)
    model, tok = load_model(str(out))
    assert isinstance(tok, WordPieceTokenizer) and tok.vocab_size <= 300
    assert len(model.h) == 1 and model.config.n_embd == 48
    with pytest.raises(UserError, match=r"different settings: n_embd \(48 -> 64\)"):
        pretrain(cfg(tmp_path, max_steps=4, n_layer=1, n_head=2, n_embd=64, tokenizer="wordpiece:300", resume=True))
    with pytest.raises(UserError, match=r"n_embd \(50\) must be divisible by n_head \(4\)"):
        pretrain(cfg(tmp_path, "odd", max_steps=1, n_embd=50, n_head=4))
    with pytest.raises(UserError, match="--n-layer must be positive"):
        pretrain(cfg(tmp_path, "zero", max_steps=1, n_layer=0))
    with pytest.raises(UserError, match="wordpiece:VOCAB_SIZE"):
        pretrain(cfg(tmp_path, "wp", max_steps=1, tokenizer="wordpiece:many"))


def test_same_seed_same_run(tmp_path):
    a = pretrain(cfg(tmp_path, "a", max_steps=8, dropout=0.1)).out
    b = pretrain(cfg(tmp_path, "b", max_steps=8, dropout=0.1)).out
    assert losses(a) == losses(b)
    for k, v in weights(a).items():
        assert torch.equal(v, weights(b)[k])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_equals_uninterrupted_run(tmp_path, optimizer):
    """20 steps straight == 10 steps, stop, resume to 20 (dropout on: the RNG is restored too;
    with Muon, its momentum buffers too)."""
    kw = dict(max_steps=20, dropout=0.1, grad_accum=2, optimizer=optimizer)
    full = pretrain(cfg(tmp_path, "full", **kw)).out
    first = pretrain(cfg(tmp_path, "split", **kw), stop_after=10)
    assert first.interrupted and first.step == 10
    second = pretrain(cfg(tmp_path, "split", **kw, resume=True))
    assert second.step == 20 and not second.interrupted
    assert losses(first.out) == pytest.approx(losses(full), abs=1e-6)
    wf, ws = weights(full), weights(first.out)
    for k in wf:
        torch.testing.assert_close(ws[k], wf[k], atol=1e-6, rtol=0)


def test_resume_mid_interval_under_bf16_equals_uninterrupted_run(tmp_path, monkeypatch):
    """Stopped at step 7 (evaluations and checkpoints every 5: not a boundary), under bf16
    autocast, resumed to 20 == 20 steps straight. bf16 autocast is forced on, whatever the
    CPU (where it is emulated it is slow, not different)."""
    from llmscratch.train import autocast_dtype, loop

    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    kw = dict(max_steps=20, eval_every=5, dropout=0.1, grad_accum=2, precision="bf16")
    full = pretrain(cfg(tmp_path, "full", **kw)).out
    first = pretrain(cfg(tmp_path, "split", **kw), stop_after=7)
    assert first.interrupted and first.step == 7
    second = pretrain(cfg(tmp_path, "split", **kw, resume=True))
    assert second.step == 20 and not second.interrupted
    assert losses(first.out) == pytest.approx(losses(full), abs=1e-6)
    wf, ws = weights(full), weights(first.out)
    for k in wf:
        torch.testing.assert_close(ws[k], wf[k], atol=1e-6, rtol=0)
    fp32 = pretrain(cfg(tmp_path, "fp32", **{**kw, "precision": "fp32", "max_steps": 2})).out
    assert losses(fp32)[1] != losses(full)[1]  # bf16 really was on


def test_resume_refuses_changed_settings(tmp_path):
    pretrain(cfg(tmp_path, max_steps=2))
    with pytest.raises(UserError, match=r"different settings: batch_size \(4 -> 8\)"):
        pretrain(cfg(tmp_path, max_steps=4, batch_size=8, resume=True))
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        pretrain(cfg(tmp_path, max_steps=4))
    with pytest.raises(UserError, match="holds no checkpoint"):
        pretrain(cfg(tmp_path, "nothing", resume=True))


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--max-steps must be positive"):
        pretrain(cfg(tmp_path, max_steps=0))
    with pytest.raises(UserError, match=r"need at least .*4097"):
        pretrain(cfg(tmp_path, max_steps=1, context_length=4096, model="small"))
    with pytest.raises(UserError, match="unknown model preset"):
        pretrain(cfg(tmp_path, max_steps=1, model="huge"))
    with pytest.raises(UserError, match="bpe:VOCAB_SIZE"):
        pretrain(cfg(tmp_path, max_steps=1, tokenizer="bpe:lots"))
    assert not (tmp_path / "run" / "train_state.safetensors").exists()


def _cli(*args, env_extra=None, **kw):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "llmscratch", *args], capture_output=True, text=True,
                          env=env, timeout=300, **kw)


def _cli_args(out: Path, **kw) -> list[str]:
    opts = {**TINY, "out": str(out), **kw}
    args = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            args += [flag, str(v)]
    return args


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes (gloo) follows the single-process loss trajectory.
    (Dropout off: its masks come from each process's own RNG stream.)"""
    single = tmp_path / "single"
    r = _cli("pretrain", *_cli_args(single, max_steps=6, dropout=0.0))
    assert r.returncode == 0, r.stderr
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "llmscratch", "pretrain", *_cli_args(ddp, max_steps=6, dropout=0.0)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(ddp) == pytest.approx(losses(single), abs=1e-4)
    ws, wd = weights(single), weights(ddp)
    for k in ws:
        torch.testing.assert_close(wd[k], ws[k], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_ddp_time_budget_every_process_follows_rank0s_clock(tmp_path):
    """Under torchrun a time budget's plan is rank 0's, sent to every rank each step: both
    processes take the same steps at the same learning rates (a disagreement would hang or
    diverge), and one process replaying the saved schedule follows the same losses."""
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "llmscratch", "pretrain", *_cli_args(ddp, max_steps=3, dropout=0.0, eval_every=25),
           "--time-budget", "20s"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads((ddp / "config.json").read_text())["train"]
    assert saved["decay_start"] is not None and len(losses(ddp)) == saved["max_steps"] > 3
    single = tmp_path / "single"
    replay = ["--max-steps", str(saved["max_steps"]), "--decay-start", str(saved["decay_start"])]
    if saved["decay_ends"]:
        replay += ["--decay-ends", saved["decay_ends"]]
    r = _cli("pretrain", *_cli_args(single, max_steps=3, dropout=0.0, eval_every=25), *replay)
    assert r.returncode == 0, r.stderr
    lrs = [[json.loads(l)["lr"] for l in (out / "metrics.jsonl").read_text().splitlines()] for out in (ddp, single)]
    assert lrs[0] == lrs[1]  # the same schedule, step for step
    # the same training (gradient all-reduce rounds differently: over 100+ steps the two drift apart
    # by ~1e-4 from step ~50 on, so the first 30 are compared)
    assert losses(ddp)[:30] == pytest.approx(losses(single)[:30], abs=1e-4)


@pytest.mark.slow
def test_ddp_user_error_on_rank0_ends_every_process(tmp_path):
    """A bad --data under torchrun: every rank exits with the message; none hangs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "llmscratch", "pretrain", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    assert r.stderr.count("missing.txt") >= 2  # both ranks report it
    assert not (tmp_path / "o" / "train_state.safetensors").exists()


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_resume_finishes(tmp_path):
    out = tmp_path / "killed"
    args = _cli_args(out, max_steps=100000, eval_every=100000)
    metrics = out / "metrics.jsonl"
    returncode, err = sigterm_after_steps(["pretrain", *args], metrics)
    assert returncode == 130, err
    assert "checkpoint saved" in err
    state = load_file(str(out / "train_state.safetensors"))
    assert "rng.cpu" in state
    step = len(metrics.read_text().splitlines())
    r = _cli("pretrain", *_cli_args(out, max_steps=step + 2, eval_every=100000, resume=True))
    assert r.returncode == 0, r.stderr
    assert len(metrics.read_text().splitlines()) == step + 2


def test_cli_errors_are_one_line(tmp_path):
    r = _cli("pretrain", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and "missing.txt" in r.stderr
    assert "Traceback" not in r.stderr
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff\xfe world " * 10)
    r = _cli("pretrain", "--data", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "byte" in r.stderr and "--encoding-errors replace" in r.stderr
    toml = tmp_path / "run.toml"
    toml.write_text('max_steps = 3\nbogus = 1\n')
    r = _cli("pretrain", "--config", str(toml))
    assert r.returncode == 2 and "bogus" in r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_config_file_and_flags(tmp_path, corpus_file):
    toml = tmp_path / "run.toml"
    toml.write_text(f'data = "{corpus_file}"\nmodel = "tiny"\ntokenizer = "bpe:300"\ncontext-length = 32\n'
                    'batch_size = 2\nmax_steps = 50\neval_every = 2\neval_batches = 1\nprecision = "fp32"\n')
    out = tmp_path / "cfgrun"
    r = _cli("pretrain", "--config", str(toml), "--max-steps", "2", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    conf = json.loads((out / "config.json").read_text())["train"]
    assert conf["max_steps"] == 2 and conf["batch_size"] == 2 and conf["tokenizer"] == "bpe:300"
    assert "run folder:" in r.stdout and "loss.png" in r.stdout
    r = _cli("eval", "--model", str(out), "--data", str(corpus_file), "--max-batches", "2")
    assert r.returncode == 0, r.stderr
    assert "bits/byte" in r.stdout and "perplexity" in r.stdout


def records(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_wsd_schedule_is_stable_then_linear_to_the_floor_and_re_aims_continuously():
    from llmscratch.train.config import wsd_lr

    c = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2)
    assert get_lr(9, c) == pytest.approx(1.0)
    assert get_lr(87, c) == 1.0  # stable until the last fifth: decay from step 88 (110 - 22)
    assert get_lr(88, c) == pytest.approx(1.0 - 0.9 / 22)
    assert get_lr(109, c) == pytest.approx(0.1)  # the last step runs at the floor
    c2 = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, decay_start=50)  # auto -> wsd
    assert get_lr(49, c2) == 1.0 and get_lr(79, c2) == pytest.approx(0.55)
    # re-aimed at step 60 from end 110 to end 80: from the rate of step 59 linearly to the floor at step 79
    at59 = wsd_lr(59, 1.0, 0.1, 50, [], 110)
    assert at59 == pytest.approx(1.0 - 0.9 * 10 / 60)
    ends = [(50, 110), (60, 80)]
    assert wsd_lr(59, 1.0, 0.1, 50, ends, 80) == at59  # steps before the re-aim are unchanged
    assert wsd_lr(60, 1.0, 0.1, 50, ends, 80) == pytest.approx(at59 + (0.1 - at59) / 20)
    assert wsd_lr(79, 1.0, 0.1, 50, ends, 80) == pytest.approx(0.1)
    lrs = [wsd_lr(s, 1.0, 0.1, 50, ends, 80) for s in range(50, 80)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    # a decay that starts inside the warmup (a budget whose clock ran out there) starts from the
    # warmup's rate and ends at min_lr_ratio of it (below the floor)
    c3 = TrainConfig(lr=1.0, warmup_steps=10, max_steps=8, min_lr_ratio=0.1, decay_start=4)
    assert [get_lr(s, c3) for s in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert get_lr(4, c3) == pytest.approx(0.4 - 0.36 / 4) and get_lr(7, c3) == pytest.approx(0.04)


@pytest.fixture
def quiet_clock():
    """What a time-budget test times is the schedule, not the noise: one thread (on a loaded
    2-core machine two threads spin and stall for seconds) and the one-time costs of a fresh
    process paid before (the first plot's import and fonts, the first optimizer)."""
    import importlib

    import io

    importlib.import_module("matplotlib.figure").Figure().savefig(io.BytesIO(), format="png")  # fonts loaded
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_time_budget_cuts_a_warmup_the_clock_cannot_fit(tmp_path, quiet_clock):
    """A 6 s budget with a 10,000-step warmup: the decay starts at 80% of the budget from the
    warmup's rate (the warmup cut short), and the run ends about on time with its decay complete."""
    import time

    t0 = time.perf_counter()
    run = pretrain(cfg(tmp_path, time_budget="6s", warmup_steps=10_000, eval_every=25, kernels=False),
                   step_hook=lambda step: time.sleep(0.01))
    took = time.perf_counter() - t0
    recs = records(run.out)
    start = json.loads((run.out / "config.json").read_text())["train"]["decay_start"]
    # on time (loosely: what this test is about is the schedule; the 5% is the test below's)
    assert abs(took - 6) <= 0.25 * 6, f"{took:.2f} s for a 6 s budget"
    assert recs[start - 1]["elapsed_s"] >= 0.8 * 6 > recs[start - 2]["elapsed_s"]
    assert start < run.step == len(recs) < 10_000
    peak = recs[start - 1]["lr"]
    assert peak == pytest.approx(TINY["lr"] * start / 10_000)  # the warmup, cut short at its step `start`
    assert recs[-1]["lr"] == pytest.approx(min(peak, TINY["lr"]) * 0.1)
    assert all(a["lr"] > b["lr"] for a, b in zip(recs[start - 1:], recs[start:]))


def test_time_budget_run_resumes_on_the_time_it_has_left(tmp_path, quiet_clock):
    """A 6 s budget run stopped after 5 steps (in its stable phase) and resumed: its clock goes
    on from the stopped run's elapsed time, its decay starts at 80% of the budget and completes."""
    import time

    kw = dict(time_budget="6s", eval_every=25, max_steps=3, kernels=False)
    first = pretrain(cfg(tmp_path, **kw), stop_after=5)
    assert first.interrupted and first.step == 5
    stopped_at = records(first.out)[-1]["elapsed_s"]
    time.sleep(1.0)  # time between the runs is not the run's
    second = pretrain(cfg(tmp_path, **kw, resume=True), step_hook=lambda step: time.sleep(0.01))
    recs = records(second.out)
    saved = json.loads((second.out / "config.json").read_text())["train"]
    start = saved["decay_start"]
    assert recs[4]["elapsed_s"] == stopped_at and recs[5]["elapsed_s"] > stopped_at
    assert recs[start - 1]["elapsed_s"] >= 0.8 * 6 > recs[start - 2]["elapsed_s"]
    assert second.step == saved["max_steps"] == len(recs) > start > 5
    assert recs[-1]["lr"] == pytest.approx(TINY["lr"] * 0.1) and 0.8 * 6 < recs[-1]["elapsed_s"] <= 6 * 1.05


def test_time_budget_holds_when_the_machine_slows_down_and_max_steps_replays_it(tmp_path, capsys, quiet_clock):
    """An 8 s budget on a machine whose speed changes partway, 2.5x and 5x (an injected
    per-step delay), before the decay and during it: the run ends within 5% of 8 s (tokenizer training,
    evaluations and checkpoints included), its decay complete; the steps taken and the decay's
    start and ends saved in config.json replay it bit for bit."""
    import time

    budget, t0 = 8.0, time.perf_counter()
    changes = []

    def machine(step: int) -> None:
        # a step takes 20 ms, then 50 ms from 3 s on (slower in the stable phase), 10 ms from 5.5 s
        # on (faster), and 50 ms again from 6.9 s on: 5x slower in the decay (which starts at 6.4 s)
        t = time.perf_counter() - t0
        delay = 0.02 if t < 3 else 0.05 if t < 5.5 else 0.01 if t < 6.9 else 0.05
        if not changes or changes[-1][1] != delay:
            changes.append((step, delay))
        time.sleep(delay)

    run = pretrain(cfg(tmp_path, "budget", time_budget=f"{budget:g}s", eval_every=25, max_steps=3,
                         kernels=False), step_hook=machine)
    took = time.perf_counter() - t0
    assert abs(took - budget) <= 0.05 * budget, f"{took:.2f} s for a {budget:g} s budget"
    # the machine did change speed (all three changes on a quiet machine; a loaded one may skip a phase)
    assert len(changes) >= 2 and changes[-1][1] == 0.05, changes
    saved = json.loads((run.out / "config.json").read_text())["train"]
    recs = records(run.out)
    n, start = saved["max_steps"], saved["decay_start"]
    assert run.step == n == len(recs) and not run.interrupted
    assert recs[-1]["lr"] == pytest.approx(TINY["lr"] * 0.1)  # the decay completed: the last step at the floor
    assert [r["lr"] for r in recs[:start]][-1] == TINY["lr"]  # stable up to the decay
    assert recs[start]["lr"] < TINY["lr"]
    # the decay began once the clock reached 80% of the budget (the first step after it)
    assert recs[start - 1]["elapsed_s"] >= 0.8 * budget > recs[start - 2]["elapsed_s"]
    assert all(b["elapsed_s"] > a["elapsed_s"] for a, b in zip(recs, recs[1:]))
    assert recs[-1]["elapsed_s"] <= took
    assert saved["decay_ends"] and saved["decay_ends"].startswith(f"{start}:")
    assert f"--max-steps {n} --decay-start {start} --decay-ends {saved['decay_ends']}" in capsys.readouterr().out

    again = pretrain(cfg(tmp_path, "again", max_steps=n, decay_start=start, decay_ends=saved["decay_ends"],
                         eval_every=25, kernels=False))
    assert [r["lr"] for r in records(again.out)] == [r["lr"] for r in recs]
    assert losses(again.out) == losses(run.out)
    wb, wa = weights(run.out), weights(again.out)
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], atol=0, rtol=0)


@pytest.mark.parametrize("speeds", [(1.0, 0.5), (1.0, 2.0)])
def test_clock_schedule_on_a_simulated_clock(speeds):
    """`ClockSchedule` against a fake clock (no sleeping): a 100 s budget, 1 s steps, then 2x
    faster or 2x slower from 90 s on (inside the decay, which starts at 80 s): the plan ends
    at the budget within one step (the decay's last step always runs), the final evaluation
    costed, and re-aims the decay's end when the speed changes."""
    from llmscratch.train.budget import ClockSchedule
    from llmscratch.train.config import wsd_lr

    clock = ClockSchedule(deadline=100.0, budget_s=100.0, decay_fraction=0.2, eval_every=1000,
                          eval_batches=3, grad_accum=1)  # an evaluation: 3 batches, about a step's work
    t, step, max_steps, start, ends = 0.0, 0, 10**9, None, []
    while step < max_steps:
        dt = speeds[0] if t < 90 else speeds[1]
        t, step = t + dt, step + 1
        clock.step_done(dt)
        max_steps, start, ends = clock.plan(step, t, max_steps)
        if start is None:
            assert max_steps > step and t < 80
    final_eval = speeds[1]  # the estimate's cost of the final evaluation (none was measured)
    assert abs(t + final_eval - 100) <= speeds[1]
    assert start == 80 and ends[0] == (80, 100 - 1)  # at 80 s: 19 more 1 s steps + a 1 s evaluation fit
    assert len(ends) >= 2 and ends[-1][1] == max_steps == step  # re-aimed, and the run ended at the last end
    lrs = [wsd_lr(s, 1.0, 0.1, start, ends, max_steps) for s in range(start - 1, max_steps)]
    assert lrs[0] == 1.0 and lrs[-1] == pytest.approx(0.1) and all(a > b for a, b in zip(lrs, lrs[1:]))


def test_time_budget_settings_are_checked():
    from llmscratch.train.budget import steps_that_fit
    from llmscratch.train.config import parse_duration

    assert parse_duration("4m") == 240 and parse_duration("90s") == 90 and parse_duration("1.5h") == 5400
    assert parse_duration("30") == 30
    for bad in ("soon", "-1m", "0s", "nan", ""):
        with pytest.raises(UserError, match="expected a positive duration"):
            parse_duration(bad)
    for kw, message in ((dict(time_budget="1m", schedule="cosine"), "drop --schedule cosine"),
                        (dict(time_budget="1m", decay_start=60), "sets the decay's start"),
                        (dict(decay_fraction=0.0), "--decay-fraction must be in"),
                        (dict(decay_ends="10:5"), "each STEP must be below its END"),
                        (dict(decay_ends="a:b"), "STEP:END pairs"),
                        (dict(decay_start=20, decay_ends="30:40"), "not at --decay-start 20"),
                        (dict(decay_start=50, schedule="cosine"), "belong to the wsd schedule")):
        with pytest.raises(UserError, match=message):
            TrainConfig(**kw).validate()
    # 100 s left after step 5, 1 s/step, an evaluation of 5 s at steps 10, 20, ... and at the end:
    # 65 more steps (to step 70) = 65 s + 6 evaluations on the way (10..60) + the final one = 100 s;
    # 66 would also cross the one at 70: 106 s
    assert steps_that_fit(100.0, 1.0, 5, 10, 5.0) == 65
    assert steps_that_fit(99.9, 1.0, 5, 10, 5.0) == 64
    assert steps_that_fit(0.5, 1.0, 5, 10, 5.0) == 1  # never fewer than one more step: the decay's last
