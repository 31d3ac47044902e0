"""The one training loop with an objective of its own: what a new objective (masked LM,
DPO, ...) gets by being a loss function + a batch source + an evaluation."""

from __future__ import annotations

import json
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmscratch.errors import UserError
from llmscratch.train import LoopSettings, Objective, fit

W_TRUE = torch.tensor([[1.0, -2.0, 0.5, 3.0]])


def toy_settings(**kw) -> LoopSettings:
    """The settings `fit` reads, for a toy run: 20 steps of 2 micro-batches, fp32, no bar."""
    values = dict(max_steps=20, lr=0.3, min_lr_ratio=0.1, warmup_steps=3, weight_decay=0.0, beta1=0.9,
                  beta2=0.99, grad_clip=1.0, grad_accum=2, precision="fp32", progress=False, eval_every=5)
    return LoopSettings(**{**values, **kw})


class Regressor(nn.Module):
    """A linear model with dropout on its input (so resume must restore the RNG too)."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        return self.lin(self.drop(x))


class PointBatches:
    """A `BatchSource`: 8 of 64 fixed points per micro-batch, drawn from (step, micro)."""

    unit = "examples"

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(64, 4, generator=g)
        self.y = self.x @ W_TRUE.T

    def get(self, step, micro, rank, world, device):
        g = torch.Generator().manual_seed(1000 * step + micro)
        rows = torch.randperm(64, generator=g)[:8][rank::world]
        return self.x[rows].to(device), self.y[rows].to(device)

    def seen(self, step):
        return step * 2 * 8

    def epoch_of(self, step):
        return step * 2 * 8 / 64


def mse_loss(model, batch):
    """The objective's loss: module-level, `(model, batch) -> scalar`."""
    x, y = batch
    return F.mse_loss(model(x), y)


def mse_eval(model, source: PointBatches):
    return {"val_loss": F.mse_loss(model(source.x), source.y).item(), "note": "all 64 points"}


def run(out=None, stop_after=None, resume=False, **kw):
    torch.manual_seed(0)
    model = Regressor()
    source = PointBatches()
    objective = Objective(mse_loss, source, lambda m: mse_eval(m, source))
    result = fit(model, objective, toy_settings(resume=resume, stop_after=stop_after, **kw),
                 device=torch.device("cpu"), out=out, settings={"lr": 0.05})
    return model, result


def test_a_new_objective_trains_logs_and_checkpoints(tmp_path):
    model, result = run(tmp_path / "run")
    assert result.step == 20 and result.seen == 320 and not result.interrupted
    assert [r["step"] for r in result.records] == list(range(1, 21))
    evals = [r for r in result.records if "val_loss" in r]
    assert [(r["step"], r["epoch"]) for r in evals] == [(5, 1.25), (10, 2.5), (15, 3.75), (20, 5.0)]
    assert "note" not in evals[0]  # strings are printed, not logged
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] / 4  # it learns the line
    on_disk = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert on_disk == result.records
    assert (tmp_path / "run" / "train_state.safetensors").is_file() and (tmp_path / "run" / "loss.png").is_file()
    assert not model.training  # handed back in eval mode


def test_a_new_objective_resumes_exactly_mid_interval(tmp_path):
    full_model, full = run(tmp_path / "full")
    _, first = run(tmp_path / "split", stop_after=7)
    assert first.interrupted and first.step == 7
    model, second = run(tmp_path / "split", resume=True)
    assert second.step == 20
    assert [r["train_loss"] for r in second.records] == pytest.approx([r["train_loss"] for r in full.records],
                                                                       abs=1e-7)
    for a, b in zip(model.parameters(), full_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


def test_in_memory_fit_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, result = run(None, max_steps=3)
    assert result.step == 3 and len(result.records) == 3
    assert list(tmp_path.iterdir()) == []


def test_a_diverging_loss_is_a_user_error():
    with pytest.raises(UserError, match=r"loss became (nan|inf) at step \d+; lower --lr"):
        run(None, lr=1e30, grad_clip=0.0, warmup_steps=0)


def test_a_config_hands_the_loop_typed_settings():
    from llmscratch.finetune.classify import ClassifyConfig
    from llmscratch.train import TrainConfig

    loop = TrainConfig(optimizer="muon", eval_batches=3).loop_settings(desc="x", stop_after=7)
    assert (loop.optimizer, loop.eval_batches, loop.max_steps, loop.warmup_steps, loop.precision, loop.desc,
            loop.stop_after) == ("muon", 3, 240, 50, "auto", "x", 7)
    # classify's lr defaults by the model's kind (filled before the loop starts): set it here
    ft = ClassifyConfig(lr=2e-4).loop_settings(eval_every=4)
    assert (ft.optimizer, ft.lr, ft.beta2, ft.eval_every, ft.precision, ft.compile) == ("adamw", 2e-4, 0.999, 4,
                                                                                       "fp32", False)


def test_the_shared_checks_run_once_for_both_configs():
    from llmscratch.finetune.classify import ClassifyConfig
    from llmscratch.train import TrainConfig

    for cfg in (TrainConfig(batch_size=0), ClassifyConfig(batch_size=0)):
        with pytest.raises(UserError, match="--batch-size must be positive, got 0"):
            cfg.validate()
    for cfg in (TrainConfig(precision="fp8"), ClassifyConfig(precision="fp8")):
        with pytest.raises(UserError, match="--precision must be auto, fp32 or bf16, got 'fp8'"):
            cfg.validate()
