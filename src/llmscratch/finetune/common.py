"""What both fine-tunes share: their settings, their batches, and how they run the one loop.

Classification and instruction tuning differ only in how a batch is built, how its loss is
computed and how the model is evaluated. Each is an objective of `train.fit` (the loop
pretraining runs): a module-level loss, `EpochBatches` over its examples, and a module-level
evaluation. `fit_examples` sets the schedule from the epochs and calls `fit`, which brings
AdamW, warmup + cosine decay, clipping, accumulation, bf16 autocast, DDP, exact resume
(`--resume`) and checkpoints on Ctrl-C/SIGTERM to fine-tuning too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import UserError
from ..train import FitResult, Objective, check_resume, fit
from ..train.settings import RunConfig
from ..train.state import STATE_FILE


@dataclass
class FinetuneResult:
    """What a fine-tuning command returns: its run folder, final metrics, whether it was
    interrupted (a checkpoint to `--resume` from is in `out`), and the parameter-count line."""

    out: Path
    metrics: dict
    interrupted: bool
    params_line: str = ""


@dataclass
class FinetuneConfig(RunConfig):
    """Optimisation settings shared by `finetune classify`, `instruct` and `dpo`: the fields
    every training run has (`train.RunConfig`, whose defaults are fine-tuning's), plus the
    epochs, the warmup share and LoRA. `fit_examples` turns them into the loop's settings.
    """

    epochs: int = 5
    """passes over the training set"""
    warmup_fraction: float = 0.05
    """share of all steps spent warming the learning rate up linearly"""
    lora_rank: int = 0
    """LoRA rank (implies --trainable lora)"""
    lora_alpha: float = 16.0
    """LoRA scale numerator (update x alpha/rank)"""
    overwrite: bool = False
    """replace an existing model (or unfinished run) in --out"""

    FIELD_ORDER = ("epochs", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup_fraction", "weight_decay",
                   "beta1", "beta2", "grad_clip", "eval_every", "seed", "device", "precision", "lora_rank",
                   "lora_alpha", "dropout", "overwrite", "kernels", "resume", "progress", "max_steps",
                   "warmup_steps")
    POSITIVE = ("epochs", "batch_size", "grad_accum")
    NOT_RECORDED = ("progress", "resume")

    # Changing these between a run and its resume would silently train something else.
    # (The fields of both tasks; a name a task lacks is skipped.)
    RESUME_FIXED = ("model", "data", "batch_size", "grad_accum", "seed", "split", "trainable",
                    "lora_rank", "lora_alpha", "dropout", "max_length", "text_column", "label_column",
                    "format", "val_data", "test_data", "balance", "split_seed", "template", "mask_prompt")

    def validate(self) -> None:
        """Raise `UserError` for a setting no run can use (the shared checks, then fine-tuning's)."""
        super().validate()
        if not 0 <= self.warmup_fraction < 1:
            raise UserError(f"--warmup-fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.eval_every < 0:
            raise UserError(f"--eval-every must be >= 0, got {self.eval_every}")


def iter_batches(examples: Sequence, batch_size: int, collate: Callable):
    """Yield `collate(list_of_examples)` for consecutive chunks of `examples`, in order (for
    evaluation; training batches come from `EpochBatches`). The last may be smaller."""
    for i in range(0, len(examples), batch_size):
        yield collate([examples[j] for j in range(i, min(i + batch_size, len(examples)))])


class EpochBatches:
    """Shuffled passes over a list of examples, as a `train.BatchSource`.

    Micro-batch `g = step * grad_accum + micro` is batch `g % per_epoch` of epoch
    `g // per_epoch`, which visits the examples in an order drawn from a generator seeded
    with `seed` (the epoch-th permutation it draws), so a batch is a pure function of the
    step and resuming needs no other state. The last batch of an epoch may be smaller
    (fine-tuning sets are small; dropping it would waste data). Under DDP, rank r of W
    takes rows r, r + W, ... of each batch, and DDP averages the ranks' mean losses: the
    same as one process wherever the ranks hold equally many rows and the loss is a mean
    over rows (classification, DPO). A loss over tokens, whose number differs from rank to
    rank (instruction tuning), passes `weigh(batch) -> count`: each batch then carries one
    more item, the count over ALL ranks' rows divided by W, and the loss divides its sum by
    it, so DDP's average of the ranks' gradients is one process's mean over every token.
    """

    unit = "examples"

    def __init__(self, examples: Sequence, batch_size: int, collate: Callable, seed: int, grad_accum: int = 1,
                 weigh: Callable | None = None):
        if not examples:
            raise UserError("the training set is empty")
        self.examples = examples
        self.batch_size = batch_size
        self.collate = collate
        self.seed = seed
        self.grad_accum = grad_accum
        self.weigh = weigh
        self.per_epoch = math.ceil(len(examples) / batch_size)
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        """The order of the examples in `epoch` (0-based)."""
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.seed)
            for _ in range(epoch + 1):
                perm = torch.randperm(len(self.examples), generator=gen)
            self._orders = {epoch: perm.tolist()}  # keep one: epochs are visited in order
        return self._orders[epoch]

    def rows(self, step: int, micro: int = 0) -> list[int]:
        """Indices of the examples in micro-batch `micro` of `step` (all ranks)."""
        g = step * self.grad_accum + micro
        epoch, k = divmod(g, self.per_epoch)
        return self.order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

    def get(self, step: int, micro: int, rank: int, world: int, device: torch.device):
        rows = self.rows(step, micro)
        batch = self._collate_share(rows, rank, world)
        batch = tuple(t.to(device) for t in batch)
        if self.weigh is None:
            return batch
        total = sum(self.weigh(self._collate_share(rows, r, world)) if r != rank else self.weigh(batch)
                    for r in range(world))
        return (*batch, max(total, 1) / world)

    def _collate_share(self, rows: list[int], rank: int, world: int):
        mine = rows[rank::world] or rows[-1:]  # a rank left without a row repeats the last one
        return self.collate([self.examples[i] for i in mine])

    def seen(self, step: int) -> int:
        full, k = divmod(step * self.grad_accum, self.per_epoch)
        return full * len(self.examples) + min(k * self.batch_size, len(self.examples))

    def epoch_of(self, step: int) -> float:
        return step * self.grad_accum / self.per_epoch


def check_out_folder(out: Path, cfg: FinetuneConfig) -> None:
    """Refuse to overwrite a finished model or a run in progress, unless asked to; with
    `--resume`, check the run in `out` was started with the same settings."""
    if cfg.resume:
        check_resume(out, cfg.settings(), FinetuneConfig.RESUME_FIXED)
    elif (out / STATE_FILE).exists() and not cfg.overwrite:
        raise UserError(f"{out} holds an unfinished run; pass --resume to continue it, --overwrite "
                        "to start again, or pick another --out")
    elif (out / "config.json").exists() and not cfg.overwrite:
        raise UserError(f"{out} already holds a model; pick another --out or pass --overwrite")


def fit_examples(model: torch.nn.Module, loss: Callable, examples: Sequence, collate: Callable,
                 cfg: FinetuneConfig, *, device: torch.device, evaluate: Callable | None = None,
                 out: Path | None = None, rank: int = 0, world: int = 1, stop_after: int | None = None,
                 title: str = "fine-tuning loss", desc: str = "fine-tune", weigh: Callable | None = None) -> FitResult:
    """Train `model` on `examples` for `cfg.epochs` epochs with the one loop (`train.fit`).

    Args:
        model: on `device`; only parameters with `requires_grad` are optimised.
        loss: module-level `loss(model, batch) -> scalar`, e.g. `classification_loss`.
        examples: the training set; collate: list of examples -> batch (tuple of tensors).
        cfg: the settings; `cfg.max_steps` and `cfg.warmup_steps` are set here.
        evaluate: `evaluate(model) -> {"val_loss": ...}`, run at the end of every epoch
            (or every `cfg.eval_every` steps).
        out: folder for the checkpoint, `metrics.jsonl` and `loss.png`; None: in memory.
        stop_after: stop (checkpointed, `interrupted=True`) once this step is done.
        weigh: for a loss summed over tokens, `weigh(batch) -> count` (see `EpochBatches`).

    Returns:
        The loop's `FitResult`: `records` holds one record per step (`train_loss`, `lr`,
        `examples`) with the evaluation's metrics and `epoch` on evaluation steps.
    """
    cfg.validate()
    batches = EpochBatches(examples, cfg.batch_size, collate, cfg.seed, cfg.grad_accum, weigh)
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    cfg.max_steps = math.ceil(batches.per_epoch * cfg.epochs / cfg.grad_accum)
    cfg.warmup_steps = int(cfg.warmup_fraction * cfg.max_steps)
    eval_every = cfg.eval_every or math.ceil(batches.per_epoch / cfg.grad_accum)
    loop = cfg.loop_settings(eval_every=eval_every, stop_after=stop_after, plot_title=title, desc=desc)
    return fit(model, Objective(loss, batches, evaluate), loop, device=device, out=out, settings=cfg.settings(),
               rank=rank, world=world)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a parameter shared by two modules counts once."""
    params = list(model.parameters())  # .parameters() yields a shared Parameter once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
