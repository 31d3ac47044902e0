"""Evaluation tasks: zero- and few-shot scoring of a language model, the way the field does it.

A task is a list of examples of one kind:

- **choice** (multiple choice, cloze): a `context` and `choices`, one of them `gold`. Each
  choice is scored by the log-likelihood of `target_delimiter + choice` after the prompt;
  `acc` counts the examples whose gold choice scores highest, `acc_norm` the same with each
  score divided by the choice's length in characters (lm-evaluation-harness's `acc` and
  `acc_norm`).
- **generate**: a `prompt` and an `answer`; the model continues the prompt greedily until a
  newline, and `exact_match` compares the stripped text with the answer.
- **greedy** (LAMBADA): a context and its true continuation; `acc` counts the examples whose
  continuation is the greedy one token by token, and `ppl` is the perplexity of the
  continuations.

A prompt with K shots is K other examples of the same task, each followed by its answer,
then the query: `description + shot_1 + "\\n\\n" + ... + shot_K + "\\n\\n" + context`. The
shots of query i are drawn by `fewshot_indices(n, i, K, seed)`: seeded per query, never the
query itself. `template` (e.g. `"Question: {context}\\nAnswer:"`) shapes each context.

Scoring is batched: the context of an example goes through the model once, and all its
choices then run as one batch on its cached keys and values (`score_choices`); where that
cannot be done, all the choices go through in one forward pass, right-padded, which a
causal model does not see (`loglikelihoods`). `loglikelihoods` takes any list of `(context ids, continuation ids)` requests; the
lm-evaluation-harness adapter (`lm_eval_adapter.py`) scores through it too.

Task files (`load_task(path)`) are JSONL (or a JSON array), one example a line, in our
layout (`{"context", "choices", "gold"}` or `{"prompt", "answer"}`) or the usual layouts of
public sets: HellaSwag (`ctx_a`, `ctx_b`, `endings`, `label`), LAMBADA (`text`), ARC
(`question` with `choices` and `answerKey`). Built-in tasks need no download:
`python-docs-cloze`, `pattern`, `copy` and `arithmetic` (see `BUILTIN_TASKS`).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError

KINDS = ("choice", "generate", "greedy")


@dataclass
class Example:
    context: str
    choices: list[str] = field(default_factory=list)
    """the candidate continuations (choice and greedy tasks)"""
    gold: int = 0
    """index of the right choice"""
    answer: str = ""
    """the expected generation (generate tasks)"""
    where: str = ""
    """file:line, for messages"""

    def target(self, kind: str) -> str:
        """The answer a shot shows."""
        return self.answer if kind == "generate" else self.choices[self.gold]


@dataclass
class Task:
    name: str
    kind: str
    examples: list[Example]
    source: str = ""
    """the task file (empty for a built-in task)"""
    template: str = "{context}"
    """how a context is shown; `{context}` is replaced by the example's"""
    description: str = ""
    """text before the shots"""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    stop: str = "\n"
    """generate tasks: the generation ends here"""
    max_new_tokens: int = 16


# ------------------------------------------------------------------------- prompts


def fewshot_indices(n: int, i: int, k: int, seed: int) -> list[int]:
    """The `k` shots of query `i` among `n` examples: seeded by `(seed, i)`, never `i`."""
    if k == 0:
        return []
    rng = random.Random(f"{seed}-{i}")
    return rng.sample([j for j in range(n) if j != i], k)


def render(task: Task, ex: Example) -> str:
    return task.template.replace("{context}", ex.context)


def build_context(task: Task, i: int, shots: int, seed: int) -> str:
    """The prompt for example `i` with `shots` examples before it."""
    exs = task.examples
    parts = [render(task, exs[j]) + task.target_delimiter + exs[j].target(task.kind)
             for j in fewshot_indices(len(exs), i, shots, seed)]
    return task.description + "".join(p + task.fewshot_delimiter for p in parts) + render(task, exs[i])


def check_shots(task: Task, shots: int) -> None:
    if shots < 0:
        raise UserError(f"--shots must be >= 0, got {shots}")
    if shots > len(task.examples) - 1:
        raise UserError(f"{task.source or 'built-in task ' + task.name}: --shots {shots} needs at least {shots + 1} examples (the shots are "
                        f"other examples of the task); it has {len(task.examples)}")


# ------------------------------------------------------------------------- scoring


def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """`(context ids, continuation ids)`, as lm-evaluation-harness splits them: trailing spaces
    of the context move to the continuation; an empty context is `<|endoftext|>`."""
    n = len(context) - len(context.rstrip(" "))
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tokenizer.encode(context, allowed_special="none") if context else [tokenizer.eot_id]
    return ctx, tokenizer.encode(continuation, allowed_special="none")


@torch.no_grad()
def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 16
                   ) -> list[tuple[float, bool]]:
    """`(log p(continuation | context), continuation is the greedy one)` per request.

    Requests go `batch_size` at a time through one forward pass, right-padded. A request
    longer than the context window keeps its last `context_length + 1` tokens (the
    continuation is never cut unless it alone is longer).
    """
    device = next(model.parameters()).device
    L = model.config.context_length
    out: list[tuple[float, bool]] = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        rows = [(ctx + cont)[-(L + 1):] for ctx, cont in chunk]
        T = max(len(r) for r in rows) - 1
        x = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):
            x[b, :len(r) - 1] = torch.tensor(r[:-1])
        logp = F.log_softmax(model(x.to(device)).float(), dim=-1)
        for b, ((_, cont), r) in enumerate(zip(chunk, rows)):
            n = min(len(cont), len(r) - 1)
            pos = torch.arange(len(r) - 1 - n, len(r) - 1, device=device)
            target = torch.tensor(r[-n:], device=device)
            lp = logp[b, pos]
            out.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
    return out


@torch.no_grad()
def score_choices(model, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
    """`loglikelihoods` of one context with several continuations, the context computed once.

    The context goes through the model once, filling a KV cache; its keys and values are
    copied to every row of a batch cache, and all continuations then run as one batch that
    attends to them. With a few-shot prompt of hundreds of tokens and choices of a few, that
    is one long forward instead of one per choice. Falls back to `loglikelihoods` (the same
    numbers) where there is nothing to reuse or no cache: one continuation, a context that
    does not fit whole in the window with the longest continuation, a model without
    `make_kv_caches`.
    """
    L = model.config.context_length
    longest = max(len(c) for c in continuations)
    if (len(continuations) < 2 or min(len(c) for c in continuations) == 0 or not hasattr(model, "make_kv_caches")
            or not hasattr(model, "hidden_states")
            or len(context) + longest - 1 > L):
        return loglikelihoods(model, [(context, c) for c in continuations], batch_size=len(continuations))
    device = next(model.parameters()).device
    n, B = len(context), len(continuations)
    one = model.make_kv_caches(1, n + longest - 1)
    last = model.hidden_states(torch.tensor([context], device=device), caches=one)[:, -1]  # (1, C)
    first = F.log_softmax(model.lm_head(last)[0].float(), dim=-1)  # logits of the last position only
    rest = None
    if longest > 1:
        caches = model.make_kv_caches(B, n + longest - 1)
        for small, big in zip(one, caches):
            big.k[:, :, :n] = small.k[:, :, :n]
            big.v[:, :, :n] = small.v[:, :, :n]
        x = torch.zeros(B, longest - 1, dtype=torch.long)
        for b, c in enumerate(continuations):
            x[b, :len(c) - 1] = torch.tensor(c[:-1])
        rest = F.log_softmax(model(x.to(device), caches=caches, start=n).float(), dim=-1)
    out = []
    for b, c in enumerate(continuations):
        lp = first[None] if rest is None else torch.cat([first[None], rest[b, :len(c) - 1]])
        target = torch.tensor(c, device=device)
        out.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
    return out


@torch.no_grad()
def generate_until(model, tokenizer, context: str, stop: str = "\n", max_new_tokens: int = 16) -> str:
    """The greedy continuation of `context`, cut at the first `stop` (the decoding engine's
    stop string) or at `<|endoftext|>`."""
    from ..decoding.engine import Engine

    engine = Engine(model, tokenizer)
    ids = (tokenizer.encode(context, allowed_special="none") or [tokenizer.eot_id])
    ids = ids[-(model.config.context_length - max_new_tokens):] if max_new_tokens < model.config.context_length else ids[-1:]
    row = engine.row(ids, max_new_tokens, eos_id=tokenizer.eot_id, stop=[stop] if stop else ())
    with engine.evaluating():
        return "".join(engine.stream(row))


def evaluate_task(model, tokenizer, task: Task, shots: int = 0, seed: int = 1234, limit: int | None = None,
                  batch_size: int = 16, progress: bool = False) -> dict:
    """Score `model` on `task` with `shots` examples in each prompt.

    Returns:
        `{"task", "kind", "shots", "n"}` and `acc`, `acc_norm` (choice), `exact_match`
        (generate) or `acc`, `ppl` (greedy); `predictions` (each example's chosen index,
        generated text or greedy hit) and, but for generate, `gold_logprob` (the gold
        continuation's mean log-likelihood, nats), to tell whether shots changed anything.
    """
    from ..utils import progress_bar

    check_shots(task, shots)
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be positive, got {limit}")
    n = len(task.examples) if limit is None else min(limit, len(task.examples))
    was_training = model.training
    model.eval()
    hits = norm_hits = 0.0
    total_lp, total_tokens = 0.0, 0
    predictions: list = []
    gold_lp = 0.0
    for i in progress_bar(range(n), desc=task.name, disable=not progress, dynamic_ncols=True):
        ex = task.examples[i]
        context = build_context(task, i, shots, seed)
        if task.kind == "generate":
            got = generate_until(model, tokenizer, context, task.stop, task.max_new_tokens)
            hits += float(got.strip() == ex.answer.strip())
            predictions.append(got.strip())
            continue
        reqs = [encode_request(tokenizer, context, task.target_delimiter + c) for c in ex.choices]
        if all(r[0] == reqs[0][0] for r in reqs):  # the usual case: the context once, then the choices
            scores = score_choices(model, reqs[0][0], [cont for _, cont in reqs])
        else:
            scores = loglikelihoods(model, reqs, batch_size=max(batch_size, len(reqs)))  # one forward
        gold_lp += scores[ex.gold][0]
        if task.kind == "greedy":
            predictions.append(bool(scores[ex.gold][1]))
            hits += float(scores[ex.gold][1])
            total_lp += scores[ex.gold][0]
            total_tokens += len(reqs[ex.gold][1])
            continue
        lps = [s for s, _ in scores]
        predictions.append(max(range(len(lps)), key=lps.__getitem__))
        hits += float(predictions[-1] == ex.gold)
        normed = [lp / max(len(c), 1) for lp, c in zip(lps, ex.choices)]
        norm_hits += float(max(range(len(normed)), key=normed.__getitem__) == ex.gold)
    model.train(was_training)
    result = {"task": task.name, "kind": task.kind, "shots": shots, "n": n, "predictions": predictions}
    if task.kind != "generate":
        result["gold_logprob"] = gold_lp / n
    if task.kind == "choice":
        result.update(acc=hits / n, acc_norm=norm_hits / n)
    elif task.kind == "generate":
        result.update(exact_match=hits / n)
    else:
        result.update(acc=hits / n, ppl=math.exp(min(-total_lp / max(total_tokens, 1), 50.0)))
    return result


# ------------------------------------------------------------------------- task files


def _gold(value, n: int, where: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{where}: gold must be an integer index into choices, got {value!r}")
    if not 0 <= value < n:
        raise UserError(f"{where}: gold index {value} out of range for {n} choice(s)")
    return value


def _choices(value, where: str, key: str = "choices") -> list[str]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: empty {key} (a multiple-choice example needs a non-empty list)")
    if not all(isinstance(c, str) for c in value):
        raise UserError(f"{where}: every entry of {key} must be a string")
    return value


def _str(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise UserError(f"{where}: no string field {key!r}")
    return value


def _hellaswag_text(text: str) -> str:
    """lm-evaluation-harness's HellaSwag clean-up: WikiHow's ' [title]' marks become '. ',
    bracketed tags go, double spaces close."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _layout(obj: dict) -> str:
    if "context" in obj and "choices" in obj:
        return "ours"
    if "prompt" in obj and "answer" in obj:
        return "generate"
    if "endings" in obj and ("ctx" in obj or "ctx_a" in obj):
        return "hellaswag"
    if "question" in obj and ("answerKey" in obj or "answer_key" in obj):
        return "arc"
    if "text" in obj:
        return "lambada"
    return "unknown"


def _example(obj: dict, layout: str, where: str) -> Example:
    if layout == "ours":
        context = _str(obj, "context", where)
        choices = _choices(obj.get("choices"), where)
        if "gold" not in obj:
            raise UserError(f"{where}: no 'gold' field (the index of the right choice)")
        return Example(context, choices, _gold(obj["gold"], len(choices), where), where=where)
    if layout == "generate":
        return Example(_str(obj, "prompt", where), answer=_str(obj, "answer", where), where=where)
    if layout == "hellaswag":
        # lm-evaluation-harness's query: ctx_a + " " + ctx_b capitalized (ctx alone if that is all)
        ctx = (_str(obj, "ctx_a", where) + " " + str(obj.get("ctx_b", "")).capitalize()) if "ctx_a" in obj \
            else _str(obj, "ctx", where)
        context = _hellaswag_text(str(obj.get("activity_label", "")) + ": " + ctx)
        choices = [_hellaswag_text(e) for e in _choices(obj.get("endings"), where, "endings")]
        return Example(context, choices, _gold(obj.get("label"), len(choices), where), where=where)
    if layout == "arc":
        q = obj["question"]
        stem, choices = (q.get("stem"), q.get("choices")) if isinstance(q, dict) else (q, obj.get("choices"))
        if isinstance(choices, dict):  # the Hugging Face layout: {"text": [...], "label": [...]}
            texts, labels = choices.get("text"), choices.get("label")
        elif isinstance(choices, list):  # AI2's JSONL: [{"text", "label"}, ...]
            texts = [c.get("text") for c in choices if isinstance(c, dict)]
            labels = [c.get("label") for c in choices if isinstance(c, dict)]
        else:
            texts, labels = None, None
        texts = _choices(texts, where)
        key = obj.get("answerKey", obj.get("answer_key"))
        if not isinstance(labels, list) or key not in labels:
            raise UserError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
        if not isinstance(stem, str):
            raise UserError(f"{where}: the question has no text")
        return Example(f"Question: {stem}\nAnswer:", texts, labels.index(key), where=where)
    if layout == "lambada":
        text = _str(obj, "text", where).strip()
        if " " not in text:
            raise UserError(f"{where}: a LAMBADA text needs at least two words")
        context, word = text.rsplit(" ", 1)
        return Example(context, [word], 0, where=where)
    raise UserError(f"{where}: unknown task layout (fields {sorted(obj)[:8]}); expected context/choices/gold, "
                    "prompt/answer, HellaSwag (ctx, endings, label), LAMBADA (text) or ARC (question, choices, "
                    "answerKey)")


def read_task_file(path: str | Path, name: str | None = None) -> Task:
    """A task from a JSONL file (one example a line) or a JSON array, layout detected from
    the first example's fields (see the module docstring)."""
    from ..finetune.data import read_json_rows

    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise UserError(f"{path}: a task file is .jsonl (one example a line) or .json (an array)")
    rows = read_json_rows(path, "jsonl" if path.suffix.lower() == ".jsonl" else "json")
    if not rows:
        raise UserError(f"{path}: holds no examples")
    layout = _layout(rows[0][1])
    examples = [_example(obj, layout, where) for where, obj in rows]
    kind = {"ours": "choice", "generate": "generate", "hellaswag": "choice", "arc": "choice",
            "lambada": "greedy"}[layout]
    return Task(name or path.stem, kind, examples, source=str(path))


# ------------------------------------------------------------------------- built-in tasks


def docs_cloze_task(n: int = 200, seed: int = 0) -> Task:
    """`python-docs-cloze`: sentences from the last tenth of the embedded Python reference
    (the part pretraining holds out for validation), the last word masked; four choices,
    the true word and three last words of other sentences."""
    from ..data.corpora import python_docs_text

    text = python_docs_text()
    tail = text[int(len(text) * 0.9):]
    pattern = re.compile(r"^[A-Z][^>=|{}\[\]]+ ([a-z]{3,})\.$")  # prose, not code or tables
    candidates = []
    for sent in re.split(r"(?<=\.)\s+", " ".join(tail.split())):
        m = pattern.match(sent)
        if m and 6 <= len(sent.split()) <= 40:
            candidates.append((sent[:m.start(1)].rstrip(), m.group(1)))
    rng = random.Random(seed)
    seen, unique = set(), []
    for ctx, word in candidates:  # a sentence repeated in the reference counts once
        if ctx not in seen:
            seen.add(ctx)
            unique.append((ctx, word))
    rng.shuffle(unique)
    vocab = sorted({w for _, w in unique})
    examples = []
    for k, (ctx, word) in enumerate(unique[:n]):
        choices = [word] + rng.sample([w for w in vocab if w != word], 3)
        rng.shuffle(choices)
        examples.append(Example(ctx, choices, choices.index(word), where=f"python-docs-cloze:{k}"))
    return Task("python-docs-cloze", "choice", examples)


PATTERN_WORDS = ["red", "blue", "green", "cat", "dog", "bird", "one", "two", "three", "sun", "moon",
                 "star", "apple", "pear", "plum", "north", "south", "east", "west", "up", "down"]


def pattern_task(n: int = 200, seed: int = 0) -> Task:
    """`pattern`: a repeating sequence of words ("red blue green red blue green red") and the
    word that comes next; the choices are the pattern's words. The few-shot examples show
    what `Next:` asks for."""
    rng = random.Random(seed)
    examples = []
    for k in range(n):
        period = rng.randint(2, 4)
        unit = rng.sample(PATTERN_WORDS, period)
        length = rng.randint(period + 2, 3 * period)
        seq = [unit[j % period] for j in range(length)]
        gold = unit[length % period]
        examples.append(Example(f"Sequence: {' '.join(seq)}\nNext:", list(unit), unit.index(gold),
                                where=f"pattern:{k}"))
    return Task("pattern", "choice", examples)


def arithmetic_task(n: int = 200, seed: int = 0) -> Task:
    """`arithmetic`: one-digit sums, answered by generation ("3 + 4 =" -> "7"), exact match."""
    rng = random.Random(seed)
    examples = []
    for k in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        examples.append(Example(f"{a} + {b} =", answer=str(a + b), where=f"arithmetic:{k}"))
    return Task("arithmetic", "generate", examples, max_new_tokens=4)


NAME_PARTS = ["get", "set", "read", "write", "load", "save", "parse", "make", "find", "check", "file", "path",
              "name", "value", "count", "size", "line", "text", "node", "item", "key", "index", "data",
              "time", "user", "list", "dict", "error", "result", "buffer", "token", "state", "mode"]


def copy_task(n: int = 200, seed: int = 0) -> Task:
    """`copy`: a Python-style name assigned twice, `a = "read_buffer"` then `b = "`; the four
    choices are that name and three others of the same kind, each closed by its quote. Only
    the context tells which: a model that cannot copy from its prompt scores chance (25%),
    and the shots show that `b` repeats `a` (in-context copying, what induction heads do)."""
    rng = random.Random(seed)
    examples = []
    for k in range(n):
        names: list[str] = []
        while len(names) < 4:
            name = "_".join(rng.sample(NAME_PARTS, rng.randint(2, 3)))
            if name not in names:
                names.append(name)
        choices = [f'{name}"' for name in names]
        rng.shuffle(choices)
        examples.append(Example(f'a = "{names[0]}"\nb = "', choices, choices.index(f'{names[0]}"'),
                                where=f"copy:{k}"))
    return Task("copy", "choice", examples, target_delimiter="")


BUILTIN_TASKS = {"python-docs-cloze": docs_cloze_task, "pattern": pattern_task, "copy": copy_task,
                 "arithmetic": arithmetic_task}
"""The tasks the project makes itself (no download)."""


def load_task(name_or_path: str, template: str | None = None) -> Task:
    """A built-in task by name, or a task file (see `read_task_file`); `template` (with
    `{context}`) replaces the task's prompt template."""
    if name_or_path in BUILTIN_TASKS and not Path(name_or_path).exists():
        task = BUILTIN_TASKS[name_or_path]()
    elif Path(name_or_path).is_file():
        task = read_task_file(name_or_path)
    else:
        raise UserError(f"--tasks {name_or_path}: no such file, and not a built-in task "
                        f"({', '.join(BUILTIN_TASKS)})")
    if template is not None:
        if "{context}" not in template:
            raise UserError(f"--task-template {template!r} must contain {{context}}")
        task.template = template
    return task
