"""`llmscratch pretrain`: a GPT (or, with an encoder preset, a BERT) from scratch into a run
folder, or `--resume` of one with the settings it was started with."""

from __future__ import annotations

import sys

from .args import config_from_args, given_settings


def cmd_pretrain(args) -> int:
    """Pretrain a GPT from scratch on a corpus, writing a self-contained run folder."""
    from ..evaluation.watch import pretrain_watching
    from ..train import TrainConfig
    from ..kernels import reuse_freed_memory

    given = given_settings(TrainConfig, args)
    if given.get("resume"):  # the run's own settings, and the safe changes given now
        cfg = resume_settings(given)
    else:
        cfg = config_from_args(TrainConfig, args)
    reuse_freed_memory()
    result = pretrain_watching(cfg)  # train.pretrain, plus the --eval-task scores
    out = result.out
    if result.interrupted:
        print(f"\ninterrupted at step {result.step}: checkpoint saved in {out}; "
              f"continue with --resume --out {out}", file=sys.stderr)
        return 130
    score = (f"{result.val_bpb:.3f} bits/byte" if result.val_bpb is not None  # an encoder: accuracy
             else f"masked-token accuracy {result.val_mlm_acc:.3f}")
    print(f"\ndone: {result.step} steps, {result.tokens_seen:,} tokens; "
          f"validation loss {result.val_loss:.3f} ({score})")
    if result.sample:
        print(f"\nsample (temperature 0.8, top-k 40):\n{result.sample}\n")
    print(f"run folder:  {out}")
    resume_from = "sharded/ (one shard per process)" if cfg.strategy == "fsdp" else "train_state.safetensors"
    print(f"checkpoint:  {out / 'model.safetensors'} (+ {resume_from} for --resume)")
    print(f"loss plot:   {out / 'loss.png'}")
    print(f"metrics:     {out / 'metrics.jsonl'}")
    print(f"try:         llmscratch {'generate' if result.val_bpb is not None else 'fill-mask'} --model {out} "
          f"{'--prompt ' if result.val_bpb is not None else ''}\"...\"")
    return 0


def resume_settings(given: dict):
    """The config to resume the run in `given["out"]` (`train.resume_config`), saying how a
    changed --max-steps reshapes the learning-rate schedule."""
    from ..train.config import TrainConfig, get_lr, resume_config
    from ..train.state import saved_run

    out = given.get("out", TrainConfig().out)
    saved, step = saved_run(out)
    cfg, step = resume_config(out, given)
    before = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
    if cfg.max_steps != before.max_steps:
        print(f"--max-steps {cfg.max_steps} (the run was started for {before.max_steps}): the schedule "
              f"now ends at step {cfg.max_steps}, so the learning rate at step {step} goes from "
              f"{get_lr(step, before):.3g} to {get_lr(step, cfg):.3g}")
    return cfg


def cmd_consolidate(args) -> int:
    """Write a run folder's model.safetensors from a sharded (FSDP) checkpoint."""
    from ..checkpoints.sharded import consolidate

    path = consolidate(args.run, args.checkpoint)
    print(f"wrote {path} from {args.checkpoint or 'the latest sharded checkpoint'}")
    return 0
