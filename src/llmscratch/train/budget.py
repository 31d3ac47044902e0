"""A time budget that holds: the warmup -> stable -> decay (WSD) schedule driven by the clock.

A step count fixed once from a few early steps wastes the budget or overruns it when the
machine's speed changes (another job starts or ends). Here nothing is fixed early:

- warmup: `warmup_steps` steps, linear, as without a budget (cut short if the clock reaches
  the decay's start first: the decay then starts from the warmup's rate);
- stable: the peak learning rate until the budget's clock (started with pretraining, so
  tokenizer training, data preparation, evaluations and checkpoints all count) reaches
  `1 - decay_fraction` of the budget;
- decay: linear to `lr * min_lr_ratio`, ending at the step the budget runs out. Its end is
  re-estimated after every step from the median time of the recent steps (evaluations and
  checkpoints timed apart, the median cost of the last three counted for each one still to
  come and for the final one); when the estimate moves, the decay continues linearly from the current
  learning rate to the new end. The last step always runs at the floor: the decay completes.

Every re-estimate that moved the end is recorded as `step:end` (`decay_ends`); with it, the
decay start and the steps taken, `config.get_lr` gives every step's learning rate as a pure
function of the step, so `--max-steps N --decay-start D --decay-ends ...`
replays a budget run bit for bit; a resumed budget run keeps the schedule of its steps so far and
goes on by the clock with the time it has left.
"""

from __future__ import annotations

import statistics
from collections import deque

RECENT_STEPS = 7
"""steps whose median time is the speed estimate (a median ignores a lone hiccup)"""


def format_decay_ends(ends: list[tuple[int, int]]) -> str:
    """`[(120, 400), (150, 390)]` -> `"120:400,150:390"`."""
    return ",".join(f"{step}:{end}" for step, end in ends)


def evals_between(first: int, last: int, eval_every: int) -> int:
    """Evaluations at the steps `first < s < last` (multiples of `eval_every`); the one at
    `last`, the final one, is counted apart."""
    if last - 1 <= first:
        return 0
    return (last - 1) // eval_every - first // eval_every


def steps_that_fit(seconds_left: float, step_seconds: float, step: int, eval_every: int,
                   eval_seconds: float) -> int:
    """How many more steps fit in `seconds_left` after `step` steps, each `step_seconds`, with
    an evaluation (and its checkpoint, `eval_seconds`) at every multiple of `eval_every` and
    one at the end. At least 1: the decay's last step must run."""
    def cost(k: int) -> float:
        return k * step_seconds + (evals_between(step, step + k, eval_every) + 1) * eval_seconds

    k = max(1, int((seconds_left - eval_seconds) / (step_seconds + eval_seconds / eval_every)))
    while k > 1 and cost(k) > seconds_left:
        k -= 1
    while cost(k + 1) <= seconds_left:
        k += 1
    return k


class ClockSchedule:
    """Rank 0's budget decisions: when the decay starts and where it ends.

    `fit` reports each step's training time (`step_done`) and each evaluation + checkpoint's
    time (`aside`), then asks `plan(step, now)` for `(max_steps, decay_start, decay_ends)`.
    """

    def __init__(self, deadline: float, budget_s: float, decay_fraction: float, eval_every: int, eval_batches: int, grad_accum: int, decay_start: int | None = None,
                 decay_ends: list[tuple[int, int]] | None = None):
        self.deadline = deadline
        self.decay_at = deadline - decay_fraction * budget_s  # the clock time the decay starts
        self.eval_every = eval_every
        self.eval_share = eval_batches / grad_accum / 3  # an eval batch: a third of a step's work
        self.evals: deque[float] = deque(maxlen=3)
        self.recent: deque[float] = deque(maxlen=RECENT_STEPS)
        self.decay_start = decay_start
        self.ends = list(decay_ends or [])

    def step_done(self, seconds: float) -> None:
        self.recent.append(seconds)

    def aside(self, seconds: float) -> None:
        """An evaluation with its checkpoint took `seconds`."""
        self.evals.append(seconds)

    def estimate(self, step: int, now: float, eval_now: bool) -> int:
        """The step the budget runs out at, seen after `step` steps at clock time `now`
        (`eval_now`: an evaluation at `step` is still to come)."""
        step_s = max(statistics.median(self.recent), 1e-6)
        # the median of the last three: the first one also paid one-time costs (imports, caches)
        eval_s = statistics.median(self.evals) if self.evals else step_s * self.eval_share
        left = self.deadline - now - (eval_s if eval_now else 0.0)
        return step + steps_that_fit(left, step_s, step, self.eval_every, eval_s)

    def plan(self, step: int, now: float, max_steps: int) -> tuple[int, int | None, list[tuple[int, int]]]:
        """`(max_steps, decay_start, decay_ends)` after `step` steps at clock time `now`;
        `max_steps` is the current end (the loop stops when `step` reaches it)."""
        if self.decay_start is not None and step >= max_steps:
            return max_steps, self.decay_start, self.ends  # the decay is done: the run ends here
        end = self.estimate(step, now, eval_now=step % self.eval_every == 0)
        if self.decay_start is None:
            if now < self.decay_at:
                return max(end, step + 1), None, self.ends
            self.decay_start = step  # the next step is the decay's first
            self.ends = [(step, end)]
            return end, self.decay_start, self.ends
        # hysteresis: an estimate one step off either way is noise (a step's worth of time)
        if abs(end - max_steps) > max(1, (max_steps - step) // 50):
            self.ends.append((step, end))
            return end, self.decay_start, self.ends
        return max_steps, self.decay_start, self.ends
