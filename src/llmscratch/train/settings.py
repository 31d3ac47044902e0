"""The settings every training run shares (`RunConfig`), and what the loop reads (`LoopSettings`).

`RunConfig` is the base of pretraining's `TrainConfig` and fine-tuning's `FinetuneConfig`:
the optimisation, precision and run-control fields both have, each declared once with its
type, its doc (the `--help` text, `cli/args.py`) and its check (`validate`). A subclass adds
its own fields, re-declares a shared one where its default or its doc differ (a
re-declaration without a doc keeps the one here), and names the order its flags are listed
in (`FIELD_ORDER`, see `utils.fields_in_order`).

`LoopSettings` is what `loop.fit` needs and nothing else: the schedule, the optimizer, the
precision, when to evaluate, how to show progress. `RunConfig.loop_settings()` builds it
from a run's config, so the loop reads typed fields, not whatever a config happens to have.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ..errors import UserError
from ..utils import fields_in_order

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class LoopSettings:
    """How `loop.fit` trains: built by `RunConfig.loop_settings`, or directly for a new objective.

    The schedule, optimizer and precision fields mean what the fields of the same name of
    `RunConfig` and `TrainConfig` mean (documented there); the last group is the loop's own.
    """

    # the schedule (`config.get_lr`) and when to evaluate and checkpoint
    max_steps: int
    warmup_steps: int
    eval_every: int
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    # the optimizer (`loop.configure_optimizer`) and the step
    optimizer: Literal["adamw", "muon"] = "adamw"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    precision: Precision = "fp32"
    compile: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """several processes: ddp (each holds the whole model) or fsdp (each holds 1/N, `sharding.py`)"""
    logger: Literal["none", "tensorboard"] = "none"
    """also log the metrics to TensorBoard (`out/tensorboard`)"""
    eval_batches: int = 0  # per evaluation: a time budget's estimate of its cost (0: unknown)
    progress: bool = True

    resume: bool = False
    """continue from the run folder's checkpoint (the caller checks it is compatible)"""
    stop_after: int | None = None
    """behave as if interrupted once this step is done (checkpoint, then return with
    `interrupted=True`); the schedule still follows `max_steps`"""
    schedule: Literal["auto", "cosine", "wsd"] = "cosine"
    """after the warmup: cosine to the floor at `max_steps`, or wsd: stable, then linear decay"""
    decay_fraction: float = 0.2
    decay_start: int | None = None
    decay_ends: str | None = None
    """wsd: the decay's first step and its re-aimed ends (`config.wsd_lr`)"""
    budget_s: float | None = None
    """a time budget in seconds (`budget.py`): the wsd decay starts and ends by the clock,
    which `max_steps`, `decay_start` and `decay_ends` then follow"""
    clock_start: float | None = None
    """the `time.perf_counter()` time the run's clock started (default: when `fit` starts);
    each metrics record's `elapsed_s` and a time budget count from it"""
    desc: str = "train"
    """the progress bar's label"""
    plot_title: str = ""
    """the loss plot's title"""


@dataclass
class RunConfig:
    """The settings pretraining (`TrainConfig`) and fine-tuning (`FinetuneConfig`) share.

    Each field is also a flag of their commands (`llmscratch.cli.args`); the defaults and
    docs here are fine-tuning's, and `TrainConfig` re-declares the ones it sets otherwise.
    """

    batch_size: int = 8
    """examples per micro-batch (global, all processes together)"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    lr: float = 5e-5
    """peak learning rate"""
    min_lr_ratio: float = 0.1
    """cosine decay floor, as a fraction of lr"""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.999
    """AdamW beta2"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0 = off)"""
    eval_every: int = 0
    """evaluate and checkpoint every N steps (default 0: at the end of every epoch)"""
    seed: int = 123
    """seed for the data split, the shuffling, the head's init and dropout"""
    device: str = "auto"
    """cpu, cuda, cuda:N, mps or auto"""
    precision: Precision = "fp32"
    """fp32, bf16 (autocast) or auto"""
    dropout: float = 0.0
    """dropout while fine-tuning"""
    kernels: bool = True
    """swap in the speed kernels (llmscratch.kernels); --no-kernels fine-tunes the plain reference model"""
    resume: bool = False
    """continue the run in --out from its last checkpoint (after Ctrl-C or a kill)"""
    progress: bool = True
    """show a progress bar"""
    # fine-tuning fills these in from the data size (`finetune.fit_examples`); pretraining
    # makes them flags
    max_steps: int = field(default=0, repr=False)
    warmup_steps: int = field(default=0, repr=False)

    FIELD_ORDER: ClassVar[tuple[str, ...]] = ()
    """the order of the fields in `--help` and in `settings()` (`utils.fields_in_order`)"""
    POSITIVE: ClassVar[tuple[str, ...]] = ("batch_size", "grad_accum")
    """fields that must be positive where set (None is left to a default)"""
    NOT_RECORDED: ClassVar[tuple[str, ...]] = ()
    """fields `settings()` leaves out, besides the internal ones"""

    def validate(self) -> None:
        """Raise `UserError` for a setting no run can use."""
        for name in self.POSITIVE:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.lr is not None and self.lr <= 0:  # None: chosen later by the model's kind (classify)
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")

    def settings(self) -> dict:
        """The settings a run records (its checkpoint, for `--resume`; its config.json), in
        `--help`'s order: the flags, less `NOT_RECORDED`."""
        return {f.name: getattr(self, f.name) for f in fields_in_order(type(self))
                if f.repr and f.name not in self.NOT_RECORDED}

    def loop_settings(self, **changes) -> LoopSettings:
        """What `loop.fit` runs with: the fields of this config that `LoopSettings` has, then
        `changes` (e.g. `desc`, `stop_after`)."""
        own = {f.name for f in dataclasses.fields(self)}
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(LoopSettings) if f.name in own}
        return LoopSettings(**{**values, **changes})
