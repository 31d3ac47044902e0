"""Reinforcement learning with verifiable rewards: GRPO (Shao et al. 2024) with DAPO's
token-level loss (Yu et al. 2025), as an objective of the one training loop.

Each rollout takes `P` prompts of a task (`rewards.py`) and samples a **group** of `G`
replies to each through the decoding engine (`decoding.engine.Engine`: ragged rows, each
with its own seeded generator, temperature/top-k/top-p). A verifiable reward scores every
reply; a reply's **advantage** is its reward against its own group's,

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)      (without --no-std-normalise)

so a group whose replies all score alike teaches nothing, and one good reply among bad
ones is pushed up. The policy loss over every sampled token t of every reply i is the
clipped ratio objective of PPO, averaged over all the rollout's tokens at once (DAPO's
token-level normalisation: a long reply weighs by its length, not 1/its length):

    ratio = pi(y_t | ...) / pi_old(y_t | ...)
    loss  = sum_{i,t} -min(ratio A_i, clip(ratio, 1 - clip_low, 1 + clip_high) A_i)
                      + kl_coef * KL_t                         / (number of tokens)

`pi_old` is the policy that sampled the rollout (its log-probabilities are stored with
it); `--ppo-epochs E` trains E optimizer steps on one rollout, the ratio moving away from
1 after the first. `KL_t = exp(ref - logp) - (ref - logp) - 1` (the k3 estimator) keeps the
policy near the starting model; with `--kl-coef 0` (the default, as in DAPO and nanochat)
no reference model is kept at all.

**On the loop.** Step `s` trains on rollout `s // E` (`RolloutBatches`). A rollout is a
pure function of the model at its first step and of the seeds: the prompts come from a
seeded permutation of the task, and every reply's sampler is seeded by (run seed, rollout,
prompt position, sample), so there is no sampler state to save. A resume at the first step
of a rollout samples it again from the restored weights, bit for bit; a resume inside one
(E > 1) reads it back from `rollout.rank{r}.{k}.safetensors`, written when it was sampled
(a checkpoint removes the files before its own rollout; a finished run removes all).
Under DDP every rank samples its own share of the prompts and the token normaliser counts
all ranks' tokens, so the gradient is one process's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file

from ..decoding.engine import Engine
from ..decoding.sampling import GREEDY, Sampling
from ..errors import UserError
from ..utils import save_safetensors
from .rewards import Reward, TaskExample

IGNORE_INDEX = -100
STOP = "\n"
"""A reply ends at its first newline (or `<|endoftext|>`), as `eval tasks` decodes one."""


# ------------------------------------------------------------------------------ the loss


def token_logps(model, inputs: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`(N, T)`: log pi(targets[i, t] | inputs[i, :t + 1]), from logits divided by the
    sampling temperature (the distribution the replies were drawn from); any value where
    the target is -100."""
    logits = model(inputs).float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return torch.gather(F.log_softmax(logits, dim=-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def grpo_terms(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               clip_low: float = 0.2, clip_high: float = 0.28, ref_logps: torch.Tensor | None = None,
               kl_coef: float = 0.0) -> dict:
    """The per-token GRPO terms of `(N, T)` log-probabilities of the sampled tokens.

    Returns:
        `{"sum"}` the policy loss plus `kl_coef` * KL summed over the tokens where `mask`
        (divide by the token count for DAPO's mean), and the no-grad counts `clipped`
        (tokens whose objective took the clipped branch), `kl` (summed KL, 0 without a
        reference) and `tokens`.
    """
    mask = mask.bool()
    delta = (logps - old_logps).masked_fill(~mask, 0.0)  # padding must not overflow exp
    ratio = torch.exp(delta)
    adv = advantages.to(ratio.dtype)[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros((), device=logps.device)
    if ref_logps is not None:
        d = (ref_logps - logps).masked_fill(~mask, 0.0)
        kl_t = torch.exp(d) - d - 1.0
        per_token = per_token + kl_coef * kl_t
        kl = (kl_t * mask).sum().detach()
    m = mask.to(per_token.dtype)
    return {"sum": (per_token * m).sum(), "clipped": ((clipped < unclipped) & mask).sum().detach(),
            "kl": kl, "tokens": mask.sum().detach()}


@dataclass(eq=False)
class GRPOBatch:
    """One micro-batch of a rollout as the loss reads it (all `(N, T)` but `advantages`)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    """the sampled reply tokens; -100 on the prompt and the padding"""
    old_logps: torch.Tensor
    advantages: torch.Tensor
    """`(N,)`"""
    norm: float
    """the step's reply tokens over all ranks and micro-batches / (ranks x micro-batches)"""
    ref_logps: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)
    """filled by `grpo_loss`: clipped, kl, tokens (for the step's metrics)"""


def grpo_loss(model, batch: GRPOBatch, clip_low: float = 0.2, clip_high: float = 0.28, kl_coef: float = 0.0,
              temperature: float = 1.0) -> torch.Tensor:
    """The objective for the loop (as a `partial`): `grpo_terms`' sum over the batch divided
    by `batch.norm`, so that the loop's average over micro-batches and DDP's over ranks give
    the mean over every reply token of the step."""
    logps = token_logps(model, batch.inputs, batch.targets, temperature)
    t = grpo_terms(logps, batch.old_logps, batch.advantages, batch.targets != IGNORE_INDEX, clip_low, clip_high,
                   batch.ref_logps if kl_coef > 0 else None, kl_coef)
    batch.stats.update(clipped=float(t["clipped"]), kl=float(t["kl"]), tokens=float(t["tokens"]))
    return t["sum"] / batch.norm


def group_advantages(rewards: torch.Tensor, group_size: int, std_normalise: bool = True) -> torch.Tensor:
    """`(N,)` advantages of `(N,)` rewards laid out group by group (`N = prompts x group_size`):
    each reward minus its group's mean, divided by the group's standard deviation (+1e-4)."""
    r = rewards.view(-1, group_size)
    a = r - r.mean(dim=1, keepdim=True)
    if std_normalise:
        a = a / (r.std(dim=1, unbiased=False, keepdim=True) + 1e-4)
    return a.reshape(-1)


# ------------------------------------------------------------------------------ sampling


def encode_prompts(tokenizer, examples: Sequence[TaskExample], context_length: int,
                   max_new_tokens: int) -> list[list[int]]:
    """The prompts' token ids (an empty prompt is `<|endoftext|>`). A prompt that leaves
    no room for `max_new_tokens` in the context window is a one-line UserError naming it."""
    out = []
    for ex in examples:
        ids = tokenizer.encode(ex.prompt, allowed_special="none") or [tokenizer.eot_id]
        if len(ids) + max_new_tokens > context_length:
            raise UserError(f"{ex.where}: the prompt is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} "
                            f"it does not fit the model's context of {context_length} tokens")
        out.append(ids)
    return out


def decode_replies(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int,
                   samplings: Sequence[Sampling], batch_size: int | None = None) -> list:
    """Decode one reply per `(prompt, sampling)` through the engine (one ragged batch, eval
    mode), each ending at a newline or `<|endoftext|>`: the finished `DecodeRow`s, whose
    `tokens` are what was sampled and `text` the reply before the newline."""
    engine = Engine(model, tokenizer)
    rows = [engine.row(p, max_new_tokens, s, eos_id=engine.eos_id, stop=[STOP]) for p, s in zip(prompts, samplings)]
    return engine.run(rows, batch_size=batch_size)


def sequences(prompts: Sequence[list[int]], replies: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(inputs, targets)` `(N, T)` of prompt + reply, right-padded; targets are the reply's
    tokens at the positions that predict them, -100 elsewhere."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, replies)]
    T = max(len(s) for s in seqs) - 1
    inputs = torch.zeros(len(seqs), T, dtype=torch.long)
    targets = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for i, (p, r, s) in enumerate(zip(prompts, replies, seqs)):
        inputs[i, :len(s) - 1] = torch.tensor(s[:-1])
        targets[i, len(p) - 1:len(s) - 1] = torch.tensor(list(r))
    return inputs, targets


@torch.no_grad()
def logps_of(model, inputs: torch.Tensor, targets: torch.Tensor, temperature: float, batch_size: int = 64
             ) -> torch.Tensor:
    """`token_logps` in eval mode without gradients, `batch_size` rows at a time, on the CPU
    (0 where the target is -100)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    parts = []
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i:i + batch_size].to(device), targets[i:i + batch_size].to(device)
        parts.append(token_logps(model, x, y, temperature).masked_fill(y == IGNORE_INDEX, 0.0).cpu())
    model.train(was)
    return torch.cat(parts)


def row_seed(seed: int, rollout: int, position: int, sample: int, group_size: int) -> int:
    """The sampler seed of one reply: a pure function of the run's seed, the rollout, the
    prompt's place in the rollout (over all ranks) and the sample's place in its group."""
    return ((seed * 1_000_003 + rollout) * 1_000_033 + position * group_size + sample) % (2 ** 62)


@dataclass
class Rollout:
    """A rank's samples of one rollout: what the loss reads, and what the metrics report."""

    inputs: torch.Tensor
    targets: torch.Tensor
    old_logps: torch.Tensor
    advantages: torch.Tensor
    rewards: torch.Tensor
    correct: torch.Tensor
    """`(N,)` 1.0 where the reply is the answer (exact match, stripped)"""
    ref_logps: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {k: getattr(self, k) for k in ("inputs", "targets", "old_logps", "advantages", "rewards", "correct")}
        if self.ref_logps is not None:
            t["ref_logps"] = self.ref_logps
        return {k: v.contiguous() for k, v in t.items()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> Rollout:
        return cls(**t)


@dataclass
class RolloutSettings:
    """What a rollout needs besides the model and the task (`GRPOConfig` fills it)."""

    prompts_per_step: int
    group_size: int
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    ppo_epochs: int = 1
    grad_accum: int = 1
    std_normalise: bool = True
    seed: int = 0


class RolloutBatches:
    """GRPO's `train.BatchSource`: step `s` trains on rollout `s // ppo_epochs`, sampled
    from `model` when first needed (see the module docstring for resume and DDP).

    Args:
        model: the policy being trained (sampled in eval mode, without gradients).
        tokenizer, examples, prompts: the training task and its encoded prompts.
        reward: scores each reply (`rewards.Reward`).
        settings: `RolloutSettings`.
        ref_model: the frozen starting model for the KL penalty, or None.
        out: the run folder for rollout files (ppo_epochs > 1), or None.
    """

    unit = "samples"

    def __init__(self, model, tokenizer, examples: Sequence[TaskExample], prompts: Sequence[list[int]],
                 reward: Reward, settings: RolloutSettings, ref_model=None, out: Path | None = None):
        self.model, self.tokenizer, self.examples, self.prompts = model, tokenizer, examples, prompts
        self.reward, self.s, self.ref_model, self.out = reward, settings, ref_model, out
        self._key: tuple[int, int] | None = None
        self._rollout: Rollout | None = None
        self._norm = 1.0
        self._orders: dict[int, list[int]] = {}
        self._step_stats: list[dict] = []

    # ------------------------------------------------------------ which prompts
    def prompt_indices(self, rollout: int) -> list[int]:
        """The task examples of a rollout, all ranks together: consecutive places in seeded
        passes over the task (a new permutation each pass)."""
        n, P = len(self.examples), self.s.prompts_per_step
        out = []
        for pos in range(rollout * P, (rollout + 1) * P):
            epoch, i = divmod(pos, n)
            if epoch not in self._orders:
                gen = torch.Generator().manual_seed(self.s.seed * 7919 + epoch)
                self._orders = {epoch: torch.randperm(n, generator=gen).tolist()} | {
                    e: o for e, o in self._orders.items() if e == epoch - 1}
            out.append(self._orders[epoch][i])
        return out

    # ------------------------------------------------------------ sampling
    def sample(self, rollout: int, rank: int = 0, world: int = 1) -> Rollout:
        """This rank's share of `rollout`, sampled from the model as it is now."""
        s, G = self.s, self.s.group_size
        positions = list(range(s.prompts_per_step))[rank::world]
        chosen = self.prompt_indices(rollout)
        prompts, samplings, owners = [], [], []
        for pos in positions:
            idx = chosen[pos]
            for j in range(G):
                prompts.append(self.prompts[idx])
                samplings.append(Sampling(s.temperature, s.top_k, s.top_p,
                                          seed=row_seed(s.seed, rollout, pos, j, G)))
                owners.append(idx)
        rows = decode_replies(self.model, self.tokenizer, prompts, s.max_new_tokens, samplings)
        rewards, correct = [], []
        for idx, row in zip(owners, rows):
            ex = self.examples[idx]
            rewards.append(self.reward(ex.prompt, row.text, ex.answer, ex.where))
            correct.append(float(self.reward.correct(row.text, ex.answer)))
        rewards_t = torch.tensor(rewards, dtype=torch.float32)
        inputs, targets = sequences(prompts, [row.tokens for row in rows])
        old = logps_of(self.model, inputs, targets, s.temperature)
        ref = logps_of(self.ref_model, inputs, targets, s.temperature) if self.ref_model is not None else None
        return Rollout(inputs, targets, old, group_advantages(rewards_t, G, s.std_normalise), rewards_t,
                       torch.tensor(correct), ref)

    def rollout_file(self, rollout: int, rank: int) -> Path | None:
        return None if self.out is None else self.out / f"rollout.rank{rank}.{rollout}.safetensors"

    def _load(self, step: int, rank: int, world: int, device: torch.device) -> Rollout:
        rollout = step // self.s.ppo_epochs
        path = self.rollout_file(rollout, rank)
        if self._rollout is not None and self._key == (rollout, rank):
            return self._rollout
        if step % self.s.ppo_epochs:  # a resume inside a rollout: the one sampled before the stop
            if path is None or not path.is_file():
                raise UserError(f"cannot resume at step {step}: its rollout {path} is missing; "
                                "start again with --overwrite")
            r = Rollout.from_tensors(load_file(str(path)))
        else:
            r = self.sample(rollout, rank, world)
            if self.s.ppo_epochs > 1 and path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_safetensors(r.tensors(), path)
        tokens = torch.tensor([float((r.targets != IGNORE_INDEX).sum())], device=device)
        if world > 1:
            dist.all_reduce(tokens)
        self._norm = max(float(tokens.item()), 1.0) / (world * self.s.grad_accum)
        self._key, self._rollout = (rollout, rank), r
        return r

    def get(self, step: int, micro: int, rank: int, world: int, device: torch.device) -> GRPOBatch:
        r = self._load(step, rank, world, device)
        n = len(r.inputs)
        per = math.ceil(n / self.s.grad_accum)
        lo, hi = micro * per, min(n, (micro + 1) * per)
        if lo >= hi:  # more micro-batches than rows: an empty share adds nothing
            lo, hi = n - 1, n
            adv = torch.zeros(1)
        else:
            adv = r.advantages[lo:hi]
        to = lambda t: None if t is None else t[lo:hi].to(device)  # noqa: E731
        batch = GRPOBatch(to(r.inputs), to(r.targets), to(r.old_logps), adv.to(device), self._norm, to(r.ref_logps))
        if micro == 0:
            self._step_stats = []
        self._step_stats.append(batch.stats)
        return batch

    def metrics(self) -> dict:
        """The step's numbers, over all ranks: the rollout's mean `reward`, `train_accuracy`
        (replies that are the answer) and `response_length` (tokens), and from the loss
        the mean `kl` per token and the `clip_fraction` of tokens clipped."""
        r = self._rollout
        lengths = (r.targets != IGNORE_INDEX).sum(1).float()
        loss_stats = [sum(st.get(k, 0.0) for st in self._step_stats) for k in ("clipped", "kl", "tokens")]
        t = torch.tensor([float(r.rewards.sum()), float(r.correct.sum()), float(lengths.sum()), float(len(r.rewards)),
                          *loss_stats], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = next(self.model.parameters()).device
            t = t.to(device)
            dist.all_reduce(t)
            t = t.cpu()
        reward, correct, length, n, clipped, kl, tokens = t.tolist()
        return {"reward": reward / n, "train_accuracy": correct / n, "response_length": length / n,
                "kl": kl / max(tokens, 1.0), "clip_fraction": clipped / max(tokens, 1.0)}

    def forget_before(self, step: int) -> None:
        """Remove the rollout files a resume from `step` can no longer need (`fit`'s
        `on_checkpoint`)."""
        if self.out is None:
            return
        keep = step // self.s.ppo_epochs
        for path in self.out.glob("rollout.rank*.safetensors"):
            k = path.name.split(".")[-2]
            if k.isdigit() and int(k) < keep:
                path.unlink(missing_ok=True)

    def seen(self, step: int) -> int:
        return math.ceil(step / self.s.ppo_epochs) * self.s.prompts_per_step * self.s.group_size

    def epoch_of(self, step: int) -> float:
        return (step // self.s.ppo_epochs) * self.s.prompts_per_step / len(self.examples)


# ------------------------------------------------------------------------------ held-out accuracy


def greedy_replies(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int,
                   batch_size: int | None = 64) -> list[str]:
    """Each prompt's greedy reply (the text before the newline), one ragged batch."""
    rows = decode_replies(model, tokenizer, prompts, max_new_tokens, [GREEDY] * len(prompts), batch_size)
    return [row.text for row in rows]


def heldout_scores(model, tokenizer, examples: Sequence[TaskExample], prompts: Sequence[list[int]],
                   reward: Reward, max_new_tokens: int, rank: int = 0, world: int = 1,
                   replies_out: list | None = None) -> dict:
    """`{"accuracy", "val_reward"}` of greedy replies to the held-out examples: the share
    that is the answer (exact match, stripped: `eval tasks`' `exact_match`) and the mean
    reward. Under DDP each rank decodes its share and the sums are all-reduced.
    `replies_out`, a list, receives this rank's replies."""
    mine = list(range(len(examples)))[rank::world]
    replies = greedy_replies(model, tokenizer, [prompts[i] for i in mine], max_new_tokens) if mine else []
    hits = sum(reward.correct(rep, examples[i].answer) for i, rep in zip(mine, replies))
    total = sum(reward(examples[i].prompt, rep, examples[i].answer, examples[i].where) for i, rep in zip(mine, replies))
    t = torch.tensor([float(hits), float(total), float(len(mine))], dtype=torch.float64)
    if world > 1:
        device = next(model.parameters()).device
        t = t.to(device)
        dist.all_reduce(t)
        t = t.cpu()
    if replies_out is not None:
        replies_out.extend(replies)
    hits, total, n = t.tolist()
    return {"accuracy": hits / max(n, 1.0), "val_reward": total / max(n, 1.0)}


def plot_grpo(records: list[dict], path: Path, x: str = "step") -> None:
    """Reward and held-out accuracy, KL, reply length and clip fraction against the step,
    one panel each, written atomically."""
    from matplotlib.figure import Figure

    from ..utils import atomic_write

    fig = Figure(figsize=(10, 6.5), dpi=110)
    axes = fig.subplots(2, 2).flat
    panels: list[tuple[str, list[tuple[str, str]]]] = [
        ("reward and accuracy", [("reward", "train mean reward"), ("accuracy", "held-out accuracy")]),
        ("KL to the starting model (per token)", [("kl", "KL")]),
        ("reply length (tokens)", [("response_length", "mean length")]),
        ("clip fraction", [("clip_fraction", "tokens clipped")])]
    for ax, (title, keys) in zip(axes, panels):
        for key, label in keys:
            pts = [(r.get(x, 0), r[key]) for r in records if key in r]
            if pts:
                ax.plot(*zip(*pts), "o-" if key == "accuracy" else "-", label=label, markersize=4)
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    fig.suptitle("GRPO")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")

