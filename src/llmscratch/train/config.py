"""Pretraining settings (`TrainConfig`, on the shared `settings.RunConfig`) and the learning-rate
schedule (`get_lr`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import UserError
from .settings import LoopSettings, Precision, RunConfig


@dataclass
class TrainConfig(RunConfig):
    """Everything a pretraining run needs. Each field is also a `llmscratch pretrain` flag: its
    type, default and the string under it become the flag, its parsing and its help
    (`llmscratch.cli.args`). The settings fine-tuning shares come from `RunConfig`
    (`settings.py`); those re-declared here have pretraining's defaults and docs."""

    data: str = "python-stdlib"
    """dataset name, text file, or folder of .txt files"""
    model: str = "mini"
    """model preset to train from scratch (a GPT: tiny, mini, small, ...; an encoder: bert-tiny, bert-mini, ...)"""
    n_layer: int | None = None
    """blocks (default: the preset's); --n-layer, --n-head and --n-embd reshape a preset,
    its other settings kept"""
    n_head: int | None = None
    """attention heads per block (default: the preset's; must divide --n-embd)"""
    n_embd: int | None = None
    """model width (default: the preset's)"""
    objective: Literal["auto", "lm", "mlm"] = "auto"
    """lm (next token, a GPT), mlm (masked LM, an encoder), or auto: from --model"""
    whole_word_masking: bool = False
    """mlm: mask all WordPiece pieces of a word together"""
    out: str = "runs/pretrain"
    """run folder for config, weights, tokenizer, state, metrics, plot"""
    tokenizer: str = "bpe:8192"
    """bpe:VOCAB (train a byte-level BPE on the data), wordpiece:VOCAB (train an uncased
    WordPiece, as BERT's), gpt2, or a tokenizer.json (default: bpe:8192 for a GPT,
    wordpiece:8192 for an encoder, which reads bpe:N as wordpiece:N; a vocabulary the text
    cannot fill stops short, with a warning giving its real size)"""
    max_steps: int = 240
    """optimizer steps to train for"""
    time_budget: str | None = None
    """train for about this long instead (e.g. 4m, 90s, 1h, counted from the command's start):
    the step count is fixed at the end of the warmup (at most 50 steps) from the speed of
    its later steps, printed, and saved as max_steps in config.json, so --max-steps N
    repeats the run exactly"""
    batch_size: int = 16
    """sequences per optimizer step (global, all processes together)"""
    grad_accum: int = 1
    """micro-batches per step; each micro-batch has batch_size sequences"""
    context_length: int | None = None
    """tokens per sequence (default: the preset's)"""
    dropout: float = 0.1
    """dropout on embeddings, attention and residual branches"""
    lr: float = 1e-3
    warmup_steps: int = 50
    """linear warmup steps"""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw, or muon: orthogonalised momentum for the blocks' weight matrices, AdamW for the rest"""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only, not biases/norms)"""
    beta2: float = 0.95
    eval_every: int = 40
    """evaluate, sample and checkpoint every N steps"""
    eval_batches: int = 20
    """validation batches per evaluation"""
    val_fraction: float = 0.1
    """share of the tokens held out for validation (the tail)"""
    sample_tokens: int = 60
    """tokens generated at each evaluation (0 = none)"""
    seed: int = 1337
    """seed for init, data order and dropout"""
    precision: Precision = "auto"
    """fp32, bf16 (autocast, fp32 master weights) or auto"""
    compile: bool = False
    """torch.compile the model and its loss"""
    kernels: bool = True
    """swap in the speed kernels (llmscratch.kernels); --no-kernels trains the plain reference model"""
    gradient_checkpointing: bool = False
    """recompute activations in backward: less memory, slower"""
    encoding_errors: Literal["strict", "replace", "ignore"] = "strict"
    """undecodable bytes in local text: strict, replace or ignore"""
    resume: bool = False
    """continue the run in --out from its last checkpoint"""

    FIELD_ORDER = ("data", "model", "n_layer", "n_head", "n_embd", "objective", "whole_word_masking", "out",
                   "tokenizer", "max_steps", "time_budget", "batch_size", "grad_accum", "context_length",
                   "dropout", "lr", "min_lr_ratio", "warmup_steps", "optimizer", "weight_decay", "beta1",
                   "beta2", "grad_clip", "eval_every", "eval_batches", "val_fraction", "sample_tokens", "seed",
                   "device", "precision", "compile", "kernels", "gradient_checkpointing", "encoding_errors",
                   "resume", "progress")
    POSITIVE = ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "context_length",
                "n_layer", "n_head", "n_embd")

    def model_overrides(self) -> dict:
        """The preset fields this config changes: its shape flags and --context-length."""
        names = ("n_layer", "n_head", "n_embd", "context_length")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def validate(self) -> None:
        """Raise `UserError` for a setting no run can use (the shared checks, then pretraining's)."""
        super().validate()
        from ..models.bert import BertConfig
        from ..models.gpt import GPTConfig
        from ..models.configs import all_presets_text

        if self.model not in GPTConfig.presets() + BertConfig.presets():
            raise UserError(f"--model: unknown model preset {self.model!r}; choose one of: {all_presets_text()}")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.warmup_steps < 0:
            raise UserError("--warmup-steps must be >= 0")
        if self.time_budget is not None:
            parse_duration(self.time_budget)
            if self.warmup_steps < BUDGET_CALIBRATION_STEPS:
                raise UserError(f"--time-budget measures the speed of the first {BUDGET_CALIBRATION_STEPS} "
                                f"steps, which must be warmup steps (whose learning rate does not depend on "
                                f"the step count); raise --warmup-steps from {self.warmup_steps} to at least "
                                f"{BUDGET_CALIBRATION_STEPS}")

    # Changing these between a run and its resume would silently train something else.
    RESUME_FIXED = ("data", "model", "n_layer", "n_head", "n_embd", "tokenizer", "batch_size", "grad_accum",
                    "context_length", "dropout", "seed", "val_fraction")

    # What `resume_config` lets a resume change: how long to train (the cosine schedule is
    # a function of max_steps, so it stretches from the step the run stopped at), how
    # often to evaluate, and where and how fast to compute. Every other setting keeps the
    # value the run was started with.
    RESUME_SAFE = ("out", "resume", "max_steps", "eval_every", "eval_batches", "sample_tokens", "device",
                   "precision", "compile", "kernels", "gradient_checkpointing", "progress")


def vocab_size_of(spec: str) -> int:
    """N of a `kind:N` tokenizer spec; UserError if it is not a number."""
    kind, _, size = spec.partition(":")
    try:
        return int(size)
    except ValueError:
        raise UserError(f"--tokenizer {spec!r}: expected {kind}:VOCAB_SIZE, e.g. {kind}:4096") from None


def resume_config(out, given: dict) -> tuple[TrainConfig, int]:
    """The settings to continue the run in `out`: the ones it was started with (saved in its
    checkpoint), with the settings in `given` applied where `TrainConfig.RESUME_SAFE` allows.

    Returns:
        `(config, step)`: the config (with `resume=True`) and the step the run stopped at.

    Raises:
        UserError: no checkpoint in `out`; `given` changes a setting that is not safe to
            change mid-run (each named, with its saved value); or the run already reached
            `max_steps`.
    """
    from .state import saved_run

    saved, step = saved_run(out)
    # a setting the run's checkpoint predates had its default value
    values = TrainConfig().settings()
    values.update({k: v for k, v in saved.items() if k in values})
    refused = [f"--{k.replace('_', '-')} ({values[k]!r} -> {v!r})" for k, v in sorted(given.items())
               if k not in TrainConfig.RESUME_SAFE and values.get(k) != v]
    if refused:
        raise UserError(f"--resume continues {out} with the settings it was started with; these cannot change "
                        f"mid-run: {', '.join(refused)} (start a new run with another --out to change them)")
    values.update(given)
    values.update(out=str(out), resume=True)
    cfg = TrainConfig(**values)
    if step >= cfg.max_steps:
        raise UserError(f"--resume: the run in {out} already finished its {cfg.max_steps} steps (at step {step}); "
                        f"pass --max-steps N (more than {step}) to train it further")
    return cfg, step


# A time budget fixes the step count at the end of the warmup (whose learning rate does not
# depend on the step count), from the speed of its later steps: the first ones run slow
# (allocation, first touch, caches), by 10-25% over the first five on a 2-core CPU, which
# is why only the later four fifths count. It needs at least BUDGET_CALIBRATION_STEPS
# warmup steps, and times at most BUDGET_CALIBRATION_MAX.
BUDGET_CALIBRATION_STEPS = 5
BUDGET_CALIBRATION_MAX = 50


def budget_calibration(warmup_steps: int) -> tuple[int, int]:
    """`(first, last)`: a time budget's step count is fixed after step `last`, from the
    time steps `first + 1` to `last` took."""
    last = min(warmup_steps, BUDGET_CALIBRATION_MAX)
    return max(1, last // 5), last


def parse_duration(text: str) -> float:
    """Seconds in a duration like `90s`, `4m`, `1.5h` or `240` (seconds)."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    raw = str(text).strip().lower()
    number, unit = (raw[:-1], units[raw[-1]]) if raw and raw[-1] in units else (raw, 1.0)
    try:
        seconds = float(number) * unit
    except ValueError:
        seconds = float("nan")
    if not math.isfinite(seconds) or seconds <= 0:
        raise UserError(f"--time-budget {text!r}: expected a positive duration such as 4m, 90s or 1h")
    return seconds


def steps_for_budget(seconds_left: float, step_seconds: float, steps_done: int, eval_every: int,
                     eval_seconds: float) -> int:
    """The total step count that fits in `seconds_left` more seconds after `steps_done`
    steps, each taking `step_seconds`, with an evaluation (`eval_seconds`) every
    `eval_every` steps and at the end. At least `steps_done + 1`."""
    per_step = step_seconds + eval_seconds / eval_every
    more = int((seconds_left - eval_seconds) / per_step)
    return max(steps_done + 1, steps_done + more)


def get_lr(step: int, cfg: LoopSettings | RunConfig) -> float:
    """Linear warmup to `cfg.lr`, then cosine decay to `cfg.lr * cfg.min_lr_ratio` at max_steps.

    A pure function of the step (and the settings `lr`, `min_lr_ratio`, `warmup_steps`,
    `max_steps`), so a resumed run follows the same schedule as an uninterrupted one.
    """
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)
