"""`llmscratch eval tasks`: zero- and few-shot scores of a model on built-in tasks or task
files (`llmscratch.evaluation.tasks`). Thin: parse flags, call the library, print a table.

`add_eval_tasks_args(p)` adds the flags to the `eval` parser; `cmd_eval_tasks` runs when
the task is `tasks`."""

from __future__ import annotations

import argparse


def add_eval_tasks_args(p: argparse.ArgumentParser) -> None:
    """The `eval tasks` flags, added to the existing `eval` parser."""
    from ..evaluation.tasks import BUILTIN_TASKS

    g = p.add_argument_group("eval tasks")
    g.add_argument("--tasks", nargs="+", metavar="NAME_OR_FILE", default=None,
                   help=f"built-in tasks ({', '.join(BUILTIN_TASKS)}) or task files (.jsonl/.json: "
                        "context/choices/gold, prompt/answer, HellaSwag, LAMBADA or ARC layout)")
    g.add_argument("--shots", nargs="+", type=int, default=[0], metavar="K",
                   help="examples shown before each query; several give a zero-/few-shot table (default: 0)")
    g.add_argument("--seed", type=int, default=1234, help="seed of the few-shot selection (default: 1234)")
    g.add_argument("--limit", type=int, default=None, help="score only the first N examples of each task")
    g.add_argument("--task-template", default=None, metavar="TEMPLATE",
                   help='prompt template for every context, e.g. "Q: {context}\\nA:" (default: the task\'s)')


def format_row(r: dict) -> str:
    scores = "  ".join(f"{k} {100 * r[k]:6.2f}%" for k in ("acc", "acc_norm", "exact_match") if k in r)
    if "ppl" in r:
        scores += f"  ppl {r['ppl']:.2f}"
    return f"{r['task']:24s} {r['shots']:5d} {r['n']:6d}  {scores}"


def shots_notes(rows: list[dict]) -> list[str]:
    """For one task's rows (one per shot count): a note for each shot count that changed no
    prediction of the first row's, with the gold answers' log-likelihood change, so equal
    scores read as "the shots were used and moved nothing", not as "ignored"."""
    notes = []
    base = rows[0]
    for r in rows[1:]:
        if r["predictions"] != base["predictions"]:
            continue
        change = ""
        if "gold_logprob" in r:
            change = (f"; the gold answers' mean log-likelihood moved {base['gold_logprob']:.3f} -> "
                      f"{r['gold_logprob']:.3f} nats")
        notes.append(f"note: {r['task']}: {r['shots']} shots change no prediction of the {base['shots']}-shot "
                     f"run (the same answer on all {r['n']} examples){change}")
    return notes


def cmd_eval_tasks(args, common) -> None:
    """Score --model on --tasks with each number of --shots; print a table (and write
    --scores-out)."""
    from ..checkpoints.run import load_model
    from ..errors import UserError
    from ..evaluation.tasks import check_shots, evaluate_task, load_task
    from ..utils import pick_device, write_json

    if not args.tasks:
        raise UserError("llmscratch eval tasks needs --tasks NAME_OR_FILE ... (e.g. --tasks pattern arithmetic)")
    if not common.model:
        raise UserError("llmscratch eval tasks needs --model (a run folder, Hugging Face GPT-2 folder or preset)")
    tasks = [load_task(t, args.task_template) for t in args.tasks]
    for task in tasks:  # every file and setting checked before the model loads
        for k in args.shots:
            check_shots(task, k)
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": "int8"}.get(common.dtype or "")  # --dtype
    model, tokenizer = load_model(common.model, device=pick_device(common.device), dtype=dtype, kernels=common.kernels)
    model.kind.require("score", "eval tasks (log-likelihood scoring)")  # a decoder's command
    print(f"{'task':24s} {'shots':>5s} {'n':>6s}  scores")
    results, notes = [], []
    for task in tasks:
        rows = []
        for k in args.shots:
            r = evaluate_task(model, tokenizer, task, shots=k, seed=args.seed, limit=args.limit,
                              batch_size=common.batch_size)
            rows.append(r)
            print(format_row(r), flush=True)
        notes += shots_notes(rows)
        results += [{k: v for k, v in r.items() if k != "predictions"} for r in rows]
    for note in notes:
        print(note)
    out = getattr(args, "scores_out", None)  # the --scores-out flag eval instruct declares
    if out:
        write_json(out, {"model": common.model, "seed": args.seed, "results": results})
        print(f"wrote {out}")
