"""Preference tuning with Direct Preference Optimization (DPO, Rafailov et al. 2023).

Each example is a prompt with two replies, `chosen` (preferred) and `rejected`. DPO trains
the policy so that, relative to a frozen reference model (the instruction-tuned model it
starts from), it raises the likelihood of the chosen reply more than the rejected one's:

    loss = -log sigmoid(beta * [(log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))])

where log pi(y|x) is the sum of the reply's token log-probabilities (the paper's sequence
log-likelihood; with `--mask-prompt`, the default, only the reply and its `<|endoftext|>`
count). `beta * (log pi - log ref)` is a reply's implicit reward; the held-out metrics are
the preference accuracy (share of pairs whose chosen reward beats the rejected one), the
reward margin (mean chosen minus rejected reward) and the mean chosen and rejected
log-probabilities under the policy.

**The reference is cached, not a frozen copy.** The reference model never changes and the
pairs are fixed, so its log-probabilities are constants: they are computed once, before
training, in one pass without gradients (`reference_logps`), and travel with each pair in
its batch. Compared with keeping a frozen copy of the model, this halves the weights in
memory and saves a forward pass per step, and it changes nothing in the loss. A resumed run
recomputes the cache from the same starting model (deterministic, eval mode), so resuming
stays exact. With LoRA the reference is simply the model before its adapters.

The objective runs on the one loop (`train.fit` via `fit_examples`): resume, SIGTERM, DDP,
metrics and the loss plot come from there. `finetune_dpo` writes a run folder usable like
`finetune instruct`'s, with `responses_before.json` (the starting model) and
`responses.json` (after DPO) in the format `llmscratch eval instruct` reads, and
`dpo.png`, the four held-out metrics against the examples seen.
"""

from __future__ import annotations

import math

import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoints.run import is_run_dir, read_run_config, save_model
from ..errors import UserError
from ..decoding.prompts import encode_conversation, get_template, read_template
from ..train.state import STATE_FILE, check_resume
from ..utils import atomic_write, write_json
from .classify import set_dropout, set_trainable
from .common import FinetuneConfig, FinetuneResult, check_out_folder, fit_examples, iter_batches
from .data import text_field, json_records
from .instruct import (IGNORE_INDEX, InstructConfig, check_generation_settings, collate_instruct, respond_batch,
                       start_decoder_run)
from .lora import merge_lora

TASK = "dpo"
PREFERENCE_DATASETS = ("alpaca-preference",)
METRICS = ("pref_accuracy", "reward_margin", "chosen_logp", "rejected_logp")


# ------------------------------------------------------------------------------ data


def read_preference_records(source: str) -> list[dict]:
    """Read preference pairs.

    Args:
        source: `alpaca-preference`, or a local `.json` array / `.jsonl` file whose records
            hold `chosen` and `rejected` replies and either `prompt` or Alpaca's
            `instruction` (with an optional `input`).

    Returns:
        `{"messages": [user turn], "chosen": str, "rejected": str, "output": str,
        "where": "file:line"}` per pair; `output` is the record's `output` if it has one,
        else `chosen` (the reference `eval instruct` scores responses against).

    Raises:
        UserError: malformed JSON, a missing or empty field (naming file and line/record).
    """
    path, rows = json_records(source, PREFERENCE_DATASETS, "preference")
    records = []
    for where, obj in rows:
        for key in ("chosen", "rejected"):
            if key not in obj:
                raise UserError(f"{where}: no {key!r} field (a preference record needs prompt or "
                                "instruction, chosen and rejected)")
        if "prompt" in obj:
            user = {"role": "user", "content": text_field(obj["prompt"], where, "prompt"), "input": ""}
        elif "instruction" in obj:
            inp = obj.get("input") or ""
            if not isinstance(inp, str):
                raise UserError(f"{where}: the input field must be a string, got {type(inp).__name__}")
            user = {"role": "user", "content": text_field(obj["instruction"], where, "instruction"), "input": inp}
        else:
            raise UserError(f"{where}: no 'prompt' or 'instruction' field")
        chosen, rejected = text_field(obj["chosen"], where, "chosen"), text_field(obj["rejected"], where, "rejected")
        output = obj["output"] if isinstance(obj.get("output"), str) and obj["output"].strip() else chosen
        records.append({"messages": [user], "chosen": chosen, "rejected": rejected, "output": output,
                        "where": where})
    if not records:
        raise UserError(f"{path}: holds no preference pairs")
    return records


def encode_pair(tokenizer, template, record: dict) -> tuple[tuple[list[int], list[bool]], tuple[list[int], list[bool]]]:
    """`(chosen, rejected)`, each `(ids, is_response)` from `encode_conversation`."""
    return tuple(encode_conversation(tokenizer, template, record["messages"] +  # type: ignore[return-value]
                                     [{"role": "assistant", "content": record[k]}])
                 for k in ("chosen", "rejected"))


# ------------------------------------------------------------------------------ loss


def collate_pairs(batch: list, pad_id: int, mask_prompt: bool = True, max_length: int | None = None):
    """Batch `(chosen, rejected, ref_chosen, ref_rejected)` examples.

    Returns:
        `(inputs, targets, ref)`: inputs and targets `(2B, T)` as `collate_instruct` makes
        them, the B chosen sequences first, then the B rejected ones; `ref` `(2B,)` the
        reference log-probabilities in the same order (NaN when not yet computed).
    """
    seqs = [ex[0] for ex in batch] + [ex[1] for ex in batch]
    inputs, targets = collate_instruct(seqs, pad_id=pad_id, mask_prompt=mask_prompt, max_length=max_length)
    ref = torch.tensor([ex[2] for ex in batch] + [ex[3] for ex in batch], dtype=torch.float32)
    return inputs, targets, ref


def sequence_logps(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`(N,)`: the sum of log p(target) over each row's targets that are not -100."""
    logits = model(inputs).float()
    mask = targets != IGNORE_INDEX
    logp = torch.gather(F.log_softmax(logits, dim=-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def dpo_terms(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> dict:
    """The DPO loss and its metrics from `(2B,)` log-probabilities (chosen first).

    Returns:
        `{"loss"}` (a scalar tensor, mean over pairs) and the tensors `chosen_rewards`,
        `rejected_rewards`, `chosen_logps`, `rejected_logps` (each `(B,)`).
    """
    pc, pr = policy_logps.chunk(2)
    rc, rr = ref_logps.to(policy_logps.dtype).chunk(2)
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return {"loss": loss, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
            "chosen_logps": pc, "rejected_logps": pr}


def dpo_loss(model, batch, beta: float = 0.1) -> torch.Tensor:
    """The DPO objective for the loop (as `partial(dpo_loss, beta=...)`): `batch` from
    `collate_pairs`."""
    inputs, targets, ref = batch
    return dpo_terms(sequence_logps(model, inputs, targets), ref, beta)["loss"]


@torch.no_grad()
def reference_logps(model, examples: list, collate, batch_size: int = 8) -> list[tuple[float, float]]:
    """`(chosen, rejected)` sequence log-probabilities of every pair under `model` as it is
    now (eval mode, no gradients): the cached reference."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[tuple[float, float]] = []
    for inputs, targets, _ in iter_batches(examples, batch_size, collate):
        c, r = sequence_logps(model, inputs.to(device), targets.to(device)).chunk(2)
        out.extend(zip(c.tolist(), r.tolist()))
    model.train(was_training)
    return out


@torch.no_grad()
def evaluate_dpo(model, examples: list, collate, beta: float, batch_size: int = 8) -> dict:
    """Held-out metrics: `val_loss` (the DPO loss), `pref_accuracy`, `reward_margin`,
    `chosen_logp`, `rejected_logp` (means over the pairs), and `pref_ties`, the share of
    pairs whose two rewards are equal. A pair counts as preferred when its chosen reward is
    strictly higher, so before the first update (policy = reference: every reward is 0) the
    accuracy is 0 with every pair tied: no preference yet, which is chance (50%), not
    "always wrong"."""
    device = next(model.parameters()).device
    sums = dict.fromkeys(("val_loss",) + METRICS + ("pref_ties",), 0.0)
    n = 0
    for inputs, targets, ref in iter_batches(examples, batch_size, collate):
        t = dpo_terms(sequence_logps(model, inputs.to(device), targets.to(device)), ref.to(device), beta)
        b = t["chosen_rewards"].numel()
        sums["val_loss"] += t["loss"].item() * b
        sums["pref_accuracy"] += (t["chosen_rewards"] > t["rejected_rewards"]).float().sum().item()
        sums["reward_margin"] += (t["chosen_rewards"] - t["rejected_rewards"]).sum().item()
        sums["pref_ties"] += ((t["chosen_rewards"] - t["rejected_rewards"]).abs() <= 1e-6).float().sum().item()
        sums["chosen_logp"] += t["chosen_logps"].sum().item()
        sums["rejected_logp"] += t["rejected_logps"].sum().item()
        n += b
    return {k: v / max(n, 1) for k, v in sums.items()}


def plot_dpo(records: list[dict], path: Path, x: str = "examples") -> None:
    """The four held-out metrics against the examples seen, one panel each, atomically."""
    fig = dpo_figure(records, x)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")


def dpo_figure(records: list[dict], x: str = "examples"):
    """`plot_dpo`'s figure: accuracy with its 50% chance line, plain tick labels (no offset)."""
    from matplotlib.figure import Figure

    titles = {"pref_accuracy": "preference accuracy", "reward_margin": "reward margin (chosen - rejected)",
              "chosen_logp": "chosen log-prob", "rejected_logp": "rejected log-prob"}
    fig = Figure(figsize=(9, 6), dpi=110)
    for ax, key in zip(fig.subplots(2, 2).flat, METRICS):
        pts = [(r.get(x, 0), r[key]) for r in records if key in r]
        if pts:
            ax.plot(*zip(*pts), "o-", markersize=3)
        if key == "pref_accuracy":
            ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance (50%)")
            ax.set_ylim(-0.02, 1.02)
            ax.legend(loc="lower right")
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.set_title(titles[key])
        ax.set_xlabel(f"{x} seen")
        ax.grid(alpha=0.3)
    fig.suptitle("DPO on held-out pairs")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ command


@dataclass
class DPOConfig(InstructConfig):
    """Settings of `llmscratch finetune dpo`: `finetune instruct`'s (split, trainable,
    responses, ...) and the shared `FinetuneConfig`, plus `beta`."""

    model: str = "runs/instruct"
    """instruction-tuned run folder (or HF GPT-2 folder / preset) to start from; also the reference"""
    data: str = "alpaca-preference"
    """alpaca-preference, or a .json/.jsonl of prompt (or instruction/input), chosen, rejected"""
    out: str = "runs/dpo"
    """run folder to write (usable by generate, chat and eval instruct)"""
    beta: float = 0.1
    """DPO temperature: how far from the reference the policy may move (larger: closer)"""
    template: str | None = None  # type: ignore[assignment]
    """prompt template: alpaca or phi3 (default: the model's config.json, else alpaca)"""
    mask_prompt: bool = True
    """score the replies only (--no-mask-prompt: the prompt tokens count too)"""
    epochs: int = 1
    lr: float = 5e-6
    eval_every: int = 0
    """evaluate and checkpoint every N steps (default 0: about 20 times over the run, the points of dpo.png)"""


DPOResult = FinetuneResult  # the one result type of the fine-tuning commands


def _check_model(model: str) -> None:
    """A classifier run cannot be preference-tuned: say so before loading anything."""
    if is_run_dir(model) and read_run_config(model).get("task") == "classify":
        raise UserError(f"--model {model}: a text classifier (finetune classify) cannot be tuned with DPO; "
                        "give a language model, e.g. a finetune instruct run")


def _responses(model, tokenizer, template, records: list[dict], cfg: DPOConfig) -> list[dict]:
    """The test pairs with the model's replies (one ragged batch), in `responses.json`'s layout."""
    replies = respond_batch(model, tokenizer, template, [r["messages"] for r in records], cfg.max_new_tokens,
                            progress=cfg.progress) if records else []
    return [{"instruction": r["messages"][0]["content"], "input": r["messages"][0].get("input", ""),
             "output": r["output"], "chosen": r["chosen"], "rejected": r["rejected"], "response": reply}
            for r, reply in zip(records, replies)]


def finetune_dpo(cfg: DPOConfig, *, stop_after: int | None = None) -> DPOResult:
    """Preference-tune `cfg.model` on `cfg.data` with DPO (see the module docstring).

    Writes to `cfg.out`: the run folder (`model.safetensors`, `tokenizer.json`,
    `config.json` with the template), `responses_before.json` and `responses.json` (test
    pairs: instruction, input, output, chosen, rejected, response), `metrics.json`
    (held-out metrics before and after), `metrics.jsonl`, `loss.png` and `dpo.png`. Inputs
    are checked before anything is written; `--resume` continues an interrupted run.
    """
    cfg.validate()
    if cfg.beta <= 0:
        raise UserError(f"--beta must be positive, got {cfg.beta}")
    if cfg.lora_rank:
        cfg.trainable = "lora"
    check_generation_settings(cfg)
    _check_model(cfg.model)
    template = get_template(cfg.template or read_template(cfg.model) or "alpaca", for_training=True)
    out = Path(cfg.out)
    if cfg.resume:
        check_resume(out, cfg.settings(), FinetuneConfig.RESUME_FIXED + ("beta",))
    else:
        check_out_folder(out, cfg)
    (rank, world, device, train, val, test, model, tokenizer,
     max_length) = start_decoder_run(cfg, "finetune dpo", read_preference_records)
    master = rank == 0
    collate = partial(collate_pairs, pad_id=tokenizer.eot_id, mask_prompt=cfg.mask_prompt, max_length=max_length)
    nan = float("nan")

    def encode(recs):
        pairs = [encode_pair(tokenizer, template, r) for r in recs]
        return [(c, r, nan, nan) for c, r in pairs]

    train_ex, val_ex = encode(train), encode(val)
    # the cached reference: the starting model's log-probabilities, once
    train_ex = [(c, r, rc, rr) for (c, r, _, _), (rc, rr) in
                zip(train_ex, reference_logps(model, train_ex, collate, cfg.batch_size))]
    val_ex = [(c, r, rc, rr) for (c, r, _, _), (rc, rr) in
              zip(val_ex, reference_logps(model, val_ex, collate, cfg.batch_size))]
    test_run = (test[: cfg.max_test] if cfg.max_test is not None else test) if master else []
    if master and not cfg.resume:  # the starting model's answers, for `eval instruct` to compare
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "responses_before.json",
                   _responses(model, tokenizer, template, test_run, cfg))
    evaluate = partial(evaluate_dpo, examples=val_ex, collate=collate, beta=cfg.beta, batch_size=cfg.batch_size)
    before_metrics = evaluate(model.eval())

    set_dropout(model, cfg.dropout)
    params_line = set_trainable(model, cfg.trainable, cfg.lora_rank, cfg.lora_alpha)
    if master:
        print(f"{len(train)} train / {len(val)} val / {len(test)} test pairs, template {template.name}, "
              f"beta {cfg.beta}, max length {max_length} tokens; {params_line}", file=sys.stderr)
    if not cfg.eval_every:  # enough held-out points to draw the curves in dpo.png
        steps = math.ceil(len(train_ex) / cfg.batch_size) * cfg.epochs // max(cfg.grad_accum, 1)
        cfg.eval_every = max(1, steps // 20)
    result = fit_examples(model, partial(dpo_loss, beta=cfg.beta), train_ex, collate, cfg, device=device, evaluate=evaluate, out=out,
                          rank=rank, world=world, stop_after=stop_after, title="DPO loss", desc="dpo")
    merge_lora(model)
    after = _responses(model, tokenizer, template, test_run, cfg) if master else []

    metrics = {"before": before_metrics, "after": {k: result.last_eval.get(k) for k in ("val_loss",) + METRICS},
               "beta": cfg.beta, "template": template.name, "mask_prompt": cfg.mask_prompt,
               "trainable": cfg.trainable, "n_train": len(train), "n_val": len(val), "n_test": len(test),
               "interrupted": result.interrupted, "steps": result.step, "history": result.records}
    if not master:
        return DPOResult(out=out, metrics=metrics, interrupted=result.interrupted, params_line=params_line)
    save_model(model, out, tokenizer, extra={"task": TASK, "template": template.name, "finetune": cfg.settings()})
    write_json(out / "responses.json", after)
    write_json(out / "metrics.json", metrics)
    plot_dpo([before_metrics | {"examples": 0}] + result.records, out / "dpo.png")
    if not result.interrupted:
        (out / STATE_FILE).unlink(missing_ok=True)
    return DPOResult(out=out, metrics=metrics, interrupted=result.interrupted, params_line=params_line)

