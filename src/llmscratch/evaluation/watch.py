"""Task accuracy during pretraining: `llmscratch pretrain --eval-task copy`.

At each of a pretraining run's evaluations, the model is also scored on zero- or few-shot
tasks (`tasks.py`: a built-in task such as `copy` or `pattern`, or a task file), and each
score goes into that evaluation's record in `metrics.jsonl` beside the validation loss:
`task_copy_acc` for `copy`, `task_copy_3shot_acc` for `copy:3` (three examples before each
query), and `process_cpu_s`, the training process's CPU seconds so far (on a shared machine
the clock overstates the work done; this is what the skill cost). That is how the in-context-learning recipe watches the copy accuracy jump when
induction heads form.

The training layer cannot import this one, so the evaluator goes down as a function:
`pretrain(cfg, task_eval=task_evaluator(cfg.eval_task, cfg.eval_task_limit))`, which
`pretrain_watching(cfg)` (and the CLI) does.
"""

from __future__ import annotations

import time
from typing import Callable

from ..errors import UserError
from .tasks import Task, check_shots, evaluate_task, load_task

__all__ = ["metric_name", "parse_eval_tasks", "pretrain_watching", "task_evaluator"]


def parse_eval_tasks(spec: str) -> list[tuple[str, int]]:
    """`[(task, shots), ...]` from `NAME[:SHOTS],...` (e.g. `copy,copy:3,pattern`)."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        name, sep, shots = item.rpartition(":") if ":" in item else (item, "", "0")
        if not name or not (shots.isdigit() if sep else True):
            raise UserError(f"--eval-task {spec!r}: each entry is NAME or NAME:SHOTS (e.g. copy or copy:3), "
                            f"got {item!r}")
        out.append((name, int(shots)))
    return out


def metric_name(task: Task, shots: int) -> str:
    """The metrics.jsonl key of a task's score: `task_copy_acc`, `task_copy_3shot_acc`."""
    metric = "exact_match" if task.kind == "generate" else "acc"
    return f"task_{task.name}_{f'{shots}shot_' if shots else ''}{metric}"


def task_evaluator(spec: str, limit: int = 100, seed: int = 1234) -> Callable[..., dict]:
    """`evaluate(model, tokenizer) -> {metric_name: score}` for the tasks in `spec`, each on
    its first `limit` examples. The tasks are loaded (and every name and shot count checked)
    now, so a bad one fails before any training."""
    if limit <= 0:
        raise UserError(f"--eval-task-limit must be positive, got {limit}")
    tasks = []
    for name, shots in parse_eval_tasks(spec):
        try:
            task = load_task(name)
        except UserError as e:
            raise UserError(f"--eval-task: {e}") from None
        check_shots(task, shots)
        tasks.append((task, shots))

    def evaluate(model, tokenizer) -> dict:
        out = {"process_cpu_s": time.process_time()}
        for task, shots in tasks:
            r = evaluate_task(model, tokenizer, task, shots=shots, seed=seed, limit=limit)
            out[metric_name(task, shots)] = r.get("acc", r.get("exact_match"))
        return out

    return evaluate


def pretrain_watching(cfg, **kwargs):
    """`train.pretrain(cfg)`, scoring `cfg.eval_task` at each evaluation (when set)."""
    from ..train import pretrain

    task_eval = task_evaluator(cfg.eval_task, cfg.eval_task_limit) if cfg.eval_task else None
    return pretrain(cfg, task_eval=task_eval, **kwargs)
