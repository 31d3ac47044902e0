"""Masked-LM pretraining: the masking rule's statistics, whole-word masking, masks as a
pure function of the step, the run folder, exact resume, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmscratch.errors import UserError
from llmscratch.train import TrainConfig, pretrain
from llmscratch.train.mlm import IGNORE, MaskingRule, mask_tokens, objective_of

TINY = dict(model="bert-tiny", tokenizer="wordpiece:400", context_length=32, batch_size=4,
            eval_every=5, eval_batches=2, warmup_steps=3, lr=3e-3, precision="fp32", progress=False,
            seed=7, dropout=0.0)


@pytest.fixture(autouse=True)
def _tiny_corpus(corpus_file, monkeypatch):
    monkeypatch.setitem(TINY, "data", str(corpus_file))


def cfg(tmp_path: Path, name: str = "run", **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(tmp_path / name), **kw})


def test_masking_statistics():
    g = torch.Generator().manual_seed(0)
    V, mask_id = 1000, 4
    ids = torch.randint(10, V, (256, 128), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    inputs, labels = mask_tokens(ids, mask_id=mask_id, vocab_size=V, special=special, generator=g)
    selected = labels != IGNORE
    n = selected.sum().item()
    assert n / (~special).sum().item() == pytest.approx(0.15, abs=0.005)
    assert not selected[special].any()  # [CLS]/[SEP] never selected
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(inputs[~selected], ids[~selected])  # unselected tokens untouched
    masked = (inputs[selected] == mask_id).float().mean().item()
    kept = (inputs[selected] == ids[selected]).float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1 + 0.1 / V, abs=0.01)  # kept, or a random draw of itself
    assert 1 - masked - kept == pytest.approx(0.1, abs=0.01)  # replaced by another token


def test_whole_word_masking_selects_words():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 500, (64, 60), generator=g)
    word_start = torch.ones_like(ids, dtype=torch.bool)
    word_start[:, 1::3] = False  # every word is 3 pieces: start, ##, ##... (from position 0)
    word_start[:, 2::3] = False
    special = torch.zeros_like(word_start)
    _, labels = mask_tokens(ids, mask_id=4, vocab_size=500, special=special, word_start=word_start,
                            rule=MaskingRule(whole_word=True), generator=g)
    sel = (labels != IGNORE).view(64, 20, 3)
    assert sel.any()
    assert torch.equal(sel.all(-1), sel.any(-1))  # a word is selected whole or not at all
    assert sel[..., 0].float().mean().item() == pytest.approx(0.15, abs=0.03)


def test_objective_from_model():
    assert objective_of(TrainConfig(model="bert-tiny")) == "mlm"
    assert objective_of(TrainConfig(model="tiny")) == "lm"
    with pytest.raises(UserError, match="--objective mlm trains an encoder"):
        objective_of(TrainConfig(model="tiny", objective="mlm"))
    with pytest.raises(UserError, match="is an encoder"):
        objective_of(TrainConfig(model="bert-tiny", objective="lm"))


def test_run_folder_loss_falls_and_masks_are_per_step(tmp_path):
    res = pretrain(cfg(tmp_path, max_steps=30, eval_every=10, lr=5e-3))
    out = res.out
    for f in ("config.json", "model.safetensors", "tokenizer.json", "train_state.safetensors",
              "metrics.jsonl", "loss.png"):
        assert (out / f).is_file(), f
    conf = json.loads((out / "config.json").read_text())
    assert conf["model"]["model_type"] == "bert" and conf["objective"] == "mlm"
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert 0 <= evals[-1]["val_mlm_acc"] <= 1 and res.val_mlm_acc == evals[-1]["val_mlm_acc"]
    assert res.val_bpb is None
    from llmscratch.models.bert import Bert
    from llmscratch.checkpoints.run import load_model
    from llmscratch.tokenizer import WordPieceTokenizer

    model, tok = load_model(str(out))
    assert isinstance(model, Bert) and isinstance(tok, WordPieceTokenizer)
    assert model.mlm.decoder.weight is model.wte.weight  # the tie survives saving and loading

    # the batch of a step is a pure function of it; the same window later gets other masks
    from llmscratch.train.mlm import MaskedWindows, MLMBatches
    from llmscratch.data import BatchSampler

    ids = torch.arange(5, 305) % (tok.vocab_size - 5) + 5
    src = MLMBatches(BatchSampler(ids.numpy(), 4, 30, seed=0), 1, MaskedWindows(tok, MaskingRule()), 0)
    a, b = src.get(3, 0, 0, 1, torch.device("cpu")), src.get(3, 0, 0, 1, torch.device("cpu"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    halves = [src.get(3, 0, r, 2, torch.device("cpu")) for r in (0, 1)]
    assert torch.equal(torch.cat([h[1] for h in halves]), a[1])  # ranks split the global batch
    assert halves[0][2] == halves[1][2] == a[2] / 2  # ... and divide by half the global count
    epoch = src.sampler.windows_per_epoch // 4  # steps per epoch: step + epoch sees other masks
    assert not torch.equal(src.get(0, 0, 0, 1, "cpu")[1] != IGNORE, src.get(epoch, 0, 0, 1, "cpu")[1] != IGNORE)


def test_resume_equals_uninterrupted_run(tmp_path):
    kw = dict(max_steps=12, eval_every=4, whole_word_masking=True, dropout=0.1)
    full = pretrain(cfg(tmp_path, "full", **kw))
    first = pretrain(cfg(tmp_path, "split", **kw), stop_after=6)
    assert first.interrupted and first.step == 6
    second = pretrain(cfg(tmp_path, "split", resume=True, **kw))
    assert second.step == 12
    a, b = load_file(str(full.out / "model.safetensors")), load_file(str(second.out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(l)["train_loss"] for l in (full.out / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["train_loss"] for l in (second.out / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


def test_cli_pretrain_bert(tmp_path, capsys):
    from llmscratch.cli.main import main

    out = tmp_path / "cli"
    rc = main(["pretrain", "--model", "bert-tiny", "--data", TINY["data"], "--out", str(out),
               "--tokenizer", "wordpiece:300", "--context-length", "24", "--batch-size", "2",
               "--max-steps", "3", "--eval-every", "3", "--eval-batches", "1", "--no-progress",
               "--precision", "fp32"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "masked-token accuracy" in text and "fill-mask" in text
    assert main(["pretrain", "--model", "tiny", "--objective", "mlm", "--data", TINY["data"],
                 "--out", str(tmp_path / "bad")]) == 2
    assert "trains an encoder" in capsys.readouterr().err
    assert main(["pretrain", "--model", "bert-tiny", "--tokenizer", "gpt2", "--data", TINY["data"],
                 "--out", str(tmp_path / "bad2"), "--no-progress"]) == 2
    assert "an encoder needs" in capsys.readouterr().err
    assert main(["pretrain", "--model", "bert-tiny", "--time-budget", "1m", "--data", TINY["data"],
                 "--out", str(tmp_path / "bad3")]) == 2
    assert "--time-budget is not supported for an encoder" in capsys.readouterr().err


def _cli_args(out: Path, **kw) -> list[str]:
    args = []
    for k, v in {**TINY, "out": str(out), **kw}.items():
        flag = "--" + k.replace("_", "-")
        args += [flag if v else "--no-" + flag[2:]] if isinstance(v, bool) else [flag, str(v)]
    return [*args, "--no-progress"]


def _losses(out: Path) -> list[float]:
    return [json.loads(l)["train_loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes follows the single-process MLM trajectory: the ranks
    split one globally masked batch."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    kw = dict(max_steps=4, eval_every=4)
    r = subprocess.run([sys.executable, "-m", "llmscratch", "pretrain", *_cli_args(single, **kw)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "llmscratch", "pretrain", *_cli_args(ddp, **kw)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(ddp) == pytest.approx(_losses(single), abs=1e-4)


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_resume_finishes(tmp_path):
    import subprocess
    import sys

    from conftest import sigterm_after_steps

    out = tmp_path / "killed"
    metrics = out / "metrics.jsonl"
    returncode, err = sigterm_after_steps(["pretrain", *_cli_args(out, max_steps=100000, eval_every=100000)],
                                          metrics)
    assert returncode == 130, err
    assert "checkpoint saved" in err
    step = len(metrics.read_text().splitlines())
    r = subprocess.run([sys.executable, "-m", "llmscratch", "pretrain",
                        *_cli_args(out, max_steps=step + 2, eval_every=100000, resume=True)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(metrics.read_text().splitlines()) == step + 2


class _CopyModel(torch.nn.Module):
    """A stand-in encoder whose prediction at each position is its input token there, with
    logit 5 for that token and 0 for every other: loss and accuracy are then known by hand."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def hidden_states(self, inputs):
        return torch.nn.functional.one_hot(inputs, self.vocab).float()

    def mlm_logits(self, h):
        return 5.0 * h


def test_masked_token_loss_and_accuracy_equal_a_hand_computation():
    import math

    from llmscratch.train.mlm import evaluate_mlm

    V, W = 10, 6
    val_ids = torch.arange(4 * W) % V  # four windows, evaluated two per batch

    def masker(x, generator):  # selects positions 0, 2, 3 of every window: 0 and 2 right, 3 wrong
        labels = torch.full_like(x, IGNORE)
        labels[:, [0, 2]] = x[:, [0, 2]]
        labels[:, 3] = (x[:, 3] + 1) % V
        return x.clone(), labels

    out = evaluate_mlm(_CopyModel(V), val_ids, masker, batch_size=2, window=W, max_batches=None,
                       device=torch.device("cpu"))
    z = math.exp(5) + V - 1
    right, wrong = -math.log(math.exp(5) / z), -math.log(1 / z)
    assert out["val_mlm_acc"] == pytest.approx(2 / 3)  # 8 of 12 selected tokens predicted right
    assert out["val_loss"] == pytest.approx((2 * right + wrong) / 3)
