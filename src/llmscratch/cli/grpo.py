"""`llmscratch finetune grpo`: reinforcement learning with verifiable rewards (GRPO). Thin:
parse flags, call `finetune.grpo_run.finetune_grpo`, print. `register_grpo` adds it to the
`finetune` subparsers (called from `cli/finetune.py`)."""

from __future__ import annotations

from .args import add_command, add_config_flags, run_finetune


def cmd_finetune_grpo(args) -> int:
    """Train a language model on a task with checkable answers by reinforcement learning
    (GRPO): for each prompt a group of replies is sampled, a verifiable reward scores them
    (exact match, a number, a regex or your own Python function), and the policy moves
    toward the replies that beat their group (clipped ratio, token-level mean, optional KL
    to the starting model). Writes a run folder, metrics.json (held-out accuracy before and
    after), metrics.jsonl, loss.png, grpo.png and heldout.json; --resume continues exactly."""
    from ..finetune.grpo_run import GRPOConfig, finetune_grpo

    result = run_finetune(finetune_grpo, GRPOConfig, args)
    m = result.metrics
    for when in ("before", "after"):
        e = m[when]
        print(f"{when:6s} held-out accuracy {100 * e['accuracy']:.2f}%  mean reward {e['val_reward']:.4f}")
    print(f"run folder:  {result.out}  (metrics.json, metrics.jsonl, loss.png, grpo.png, heldout.json)")
    return 130 if result.interrupted else 0


def register_grpo(ft_sub) -> None:
    """Add `finetune grpo` to the `finetune` subparsers."""
    from ..finetune.grpo_run import GRPOConfig

    p = add_command(ft_sub, "grpo", cmd_finetune_grpo, "reinforcement learning with verifiable rewards (GRPO)", [
        "llmscratch finetune grpo --model runs/sft --task addition --out runs/grpo",
        "llmscratch finetune grpo --model runs/sft --task qa.jsonl --reward number --group-size 16 --out runs/grpo-qa",
        "llmscratch finetune grpo --model runs/sft --task qa.jsonl --reward my_reward.py:score --kl-coef 0.02 "
        "--lora-rank 8 --out runs/grpo-lora",
    ])
    add_config_flags(p, GRPOConfig, required=("model", "task", "out"), skip=("epochs",), config_file=True)
