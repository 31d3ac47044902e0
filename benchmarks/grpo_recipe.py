"""The GRPO recipe, from the CLI on CPU: supervised training on the built-in addition task to a
modest accuracy, then `finetune grpo`; against the honest baseline, the same minutes spent on
more supervised training instead.

Per seed, in a work folder:

1. **SFT**: `llmscratch pretrain` of a small char-level GPT (`--tokenizer bpe:257`: bytes
   only) on the training sums written out ("12+34=46" a line) for `--sft-steps` steps.
2. **GRPO**: `llmscratch finetune grpo --model SFT --task addition:K` for `--grpo-steps`
   steps, timed.
   The reward is `grpo_reward.py:digits` (a user reward function: 1 for the exact sum, partial
   credit for right digits), so that a model that is rarely exactly right still gets a signal;
   accuracy is always exact match.
3. **Baseline**: a copy of the SFT run resumed (`pretrain --resume --max-steps N + extra`)
   for as many more steps as fit in the GRPO stage's minutes at the SFT stage's measured
   speed; its wall time is recorded beside GRPO's.

Every model is scored the same way: greedy replies to the held-out sums (the last
`--val-size` examples of the task, never trained on), exact match (`grpo.heldout_scores`, the
figure `eval tasks` calls exact_match). Writes `benchmarks/results/grpo_recipe.json` (after
every seed) and `grpo_recipe.png` (reward and held-out accuracy over GRPO's steps).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from results import RESULTS_DIR, write_result  # benchmarks/results.py

from llmscratch.checkpoints.run import load_model
from llmscratch.finetune.grpo import encode_prompts, heldout_scores
from llmscratch.finetune.rewards import Reward, load_reward_task


def cli(*args: str) -> float:
    """Run `llmscratch ARGS`; return its wall time in seconds."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "llmscratch", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"llmscratch {' '.join(args[:2])} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t


def accuracy(run: Path, val, max_new_tokens: int) -> float:
    model, tok = load_model(str(run))
    ids = encode_prompts(tok, val, model.config.context_length, max_new_tokens)
    return heldout_scores(model.eval(), tok, val, ids, Reward("exact"), max_new_tokens)["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--task", default="addition:2")
    ap.add_argument("--task-size", type=int, default=2000)
    ap.add_argument("--val-size", type=int, default=200)
    ap.add_argument("--model", default="tiny", help="pretrain preset of the SFT model")
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--grpo-steps", type=int, default=60)
    ap.add_argument("--grpo-lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16, help="GRPO prompts per rollout")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--reward", default=str(Path(__file__).resolve().parent / "grpo_reward.py") + ":digits",
                    help="GRPO's --reward (default: grpo_reward.py:digits, exact match plus partial credit per digit)")
    ap.add_argument("--max-new-tokens", type=int, default=5)
    ap.add_argument("--work", default="/tmp/grpo_recipe")
    ap.add_argument("--note", default="", help="stored in the JSON (e.g. the machine's load)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    examples = load_reward_task(args.task, args.task_size + args.val_size)
    train, val = examples[:-args.val_size], examples[-args.val_size:]
    data = work / "train.txt"
    data.write_text("".join(e.prompt + e.answer + "\n" for e in train), encoding="utf-8")
    common = ["--no-progress", "--no-kernels", "--precision", "fp32"]
    runs = []
    load_before = os.getloadavg()[0]
    for seed in args.seeds:
        w = work / f"seed{seed}"
        shutil.rmtree(w, ignore_errors=True)
        w.mkdir()
        sft = w / "sft"
        t_sft = cli("pretrain", "--data", str(data), "--tokenizer", "bpe:257", "--model", args.model,
                    "--context-length", "32", "--max-steps", str(args.sft_steps), "--batch-size", "32",
                    "--lr", str(args.sft_lr), "--warmup-steps", "20", "--dropout", "0", "--val-fraction", "0.05",
                    "--eval-every", str(args.sft_steps), "--seed", str(seed), "--out", str(sft), *common)
        acc_sft = accuracy(sft, val, args.max_new_tokens)
        print(f"seed {seed}: SFT {args.sft_steps} steps {t_sft:.0f}s, held-out accuracy {100 * acc_sft:.1f}%", flush=True)

        grpo = w / "grpo"
        t_grpo = cli("finetune", "grpo", "--model", str(sft), "--task", args.task, "--task-size", str(args.task_size),
                     "--val-size", str(args.val_size), "--out", str(grpo), "--steps", str(args.grpo_steps),
                     "--batch-size", str(args.batch_size), "--group-size", str(args.group_size),
                     "--max-new-tokens", str(args.max_new_tokens), "--lr", str(args.grpo_lr), "--reward", args.reward,
                     "--eval-every", str(args.eval_every), "--seed", str(seed), *common)
        m = json.loads((grpo / "metrics.json").read_text())
        acc_grpo = m["after"]["accuracy"]
        print(f"seed {seed}: GRPO {args.grpo_steps} steps {t_grpo:.0f}s, held-out accuracy {100 * acc_grpo:.1f}% "
              f"(its own before: {100 * m['before']['accuracy']:.1f}%)", flush=True)

        more = w / "more_sft"
        shutil.copytree(sft, more)
        extra = max(1, round(t_grpo / (t_sft / args.sft_steps)))
        t_more = cli("pretrain", "--resume", "--data", str(data), "--tokenizer", "bpe:257", "--model", args.model,
                     "--context-length", "32", "--max-steps", str(args.sft_steps + extra), "--batch-size", "32",
                     "--dropout", "0", "--val-fraction", "0.05", "--eval-every", str(args.sft_steps + extra),
                     "--seed", str(seed), "--out", str(more), *common)
        acc_more = accuracy(more, val, args.max_new_tokens)
        print(f"seed {seed}: more SFT +{extra} steps {t_more:.0f}s, held-out accuracy {100 * acc_more:.1f}%", flush=True)
        curve = [{"step": r["step"], "reward": r.get("reward"), "accuracy": r.get("accuracy")}
                 for r in m["history"]]
        runs.append({"seed": seed, "sft": {"steps": args.sft_steps, "seconds": round(t_sft, 1), "accuracy": acc_sft},
                     "grpo": {"steps": args.grpo_steps, "seconds": round(t_grpo, 1), "accuracy": acc_grpo,
                              "before": m["before"]["accuracy"], "curve": [{"step": 0, "accuracy": acc_sft}] + curve},
                     "more_sft": {"extra_steps": extra, "seconds": round(t_more, 1), "accuracy": acc_more}})
        mean = lambda key: sum(r[key]["accuracy"] for r in runs) / len(runs)  # noqa: E731
        summary = {"sft_accuracy": mean("sft"), "grpo_accuracy": mean("grpo"), "more_sft_accuracy": mean("more_sft"),
                   "grpo_gain_points": 100 * (mean("grpo") - mean("sft")),
                   "more_sft_gain_points": 100 * (mean("more_sft") - mean("sft")),
                   "grpo_minutes_mean": sum(r["grpo"]["seconds"] for r in runs) / len(runs) / 60,
                   "winner": "grpo" if mean("grpo") > mean("more_sft") else "more_sft", "seeds_done": len(runs)}
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "work")}
        settings["reward"] = Path(args.reward).name
        write_result("grpo_recipe", {"settings": settings, "summary": summary, "runs": runs,
                                     "under_load": {"loadavg_at_start": load_before, "loadavg_now": os.getloadavg()[0],
                                                    "note": args.note}}, args.json)
        plot(runs, RESULTS_DIR / "grpo_recipe.png" if not args.json else Path(args.json).with_suffix(".png"))


def plot(runs: list[dict], path: Path) -> None:
    """Train reward and held-out accuracy over GRPO's steps, one line per seed, with the SFT
    baseline's accuracy as a dashed level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        c = r["grpo"]["curve"]
        a1.plot([p["step"] for p in c if p.get("reward") is not None],
                [p["reward"] for p in c if p.get("reward") is not None], label=f"seed {r['seed']}")
        line, = a2.plot([p["step"] for p in c if p.get("accuracy") is not None],
                        [100 * p["accuracy"] for p in c if p.get("accuracy") is not None], "o-", label=f"GRPO seed {r['seed']}")
        a2.axhline(100 * r["more_sft"]["accuracy"], ls="--", color=line.get_color(), alpha=0.7,
                   label=f"more SFT, same minutes (seed {r['seed']})")
    a1.set(title="mean reward of the rollouts", xlabel="GRPO step")
    a2.set(title="held-out exact-match accuracy (%)", xlabel="GRPO step")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
