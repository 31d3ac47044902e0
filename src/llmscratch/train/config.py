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
    """dataset name, text file, folder of .txt files, or a folder of token shards made by llmscratch prepare;
    repeats:CORPUS (or repeats:share=0.9,seed=0:CORPUS) mixes CORPUS with synthetic text whose spans
    repeat, a curriculum for copying from the context (docs/data.md)"""
    model: str = "mini"
    """model preset to train from scratch (a GPT: tiny, mini, small, ...; an encoder: bert-tiny, bert-mini, ...)"""
    n_layer: int | None = None
    """blocks (default: the preset's); --n-layer, --n-head and --n-embd reshape a preset,
    its other settings kept"""
    n_head: int | None = None
    """attention heads per block (default: the preset's; must divide --n-embd)"""
    n_embd: int | None = None
    """model width (default: the preset's)"""
    mlp: str | None = None
    """the MLP: gelu, swiglu or relu2 (ReLU squared; default: the preset's)"""
    qk_norm: bool = False
    """RMS-normalise each attention head's queries and keys (QK-norm)"""
    untied_head: bool = False
    """give the LM head its own weights instead of sharing the token embedding's"""
    zero_init: bool = False
    """start the residual branches' output projections (and an untied head) at zero"""
    logit_softcap: float | None = None
    """cap the logits smoothly at +-this (cap * tanh(logits / cap); e.g. 30)"""
    value_residual: bool = False
    """value residual (ResFormer): each layer after the first attends to the mean of its own
    values and the first layer's"""
    seq_len_warmup: int = 0
    """grow the training sequences from an eighth of --context-length to all of it over this
    many steps (0 = off)"""
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
    """train for this long instead (e.g. 4m, 90s, 1h, counted from the start of pretraining, so
    tokenizer training, evaluations and checkpoints count): warmup, then the peak learning
    rate until the last --decay-fraction of the budget, then a linear decay whose end is
    re-estimated from the recent step speed after every step, so the run ends at the budget
    with its decay complete whatever the machine does meanwhile; the steps taken and the
    decay's start and ends are saved in config.json, and --max-steps N --decay-start D
    --decay-ends E (printed at the end) replays the run exactly"""
    schedule: Literal["auto", "cosine", "wsd"] = "auto"
    """learning-rate schedule after the warmup: cosine (to min_lr_ratio at max_steps), wsd
    (stable, then a linear decay over the last --decay-fraction), or auto: wsd with
    --time-budget, --decay-start or --decay-ends, cosine otherwise"""
    decay_fraction: float = 0.2
    """wsd: the share of the steps (with --time-budget: of the time) spent decaying"""
    decay_start: int | None = None
    """wsd: the first decay step (default: from --decay-fraction; a time budget sets it)"""
    decay_ends: str | None = None
    """wsd: STEP:END pairs where a time budget re-aimed the decay's end (written by
    --time-budget, for replaying its run)"""
    batch_size: int = 16
    """sequences per optimizer step (global, all processes together)"""
    grad_accum: int = 1
    """micro-batches per step; each micro-batch has batch_size sequences"""
    context_length: int | None = None
    """tokens per sequence (default: the preset's)"""
    dropout: float = 0.0
    """dropout on embeddings, attention and residual branches (default 0: a run of minutes sees
    its data about once, and 0 measured better, benchmarks/results/quality_levers.json)"""
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
    eval_task: str | None = None
    """also score zero-/few-shot tasks at each evaluation and log them in metrics.jsonl:
    NAME or NAME:SHOTS, comma-separated, each a built-in task (copy, pattern, arithmetic,
    python-docs-cloze) or a task file (e.g. copy,copy:3 logs task_copy_acc and
    task_copy_3shot_acc: in-context copying as it appears)"""
    eval_task_limit: int = 100
    """--eval-task: examples scored per task at each evaluation"""
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
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun: ddp (every process holds the whole model) or fsdp (FSDP2: parameters,
    gradients and optimizer state sharded across the processes; sharded checkpoints)"""
    logger: Literal["none", "tensorboard"] = "none"
    """also log the metrics to TensorBoard, in OUT/tensorboard (beside metrics.jsonl)"""
    kernels: bool = True
    """swap in the speed kernels (llmscratch.kernels); --no-kernels trains the plain reference model"""
    gradient_checkpointing: bool = False
    """recompute activations in backward: less memory, slower"""
    encoding_errors: Literal["strict", "replace", "ignore"] = "strict"
    """undecodable bytes in local text: strict, replace or ignore"""
    resume: bool = False
    """continue the run in --out from its last checkpoint"""

    FIELD_ORDER = ("data", "model", "n_layer", "n_head", "n_embd", "mlp", "qk_norm", "untied_head", "zero_init",
                   "logit_softcap", "value_residual", "seq_len_warmup", "objective", "whole_word_masking", "out",
                   "tokenizer", "max_steps", "time_budget", "schedule", "decay_fraction", "decay_start",
                   "decay_ends", "batch_size", "grad_accum", "context_length",
                   "dropout", "lr", "min_lr_ratio", "warmup_steps", "optimizer", "weight_decay", "beta1",
                   "beta2", "grad_clip", "eval_every", "eval_batches", "eval_task", "eval_task_limit", "val_fraction",
                   "sample_tokens", "seed",
                   "device", "precision", "compile", "strategy", "logger", "kernels", "gradient_checkpointing", "encoding_errors",
                   "resume", "progress")
    POSITIVE = ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "eval_task_limit",
                "context_length", "n_layer", "n_head", "n_embd")

    def model_overrides(self) -> dict:
        """The preset fields this config changes: its shape flags, --context-length and the
        model levers (--mlp, --qk-norm, --untied-head, --zero-init, --logit-softcap,
        --value-residual)."""
        names = ("n_layer", "n_head", "n_embd", "context_length", "mlp", "logit_softcap")
        changes = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if self.qk_norm:
            changes["qk_norm"] = True
        if self.untied_head:
            changes["tie_weights"] = False
        if self.zero_init:
            changes["zero_init"] = True
        if self.value_residual:
            changes["value_residual"] = True
        return changes

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
        if self.seq_len_warmup < 0:
            raise UserError("--seq-len-warmup must be >= 0")
        if self.value_residual and self.gradient_checkpointing:
            raise UserError("--value-residual and --gradient-checkpointing do not go together yet; drop one")
        if not 0 < self.decay_fraction <= 1:
            raise UserError(f"--decay-fraction must be in (0, 1], got {self.decay_fraction}")
        ends = parse_decay_ends(self.decay_ends)
        if self.decay_start is not None or ends:
            if self.schedule == "cosine":
                raise UserError("--decay-start and --decay-ends belong to the wsd schedule, not cosine")
            if self.time_budget is not None and not self.resume:
                raise UserError("--time-budget sets the decay's start and ends by the clock; drop "
                                "--decay-start/--decay-ends, or replay a run with --max-steps instead")
            start = ends[0][0] if ends else self.decay_start
            if self.decay_start is not None and start != self.decay_start:
                raise UserError(f"--decay-ends starts at step {start}, not at --decay-start {self.decay_start}")
        if self.time_budget is not None:
            parse_duration(self.time_budget)
            if self.schedule == "cosine":
                raise UserError("--time-budget runs the wsd schedule by the clock (a cosine needs its "
                                "step count in advance); drop --schedule cosine")

    # Changing these between a run and its resume would silently train something else.
    RESUME_FIXED = ("data", "model", "n_layer", "n_head", "n_embd", "tokenizer", "batch_size", "grad_accum",
                    "context_length", "dropout", "seed", "val_fraction", "strategy", "mlp", "qk_norm", "untied_head",
                    "zero_init", "logit_softcap", "value_residual", "seq_len_warmup")

    # What `resume_config` lets a resume change: how long to train (the cosine schedule is
    # a function of max_steps, so it stretches from the step the run stopped at), how
    # often to evaluate, and where and how fast to compute. Every other setting keeps the
    # value the run was started with.
    RESUME_SAFE = ("out", "resume", "max_steps", "eval_every", "eval_batches", "eval_task", "eval_task_limit",
                   "sample_tokens", "device",
                   "precision", "compile", "logger", "kernels", "gradient_checkpointing", "progress")


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


def parse_decay_ends(text: str | None) -> list[tuple[int, int]]:
    """`"120:400,150:390"` -> `[(120, 400), (150, 390)]`: the steps at which a time budget
    (re)set the decay's end, and the end it set (see `budget.py`). UserError if malformed."""
    if not text:
        return []
    ends = []
    for item in str(text).split(","):
        step, _, end = item.strip().partition(":")
        try:
            pair = (int(step), int(end))
        except ValueError:
            raise UserError(f"--decay-ends {text!r}: expected STEP:END pairs separated by commas, "
                            "e.g. 120:400,150:390 (as a time-budget run saves them)") from None
        if pair[0] < 0 or pair[1] <= pair[0] or (ends and pair[0] <= ends[-1][0]):
            raise UserError(f"--decay-ends {text!r}: each STEP must be below its END and above the "
                            "previous STEP")
        ends.append(pair)
    return ends


def decay_start_of(cfg) -> int:
    """The WSD schedule's first decay step: `cfg.decay_start`, the first `decay_ends` step,
    or the last `decay_fraction` of `max_steps` (by default never inside the warmup; a time
    budget whose clock runs out during the warmup starts it there)."""
    ends = parse_decay_ends(getattr(cfg, "decay_ends", None))
    if ends:
        return ends[0][0]
    if getattr(cfg, "decay_start", None) is not None:
        return cfg.decay_start
    return max(cfg.warmup_steps, cfg.max_steps - round(cfg.decay_fraction * cfg.max_steps))


def wsd_lr(step: int, peak: float, floor: float, start: int, ends: list[tuple[int, int]],
           max_steps: int) -> float:
    """After the warmup: `peak` until step `start`, then linear decay reaching `floor` at the
    last step (`max_steps - 1`); a decay that starts inside the warmup starts from the warmup's
    rate (`peak` here), to the floor or `min_lr_ratio` of that rate, whichever is lower. Each `(c, end)` of `ends` re-aims the decay from step `c` on:
    from the rate of step `c - 1` linearly to `floor` at step `end - 1` (the last pair's end
    is `max_steps`)."""
    if step < start:
        return peak
    if step >= max_steps:
        return floor
    segments = ends or [(start, max_steps)]
    rate = peak  # the learning rate of the step before the segment
    for i, (first, end) in enumerate(segments):
        last = i == len(segments) - 1
        if last:
            end = max_steps
        if last or step < segments[i + 1][0]:
            return rate + (floor - rate) * min(1.0, (step - first + 1) / max(1, end - first))
        rate = rate + (floor - rate) * min(1.0, (segments[i + 1][0] - first) / max(1, end - first))
    return floor  # unreachable: the last segment returns


def schedule_of(cfg) -> str:
    """"cosine" or "wsd": `cfg.schedule`, with "auto" resolved (wsd under a time budget or a
    given decay start or ends)."""
    schedule = getattr(cfg, "schedule", "cosine")
    if schedule != "auto":
        return schedule
    wsd = any(getattr(cfg, name, None) is not None for name in ("time_budget", "decay_start", "decay_ends"))
    return "wsd" if wsd else "cosine"


def get_lr(step: int, cfg: LoopSettings | RunConfig) -> float:
    """Linear warmup to `cfg.lr`, then cosine decay to `cfg.lr * cfg.min_lr_ratio` at max_steps;
    or, with `cfg.schedule == "wsd"`, stable at `cfg.lr` then a linear decay (`wsd_lr`).

    A pure function of the step (and the settings `lr`, `min_lr_ratio`, `warmup_steps`,
    `max_steps`, and for WSD `decay_start`, `decay_ends`, `decay_fraction`), so a resumed run
    follows the same schedule as an uninterrupted one, and a time-budget run can be replayed.
    """
    min_lr = cfg.lr * cfg.min_lr_ratio
    if schedule_of(cfg) == "wsd":
        # a time budget whose clock runs out during the warmup starts the decay there, from the
        # warmup's rate (the run must end on time with its decay complete)
        start = decay_start_of(cfg)
        if step < min(start, cfg.warmup_steps):
            return cfg.lr * (step + 1) / cfg.warmup_steps
        rate = cfg.lr * min(1.0, start / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        floor = min(min_lr, rate * cfg.min_lr_ratio)
        return wsd_lr(step, rate, floor, start, parse_decay_ends(cfg.decay_ends), cfg.max_steps)
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)
