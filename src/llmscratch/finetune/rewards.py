"""Verifiable rewards and the tasks they score, for reinforcement learning (`grpo.py`).

A task is a list of `{prompt, answer}` examples: the layout `llmscratch eval tasks` reads
for its generate tasks (a JSONL file, one example a line, or a JSON array), or a built-in
task made by a seeded generator (`BUILTIN_TASKS`; `addition`: "12+345=" -> "357"). The
model continues the prompt; its reply ends at the first newline or `<|endoftext|>`, as
`eval tasks` decodes it, and a **reward** scores the reply against the answer:

- `exact`: 1 when the reply equals the answer after `normalise` (case, surrounding
  whitespace and punctuation, runs of spaces), else 0;
- `number`: 1 when the last number in the reply equals the answer's number;
- `regex:PATTERN`: 1 when the reply matches PATTERN (`re.search`); if PATTERN has a group
  named `answer`, its text must also equal the answer (normalised). `regex:^7` rewards a
  reply that starts with a 7, whatever the answer;
- `path.py:fn`: a Python function of your own, `fn(prompt, reply, answer) -> number`.

A **format reward** (`format_pattern`, `format_weight`) adds `format_weight` to a reply
that matches `format_pattern` as a whole (`re.fullmatch` on the stripped reply), e.g.
`-?\\d+` for "answers are a bare number".

The model's text is never run: rewards compare strings and numbers. Only a reward function
the user names runs, and it runs their own file.
"""

from __future__ import annotations

import importlib.util
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .data import read_json_rows


@dataclass(frozen=True)
class TaskExample:
    """One prompt the policy answers, and the answer a reward checks it against."""

    prompt: str
    answer: str
    where: str = ""
    """file:line (or task:index), for messages"""


# ------------------------------------------------------------------------------ tasks


def addition_task(n: int, seed: int = 0, digits: int = 3) -> list[TaskExample]:
    """`n` distinct sums of two numbers of 1 to `digits` digits, "12+345=" -> "357", in a
    seeded order (the same list for the same arguments). Each operand's digit count is
    drawn first, so short and long operands are equally common."""
    if digits < 1:
        raise UserError(f"addition:{digits}: the operands need at least 1 digit")
    rng = random.Random(f"addition-{digits}-{seed}")
    space = (10 ** digits) ** 2
    if n > space // 2:
        raise UserError(f"addition:{digits} has too few distinct sums for {n} examples; use more digits")
    seen: set[tuple[int, int]] = set()
    out = []
    while len(out) < n:
        a = rng.randint(0, 10 ** rng.randint(1, digits) - 1)
        b = rng.randint(0, 10 ** rng.randint(1, digits) - 1)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        out.append(TaskExample(f"{a}+{b}=", str(a + b), where=f"addition:{len(out)}"))
    return out


BUILTIN_TASKS: dict[str, Callable[..., list[TaskExample]]] = {"addition": addition_task}
"""The tasks made by a generator; `NAME:K` passes K as the generator's size setting
(`addition:2`: operands of at most 2 digits)."""


def read_reward_task(path: str | Path) -> list[TaskExample]:
    """The `{prompt, answer}` examples of a `.jsonl` (one a line) or `.json` (an array) file.

    Raises:
        UserError: another format, bad JSON, an example without a string prompt or answer
            (naming file and line), an empty file.
    """
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise UserError(f"{path}: a task file is .jsonl (one {{prompt, answer}} a line) or .json (an array)")
    rows = read_json_rows(path, "jsonl" if path.suffix.lower() == ".jsonl" else "json")
    out = []
    for where, obj in rows:
        for key in ("prompt", "answer"):
            value = obj.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key == "answer":
                value = str(value)
            if not isinstance(value, str):
                raise UserError(f"{where}: no {key!r} field (a task example is {{\"prompt\": ..., \"answer\": ...}}; "
                                "reinforcement learning needs the answer to check replies against)")
            if key == "prompt" and not value:
                raise UserError(f"{where}: empty prompt")
        out.append(TaskExample(obj["prompt"], str(obj["answer"]), where))
    if not out:
        raise UserError(f"{path}: holds no examples")
    return out


def load_reward_task(name_or_file: str, n: int, seed: int = 0) -> list[TaskExample]:
    """A task file, or `n` examples of a built-in task (`NAME` or `NAME:K`)."""
    if Path(name_or_file).is_file():
        return read_reward_task(name_or_file)
    name, _, size = name_or_file.partition(":")
    if name in BUILTIN_TASKS:
        if size and not size.isdigit():
            raise UserError(f"--task {name_or_file}: the part after ':' is a whole number (e.g. {name}:2)")
        return BUILTIN_TASKS[name](n, seed, *([int(size)] if size else []))
    raise UserError(f"--task {name_or_file}: no such file, and not a built-in task ({', '.join(BUILTIN_TASKS)}); "
                    "a task file is .jsonl with {\"prompt\": ..., \"answer\": ...} per line")


# ------------------------------------------------------------------------------ rewards


_PUNCT = " \t\n.,;:!?\"'`"


def normalise(text: str) -> str:
    """Lower case, runs of whitespace as one space, surrounding whitespace and punctuation
    dropped: `"  The Answer: 42. "` -> `"the answer: 42"`."""
    return " ".join(text.lower().split()).strip(_PUNCT)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_number(text: str) -> float | None:
    """The last number written in `text` (thousands commas allowed: "1,234" -> 1234.0), or
    None. The last, because a reply that reasons first states its result at the end."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _exact(prompt: str, reply: str, answer: str) -> float:
    return float(normalise(reply) == normalise(answer))


def _number(prompt: str, reply: str, answer: str) -> float:
    got, want = extract_number(reply), extract_number(answer)
    return float(got is not None and want is not None and math.isclose(got, want, rel_tol=0, abs_tol=1e-9))


def _regex(pattern: re.Pattern) -> Callable[[str, str, str], float]:
    def score(prompt: str, reply: str, answer: str) -> float:
        m = pattern.search(reply)
        if m is None:
            return 0.0
        if "answer" in pattern.groupindex:
            return float(normalise(m.group("answer") or "") == normalise(answer))
        return 1.0
    return score


def _load_function(spec: str) -> Callable:
    """`path.py:fn` -> the function `fn` of that file (imported once)."""
    file, _, name = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise UserError(f"--reward {spec}: no such file {file}")
    if not name.isidentifier():
        raise UserError(f"--reward {spec}: {name!r} is not a function name (use path.py:function)")
    module_spec = importlib.util.spec_from_file_location(f"llmscratch_reward_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"--reward {spec}: {file} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: whatever it raises is their error to see
        raise UserError(f"--reward {spec}: importing {file} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"--reward {spec}: {file} has no function {name!r}")
    return fn


@dataclass
class Reward:
    """A verifiable reward: `reward(prompt, reply, answer) -> float` (see the module
    docstring for `spec`). A user function that raises, or returns something that is not a
    finite number, is a one-line `UserError` naming it and the example."""

    spec: str = "exact"
    format_pattern: str | None = None
    format_weight: float = 0.0

    def __post_init__(self):
        spec = self.spec
        self.user = False
        if spec == "exact":
            self.fn = _exact
        elif spec == "number":
            self.fn = _number
        elif spec.startswith("regex:"):
            try:
                self.fn = _regex(re.compile(spec[len("regex:"):]))
            except re.error as e:
                raise UserError(f"--reward {spec}: bad regular expression ({e})") from None
        elif ".py:" in spec or spec.endswith(".py"):
            if spec.endswith(".py"):
                raise UserError(f"--reward {spec}: name the function too, e.g. {spec}:reward")
            self.fn = _load_function(spec)
            self.user = True
        else:
            raise UserError(f"--reward {spec!r}: use exact, number, regex:PATTERN or path.py:function")
        self.format = None
        if self.format_pattern:
            try:
                self.format = re.compile(self.format_pattern)
            except re.error as e:
                raise UserError(f"--format-pattern {self.format_pattern!r}: bad regular expression ({e})") from None

    def __call__(self, prompt: str, reply: str, answer: str, where: str = "") -> float:
        try:
            value = self.fn(prompt, reply, answer)
        except Exception as e:
            raise UserError(f"reward function {self.spec} raised {type(e).__name__}: {e} "
                            f"(on {where or 'prompt ' + repr(prompt[:40])}, reply {reply[:40]!r})") from None
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"reward function {self.spec} returned {value!r} ({type(value).__name__}), not a "
                            f"finite number (on {where or 'prompt ' + repr(prompt[:40])}, reply {reply[:40]!r})")
        value = float(value)
        if self.format is not None and self.format.fullmatch(reply.strip()):
            value += self.format_weight
        return value

    def correct(self, reply: str, answer: str) -> bool:
        """Held-out accuracy's test: the reply, stripped, is the answer, stripped (what
        `eval tasks` counts as an exact match)."""
        return reply.strip() == answer.strip()
