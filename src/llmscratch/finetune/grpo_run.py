"""`llmscratch finetune grpo`: the settings (`GRPOConfig`) and the run (`finetune_grpo`).

The objective itself (sampling, advantages, the loss, the batch source) is in `grpo.py`,
the tasks and rewards in `rewards.py`. This module checks the inputs, loads the model,
splits the task (the last `--val-size` examples are held out), runs the one loop and
writes the run folder: the model (usable by `generate`, `eval tasks`, ...), `metrics.json`
(held-out accuracy and reward before and after, the history), `metrics.jsonl`, `loss.png`,
`grpo.png` (reward and accuracy, KL, reply length, clip fraction) and `heldout.json` (the
held-out prompts, answers and the greedy replies before and after).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..checkpoints.run import is_run_dir, read_run_config, save_model
from ..decoding.prompts import read_template
from ..errors import UserError
from ..train import Objective, distributed_setup, fit, rank0_first
from ..train.state import STATE_FILE, check_resume
from ..utils import seed_everything, write_json
from .classify import set_dropout, set_trainable
from .common import FinetuneConfig, FinetuneResult, check_out_folder
from .grpo import RolloutBatches, RolloutSettings, encode_prompts, grpo_loss, heldout_scores, plot_grpo
from .lora import merge_lora
from .rewards import Reward, load_reward_task

TASK = "grpo"


@dataclass
class GRPOConfig(FinetuneConfig):
    """Settings of `llmscratch finetune grpo` (plus the shared optimisation settings)."""

    model: str = "runs/sft"
    """run folder (or Hugging Face folder / preset) of a decoder to start from"""
    task: str = "addition"
    """a built-in task (addition, or addition:K for operands of up to K digits) or a .jsonl/.json file of {"prompt", "answer"} (the layout eval tasks reads)"""
    out: str = "runs/grpo"
    """run folder to write"""
    reward: str = "exact"
    """exact (normalised match), number (the reply's last number), regex:PATTERN, or path.py:function (fn(prompt, reply, answer) -> number)"""
    format_pattern: str | None = None
    """a regex the whole reply must match to earn --format-weight more (e.g. '-?\\d+')"""
    format_weight: float = 0.0
    """reward added to a reply that matches --format-pattern"""
    steps: int = 50
    """optimizer steps (rollouts x --ppo-epochs)"""
    batch_size: int = 8
    """prompts per rollout (all processes together); each gets --group-size replies"""
    group_size: int = 8
    """replies sampled per prompt; their rewards are compared within the group (>= 2)"""
    ppo_epochs: int = 1
    """optimizer steps on each rollout before sampling the next"""
    max_new_tokens: int = 16
    """longest reply (a reply also ends at a newline or <|endoftext|>)"""
    temperature: float = 1.0
    """sampling temperature of the rollouts (> 0)"""
    top_k: int | None = None
    """sample from the k likeliest tokens only (default: off)"""
    top_p: float | None = None
    """nucleus sampling threshold (default: off)"""
    clip_low: float = 0.2
    """the ratio is clipped below at 1 - clip_low"""
    clip_high: float = 0.28
    """the ratio is clipped above at 1 + clip_high (DAPO's clip-higher)"""
    kl_coef: float = 0.0
    """weight of the KL penalty to the starting model (0: none, and no reference model kept)"""
    std_normalise: bool = True
    """divide each group's advantages by its reward standard deviation (--no-std-normalise: Dr. GRPO's plain difference)"""
    task_size: int = 2000
    """examples a built-in task generates for training (the held-out ones come on top)"""
    val_size: int = 100
    """held-out examples (the last ones of the task) for the accuracy"""
    trainable: str = "all"
    """all, last-N or lora"""
    lr: float = 2e-5
    warmup_fraction: float = 0.0
    min_lr_ratio: float = 1.0
    """learning-rate floor of the cosine decay, as a fraction of --lr (1: constant)"""
    weight_decay: float = 0.0
    eval_every: int = 10
    """measure the held-out accuracy and checkpoint every N steps"""

    FIELD_ORDER = ("model", "task", "out", "reward", "format_pattern", "format_weight", "steps", "batch_size",
                   "group_size", "ppo_epochs", "max_new_tokens", "temperature", "top_k", "top_p", "clip_low",
                   "clip_high", "kl_coef", "std_normalise", "task_size", "val_size", "trainable", "lr",
                   "min_lr_ratio", "warmup_fraction", "weight_decay", "beta1", "beta2", "grad_clip", "grad_accum",
                   "eval_every", "seed", "device", "precision", "lora_rank", "lora_alpha", "dropout", "overwrite",
                   "kernels", "resume", "progress")
    POSITIVE = ("steps", "batch_size", "grad_accum", "group_size", "ppo_epochs", "max_new_tokens", "task_size",
                "val_size")
    NOT_RECORDED = ("progress", "resume", "epochs")
    RESUME_FIXED = ("model", "task", "reward", "format_pattern", "format_weight", "batch_size", "group_size",
                    "ppo_epochs", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "task_size",
                    "val_size", "trainable", "lora_rank", "lora_alpha", "dropout", "grad_accum", "std_normalise")

    def validate(self) -> None:
        super().validate()
        if self.group_size < 2:
            raise UserError(f"--group-size must be at least 2, got {self.group_size}: advantages compare the replies "
                            "to one prompt with each other, and a group of 1 has nothing to compare with")
        if not self.temperature or self.temperature <= 0:
            raise UserError(f"--temperature must be > 0 for sampling rollouts, got {self.temperature}")
        if not 0 <= self.clip_low < 1 or self.clip_high < 0:
            raise UserError(f"--clip-low must be in [0, 1) and --clip-high >= 0, got {self.clip_low}, {self.clip_high}")
        if self.kl_coef < 0:
            raise UserError(f"--kl-coef must be >= 0, got {self.kl_coef}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.eval_every <= 0:
            raise UserError(f"--eval-every must be positive, got {self.eval_every}")
        if not 0 < self.min_lr_ratio <= 1:
            raise UserError(f"--min-lr-ratio must be in (0, 1], got {self.min_lr_ratio}")


GRPOResult = FinetuneResult  # the one result type of the fine-tuning commands


def check_policy_model(model: str) -> None:
    """A classifier run cannot sample replies: say so before loading anything (an encoder
    is refused once loaded, by its kind)."""
    if is_run_dir(model) and read_run_config(model).get("task") == "classify":
        raise UserError(f"--model {model}: a text classifier (finetune classify) cannot be trained with GRPO; "
                        "give a language model (a pretrain, finetune instruct or grpo run)")


def finetune_grpo(cfg: GRPOConfig, *, stop_after: int | None = None) -> GRPOResult:
    """Train `cfg.model` on `cfg.task` with GRPO (see `grpo.py`); write the run folder
    (see the module docstring). Inputs are checked before anything is written; `--resume`
    continues an interrupted run exactly."""
    cfg.validate()
    if cfg.lora_rank:
        cfg.trainable = "lora"
    reward = Reward(cfg.reward, cfg.format_pattern, cfg.format_weight)
    check_policy_model(cfg.model)
    out = Path(cfg.out)
    if cfg.resume:
        check_resume(out, cfg.settings(), GRPOConfig.RESUME_FIXED)
    else:
        check_out_folder(out, cfg)
    rank, world, device = distributed_setup(cfg.device)
    master = rank == 0
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} (prompts per rollout) must be divisible by the {world} processes")
    examples = rank0_first(world, master, lambda: load_reward_task(cfg.task, cfg.task_size + cfg.val_size))
    if len(examples) <= cfg.val_size:
        raise UserError(f"--task {cfg.task}: {len(examples)} examples leave none to train on after the "
                        f"{cfg.val_size} held out; lower --val-size")
    train, val = examples[:-cfg.val_size], examples[-cfg.val_size:]
    seed_everything(cfg.seed)
    from ..checkpoints.run import load_model

    model, tokenizer = load_model(cfg.model, device=device)
    model.kind.require("generate", "finetune grpo")  # sampling replies needs a decoder
    ctx = model.config.context_length
    train_ids = encode_prompts(tokenizer, train, ctx, cfg.max_new_tokens)
    val_ids = encode_prompts(tokenizer, val, ctx, cfg.max_new_tokens)
    if cfg.kernels:
        from ..kernels import apply_kernels

        apply_kernels(model)
    ref = None
    if cfg.kl_coef > 0:  # the starting model, frozen: the KL penalty's reference
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    if master and not cfg.resume:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("rollout.rank*.safetensors"):  # an overwritten run's
            stale.unlink()

    evaluate = partial(heldout_scores, tokenizer=tokenizer, examples=val, prompts=val_ids, reward=reward,
                       max_new_tokens=cfg.max_new_tokens, rank=rank, world=world)
    before_replies: list[str] = []
    before = heldout_scores(model.eval(), tokenizer, val, val_ids, reward, cfg.max_new_tokens, rank, world,
                            replies_out=before_replies)
    set_dropout(model, cfg.dropout)
    params_line = set_trainable(model, cfg.trainable, cfg.lora_rank, cfg.lora_alpha)
    if master:
        print(f"{len(train)} train / {len(val)} held-out prompts, reward {cfg.reward}, {cfg.batch_size} prompts x "
              f"{cfg.group_size} replies per rollout; held-out accuracy before {100 * before['accuracy']:.1f}%; "
              f"{params_line}", file=sys.stderr)
    settings = RolloutSettings(cfg.batch_size, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                               cfg.top_p, cfg.ppo_epochs, cfg.grad_accum, cfg.std_normalise, cfg.seed)
    batches = RolloutBatches(model, tokenizer, train, train_ids, reward, settings, ref_model=ref, out=out)
    loss = partial(grpo_loss, clip_low=cfg.clip_low, clip_high=cfg.clip_high, kl_coef=cfg.kl_coef,
                   temperature=cfg.temperature)
    loop = cfg.loop_settings(max_steps=cfg.steps, warmup_steps=int(cfg.warmup_fraction * cfg.steps),
                             eval_every=cfg.eval_every, stop_after=stop_after, plot_title="GRPO loss", desc="grpo")
    result = fit(model, Objective(loss, batches, evaluate, metrics=batches.metrics), loop, device=device, out=out,
                 settings=cfg.settings(), rank=rank, world=world, on_checkpoint=batches.forget_before)
    merge_lora(model)

    after_replies: list[str] = []
    after = heldout_scores(model.eval(), tokenizer, val, val_ids, reward, cfg.max_new_tokens, rank, world,
                           replies_out=after_replies)
    metrics = {"before": before, "after": after, "reward": cfg.reward, "task": cfg.task, "n_train": len(train),
               "n_val": len(val), "trainable": cfg.trainable, "interrupted": result.interrupted,
               "steps": result.step, "history": result.records}
    if not master:
        return GRPOResult(out=out, metrics=metrics, interrupted=result.interrupted, params_line=params_line)
    extra = {"task": TASK, "finetune": cfg.settings()}
    template = read_template(cfg.model)
    if template:
        extra["template"] = template
    save_model(model, out, tokenizer, extra=extra)
    mine = list(range(len(val)))[rank::world]
    write_json(out / "heldout.json", [{"prompt": val[i].prompt, "answer": val[i].answer, "before": b, "after": a}
                                      for i, b, a in zip(mine, before_replies, after_replies)])
    write_json(out / "metrics.json", metrics)
    plot_grpo([{"step": 0, **before}] + result.records, out / "grpo.png")
    if not result.interrupted:
        (out / STATE_FILE).unlink(missing_ok=True)
        batches.forget_before(10 ** 12)  # done: no rollout is needed any more
    return GRPOResult(out=out, metrics=metrics, interrupted=result.interrupted, params_line=params_line)
