"""The zero- vs few-shot table: one model scored on every built-in task (`llmscratch.evaluation.tasks`)
with 0, 1, 3 and 5 examples in each prompt, in one run, same seed for the shot selection.

The model is any run folder, e.g. the README's pretraining run on the embedded corpus:

    llmscratch pretrain --data python-docs --model small --max-steps 240 --out runs/pretrain
    python benchmarks/fewshot_table.py --model runs/pretrain

Writes `benchmarks/results/fewshot_table.json` (or `--json PATH`) and prints a Markdown table
(acc for the multiple-choice tasks, exact match for the generative one).
"""

from __future__ import annotations

import argparse
import sys
import time

from llmscratch.checkpoints.run import load_model
from llmscratch.errors import UserError
from llmscratch.evaluation.tasks import BUILTIN_TASKS, evaluate_task, load_task
from results import write_result  # benchmarks/results.py


def headline(r: dict) -> float:
    return r.get("acc", r.get("exact_match"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a run folder (or HF GPT-2 folder, or preset)")
    p.add_argument("--tasks", nargs="+", default=list(BUILTIN_TASKS), help="tasks (default: all built-in)")
    p.add_argument("--shots", nargs="+", type=int, default=[0, 1, 3, 5])
    p.add_argument("--seed", type=int, default=1234, help="seed of the few-shot selection")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples of each task")
    p.add_argument("--json", help="write the results here instead of benchmarks/results/fewshot_table.json")
    args = p.parse_args()
    try:
        model, tok = load_model(args.model, kernels=True)
        tasks = [load_task(t) for t in args.tasks]
        rows = []
        for task in tasks:
            for k in args.shots:
                t0 = time.perf_counter()
                r = evaluate_task(model, tok, task, shots=k, seed=args.seed, limit=args.limit)
                r["seconds"] = time.perf_counter() - t0
                rows.append(r)
                print(f"{task.name:20s} shots {k}: " + ", ".join(
                    f"{m} {100 * r[m]:.1f}%" for m in ("acc", "acc_norm", "exact_match") if m in r), flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n| task | metric | " + " | ".join(f"{k}-shot" for k in args.shots) + " |")
    print("|---|---|" + "---|" * len(args.shots))
    for task in tasks:
        mine = [r for r in rows if r["task"] == task.name]
        metric = "exact match" if task.kind == "generate" else "acc"
        print(f"| {task.name} (n={mine[0]['n']}) | {metric} | "
              + " | ".join(f"{100 * headline(r):.1f}%" for r in mine) + " |")
    write_result("fewshot_table", {"settings": vars(args), "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
