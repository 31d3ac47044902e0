"""The one small training loop both fine-tunes share.

Classification and instruction tuning differ only in how a batch is built and how its loss
is computed, so `fit` takes those as functions and does the rest the way pretraining does:
AdamW with weight decay on matrices only (`train.configure_optimizer`), linear warmup then
cosine decay (`train.get_lr`), gradient clipping, bf16 autocast where it pays, an
evaluation after every epoch, a tqdm bar, and Ctrl-C that finishes the step and stops
cleanly (`train._StopFlag`), so the caller still writes a consistent output folder.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from ..train import _StopFlag, autocast_dtype, configure_optimizer, get_lr
from ..utils import atomic_write


@dataclass
class FinetuneConfig:
    """Optimisation settings shared by `finetune classify` and `finetune instruct`.

    The field names match `train.TrainConfig`'s where they mean the same thing, so
    `get_lr` and `configure_optimizer` accept this config unchanged.
    """

    epochs: int = 5
    """passes over the training set"""
    batch_size: int = 8
    """examples per optimizer step"""
    lr: float = 5e-5
    """peak learning rate"""
    min_lr_ratio: float = 0.1
    """cosine decay floor, as a fraction of lr"""
    warmup_fraction: float = 0.05
    """share of all steps spent warming the learning rate up linearly"""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)"""
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0 = off)"""
    seed: int = 123
    """seed for the data split, the shuffling, the head's init and dropout"""
    device: str = "auto"
    """cpu, cuda, cuda:N, mps or auto"""
    precision: str = "fp32"
    """fp32, bf16 (autocast) or auto"""
    progress: bool = True
    """show a progress bar"""
    # filled in by `fit` from the data size, read by `get_lr`
    max_steps: int = field(default=0, repr=False)
    warmup_steps: int = field(default=0, repr=False)

    def validate(self) -> None:
        """Raise `UserError` for a setting no run can use."""
        for name in ("epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_fraction < 1:
            raise UserError(f"--warmup-fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UserError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")


def iter_batches(examples: Sequence, batch_size: int, collate: Callable, shuffle: bool = False,
                 generator: torch.Generator | None = None):
    """Yield `collate(list_of_examples)` for consecutive chunks of `examples`.

    Args:
        examples: any sequence of examples.
        batch_size: examples per batch (the last batch may be smaller: fine-tuning sets
            are small, and dropping it would waste data).
        collate: turns a list of examples into a batch (tensors).
        shuffle: visit the examples in a random order drawn from `generator`.
    """
    order = torch.randperm(len(examples), generator=generator).tolist() if shuffle else range(len(examples))
    order = list(order)
    for i in range(0, len(order), batch_size):
        yield collate([examples[j] for j in order[i:i + batch_size]])


@dataclass
class FitResult:
    history: list[dict]
    """one record per logged step or epoch: {"step", "examples", "train_loss"} or
    {"step", "examples", "epoch", **eval_metrics}"""
    interrupted: bool
    steps: int


def fit(
    model: torch.nn.Module,
    train_examples: Sequence,
    collate: Callable,
    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor],
    cfg: FinetuneConfig,
    device: torch.device,
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    log_every: int = 10,
    desc: str = "fine-tune",
) -> FitResult:
    """Train the parameters of `model` that require grad, for `cfg.epochs` epochs.

    Args:
        model: on `device`; only parameters with `requires_grad` are optimised.
        train_examples: the training set; each epoch visits it in a new seeded order.
        collate: list of examples -> batch (moved to `device` by `loss_fn`).
        loss_fn: `(model, batch) -> scalar loss tensor` (the only task-specific part).
        cfg: optimisation settings (`cfg.max_steps`/`warmup_steps` are set here).
        evaluate: called in eval mode after every epoch; returns metrics to record,
            e.g. `{"val_loss": ..., "val_accuracy": ...}`.
        log_every: record the mean training loss every this many steps.

    Returns:
        A `FitResult` with the loss/metric history; `interrupted` is True when Ctrl-C or
        SIGTERM stopped training early (the model keeps the last finished step's weights).
    """
    cfg.validate()
    steps_per_epoch = math.ceil(len(train_examples) / cfg.batch_size)
    if steps_per_epoch == 0:
        raise UserError("the training set is empty")
    cfg.max_steps = steps_per_epoch * cfg.epochs
    cfg.warmup_steps = int(cfg.warmup_fraction * cfg.max_steps)
    optimizer = configure_optimizer(model, cfg, device)
    amp = autocast_dtype(cfg.precision, device)
    ctx = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(cfg.seed)

    history: list[dict] = []
    step, seen, running, n_running = 0, 0, 0.0, 0
    interrupted = False
    bar = tqdm(total=cfg.max_steps, desc=desc, disable=not cfg.progress, dynamic_ncols=True)
    with _StopFlag() as stop:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            for batch in iter_batches(train_examples, cfg.batch_size, collate, shuffle=True, generator=gen):
                lr = get_lr(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with ctx:
                    loss = loss_fn(model, batch)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                seen += _batch_len(batch)
                running += loss.item()
                n_running += 1
                bar.update(1)
                if step % log_every == 0 or step == cfg.max_steps:
                    history.append({"step": step, "examples": seen, "train_loss": running / n_running})
                    bar.set_postfix(loss=f"{running / n_running:.3f}", lr=f"{lr:.1e}")
                    running, n_running = 0.0, 0
                if stop.set:
                    interrupted = True
                    break
            if evaluate is not None:
                model.eval()
                with torch.no_grad(), ctx:
                    metrics = evaluate(model)
                model.train()
                history.append({"step": step, "examples": seen, "epoch": epoch, **metrics})
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
                bar.write(f"epoch {epoch}: {shown}")
            if interrupted:
                break
    bar.close()
    model.eval()
    return FitResult(history=history, interrupted=interrupted, steps=step)


def _batch_len(batch) -> int:
    """Examples in a batch: the first dimension of its first tensor."""
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0])


def plot_history(history: list[dict], path: str | Path, keys: Sequence[str] = ("train_loss", "val_loss"),
                 title: str = "fine-tuning loss") -> None:
    """Training (per logged step) and evaluation (per epoch) curves against examples seen,
    written atomically as a PNG."""
    from matplotlib.figure import Figure  # not pyplot: leaves a notebook's backend alone

    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.subplots()
    for key in keys:
        pts = [(r["examples"], r[key]) for r in history if key in r]
        if pts:
            style = "-" if key == "train_loss" else "o-"
            ax.plot(*zip(*pts), style, label=key.replace("_", " "), linewidth=1.5)
    ax.set_xlabel("training examples seen")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a parameter shared by two modules counts once."""
    params = list(model.parameters())  # .parameters() yields a shared Parameter once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
