"""`llmscratch finetune dpo`: preference tuning (DPO) of an instruction-tuned model. Thin:
parse flags, call `finetune.dpo.finetune_dpo`, print. `register_dpo` adds it to the
`finetune` subparsers (called from `cli/finetune.py`)."""

from __future__ import annotations

from .args import add_command, add_config_flags, run_finetune


def cmd_finetune_dpo(args) -> int:
    """Preference-tune a model with Direct Preference Optimization (DPO) on chosen/rejected
    pairs, against a frozen reference (the starting model's log-probabilities, cached once);
    writes a run folder, test responses before and after, metrics.jsonl, loss.png and dpo.png."""
    from ..finetune.dpo import DPOConfig, finetune_dpo

    result = run_finetune(finetune_dpo, DPOConfig, args)
    m = result.metrics
    for when in ("before", "after"):
        e = m[when]
        if e.get("pref_accuracy") is not None:
            ties = e.get("pref_ties") or 0.0
            tied = (" (every pair tied: no preference yet, chance is 50%)" if ties >= 1.0
                    else f" ({100 * ties:.2f}% of pairs tied)" if ties > 0 else "")
            print(f"{when:6s} held-out preference accuracy {100 * e['pref_accuracy']:.2f}%{tied}  reward margin "
                  f"{e['reward_margin']:+.4f}  log-prob chosen {e['chosen_logp']:.2f} rejected {e['rejected_logp']:.2f}")
    print(f"run folder:  {result.out}  (metrics.json, metrics.jsonl, loss.png, dpo.png)")
    print(f"responses:   {result.out / 'responses_before.json'} -> {result.out / 'responses.json'}")
    print(f"try:         llmscratch eval instruct --responses {result.out / 'responses.json'}")
    return 130 if result.interrupted else 0


def register_dpo(ft_sub) -> None:
    """Add `finetune dpo` to the `finetune` subparsers."""
    from ..finetune.dpo import DPOConfig

    p = add_command(ft_sub, "dpo", cmd_finetune_dpo, "preference tuning with DPO (e.g. alpaca-preference)", [
        "llmscratch finetune dpo --model runs/instruct --data alpaca-preference --out runs/dpo",
        "llmscratch finetune dpo --model runs/instruct --data pairs.jsonl --beta 0.5 --lora-rank 8 --out runs/dpo-lora",
    ])
    add_config_flags(p, DPOConfig, required=("model", "data", "out"), config_file=True)
