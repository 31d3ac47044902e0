"""The in-context-learning recipe, from the CLI on one CPU core: a small GPT pretrained on a
corpus mixed with synthetic repeated spans (`--data repeats:...`, `data/synthetic.py`), its
`copy` accuracy watched over training (`--eval-task`), then the zero- vs few-shot table of
the final model.

1. **Train**: one `llmscratch pretrain` command (printed, and stored in the JSON as
   `recipe_command`) with `--eval-task copy,...`, so every evaluation logs the copy accuracy
   in `metrics.jsonl` beside the validation loss: the induction-head phase change shows
   as a jump. CPU seconds are the process's own (`getrusage` for the run, `process_cpu_s`
   in each evaluation record for the curve), so a loaded machine stretches the wall time
   but not them (a record without it gets the run's total scaled by its step).
2. **Few-shot table**: the final model on `copy` and `pattern` (by default) at 0, 1, 3 and
   5 shots, every example of each task (`evaluation.tasks.evaluate_task`, as
   `llmscratch eval tasks` and `fewshot_table.py` score).
3. With `--control`, the same run on the corpus alone (no synthetic spans), for the
   comparison that says the curriculum, not the steps, made the difference.

Writes `benchmarks/results/icl_recipe.json` (or `--json`). Run it with OMP_NUM_THREADS=1 to
hold one core (the script passes that to its children too):

    OMP_NUM_THREADS=1 python benchmarks/icl_recipe.py --note "quiet machine"
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from results import write_result  # benchmarks/results.py

from llmscratch.checkpoints.run import load_model
from llmscratch.evaluation.tasks import evaluate_task, load_task


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def train(args, data: str, out: Path) -> dict:
    """One `llmscratch pretrain` run; its command, CPU and wall seconds, and its curve."""
    cmd = ["llmscratch", "pretrain", "--data", data, "--model", args.model, "--n-layer", str(args.n_layer),
           "--n-head", str(args.n_head), "--n-embd", str(args.n_embd), "--context-length", str(args.context_length),
           "--tokenizer", args.tokenizer, "--batch-size", str(args.batch_size), "--max-steps", str(args.max_steps),
           "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps), "--eval-every", str(args.eval_every),
           "--eval-batches", str(args.eval_batches), "--sample-tokens", "0", "--precision", "fp32",
           "--eval-task", args.eval_task, "--eval-task-limit", str(args.eval_task_limit), "--seed", str(args.seed),
           "--out", str(out)]
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cpu0, t0 = child_cpu(), time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "llmscratch", *cmd[1:], "--no-progress"], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"llmscratch pretrain failed:\n{r.stderr[-3000:]}")
    cpu, wall = child_cpu() - cpu0, time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]["step"]
    curve = [{"step": rec["step"], "cpu_s": round(rec.get("process_cpu_s", cpu * rec["step"] / last), 1),
              "elapsed_s": rec["elapsed_s"],
              **{k: rec[k] for k in rec if k.startswith("task_") or k in ("val_loss", "val_bpb")}}
             for rec in records if "val_loss" in rec]
    for point in curve:
        print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in point.items()),
              flush=True)
    return {"command": " ".join(shlex.quote(c) for c in cmd), "cpu_s": round(cpu, 1), "wall_s": round(wall, 1),
            "curve": curve}


def fewshot(args, run: Path) -> tuple[list[dict], float]:
    """The final model's table: every task at every shot count, and its CPU seconds."""
    model, tok = load_model(str(run))
    t0 = time.process_time()
    rows = []
    for name in args.tasks:
        task = load_task(name)
        for k in args.shots:
            r = evaluate_task(model, tok, task, shots=k, seed=1234)
            rows.append({key: r[key] for key in ("task", "kind", "shots", "n", "acc", "acc_norm", "exact_match",
                                                 "gold_logprob") if key in r})
            print(f"  {name} {k}-shot: " + ", ".join(f"{m} {100 * r[m]:.1f}%" for m in ("acc", "exact_match")
                                                     if m in r) + f", gold log-prob {r.get('gold_logprob', 0):.3f}",
                  flush=True)
    return rows, time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="repeats:share=0.9:python-docs", help="pretrain --data of the recipe")
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--tokenizer", default="bpe:4096")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-steps", type=int, default=2400)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-batches", type=int, default=5)
    ap.add_argument("--eval-task", default="copy", help="what pretrain --eval-task logs at each evaluation")
    ap.add_argument("--eval-task-limit", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--tasks", nargs="+", default=["copy", "pattern"], help="tasks of the final few-shot table")
    ap.add_argument("--shots", type=int, nargs="+", default=[0, 1, 3, 5])
    ap.add_argument("--control", default=None, metavar="DATA",
                    help="also train the same model on this data (e.g. python-docs: no synthetic spans)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the training process")
    ap.add_argument("--work", default="/tmp/icl_recipe")
    ap.add_argument("--note", default="", help="stored in the JSON (e.g. the machine's load)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    print(f"recipe: {args.data}", flush=True)
    recipe = train(args, args.data, work / "recipe")
    print(f"recipe: {recipe['cpu_s'] / 60:.1f} CPU-minutes ({recipe['wall_s'] / 60:.1f} wall)\n  {recipe['command']}",
          flush=True)
    table, table_cpu = fewshot(args, work / "recipe")
    payload = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "work")},
               "recipe_command": recipe["command"], "recipe": recipe,
               "fewshot": {"rows": table, "cpu_s": round(table_cpu, 1)}}
    if args.control:
        print(f"control: {args.control}", flush=True)
        control = train(args, args.control, work / "control")
        rows, cpu = fewshot(args, work / "control")
        payload["control"] = {**control, "fewshot": {"rows": rows, "cpu_s": round(cpu, 1)}}
    payload["under_load"] = {"loadavg_at_start": load_before, "loadavg_at_end": os.getloadavg()[0],
                             "threads": args.threads, "note": args.note}
    write_result("icl_recipe", payload, args.json)


if __name__ == "__main__":
    main()
