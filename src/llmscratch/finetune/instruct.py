"""Instruction fine-tuning: a GPT learns to answer instructions in a fixed prompt format.

Each example is a conversation (`messages`, as `data.read_instruction_records` returns).
A `prompts.Template` turns it into token ids (`prompts.encode_conversation`, the layout
`chat` and `serve` prompt with): the prompt parts (system text, user turns, the
"### Response:" cue) and the assistant's replies, each reply followed by `<|endoftext|>`,
so the model learns to stop. It also returns which tokens are the assistant's, so
`--mask-prompt` can train on the responses only.

`collate_instruct` batches them: inputs are right-padded with `<|endoftext|>`; targets
are the inputs shifted by one, where the first end-of-text token stays a target (the model
must learn to emit it) and the padding after it is -100, which the loss ignores.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ..checkpoints.run import save_model
from ..decoding.chat import RESPONSE_BATCH_SIZE, respond, respond_batch  # noqa: F401  (re-exported for learners)
from ..errors import UserError
from ..models.gpt import lm_loss
from ..decoding.prompts import DEFAULT_TEMPLATE, MODEL_TEMPLATE, encode_conversation, get_template, has_own_template
from ..decoding.prompts import TEMPLATES  # noqa: F401  (re-exported: learners import the templates from here)
from ..train import distributed_setup, rank0_first
from ..train.state import STATE_FILE
from ..utils import seed_everything, write_json
from .classify import set_dropout, set_trainable
from .common import FinetuneConfig, FinetuneResult, check_out_folder, fit_examples, iter_batches
from .data import parse_split, read_instruction_records
from .lora import merge_lora

IGNORE_INDEX = -100
TASK = "instruct"


def collate_instruct(batch: list[tuple[list[int], list[bool]]], pad_id: int, mask_prompt: bool = False,
                     max_length: int | None = None, ignore_index: int = IGNORE_INDEX):
    """Batch encoded conversations for next-token training.

    Args:
        batch: `(ids, is_response)` pairs from `encode_conversation` (ending in `<|endoftext|>`).
        pad_id: `<|endoftext|>`'s id, used to pad the inputs.
        mask_prompt: targets that are prompt tokens become `ignore_index` too.
        max_length: truncate each sequence to this many input tokens (the context length).

    Returns:
        `(inputs, targets)`, both `(B, T)` long, T = the longest (truncated) sequence - 1.
        `targets[i, t]` is the token after `inputs[i, t]`; the padding after a
        sequence's final `<|endoftext|>` target is `ignore_index`.

    Example: ids [5, 6, eot] and [7, eot] -> inputs [[5, 6], [7, eot]],
        targets [[6, eot], [eot, -100]].
    """
    seqs = []
    for ids, mask in batch:
        if max_length is not None:
            ids, mask = ids[:max_length + 1], mask[:max_length + 1]
        seqs.append((ids, mask))
    T = max(1, max(len(ids) for ids, _ in seqs) - 1)
    inputs = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), ignore_index, dtype=torch.long)
    for i, (ids, mask) in enumerate(seqs):
        n = len(ids) - 1
        if n <= 0:
            continue
        inputs[i, :n] = torch.tensor(ids[:-1])
        tgt = torch.tensor(ids[1:])
        if mask_prompt:
            tgt = tgt.masked_fill(~torch.tensor(mask[1:], dtype=torch.bool), ignore_index)
        targets[i, :n] = tgt
    return inputs, targets


def masked_lm_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the targets that are not -100 (0 if there are none, so a
    batch whose responses were all truncated away does not turn the loss into NaN)."""
    logits = model(inputs)  # (B, T, V)
    if not bool((targets != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return lm_loss(logits, targets)


def instruction_loss(model, batch: tuple) -> torch.Tensor:
    """The instruction-tuning objective: `masked_lm_loss` of a batch `(inputs, targets)`
    from `collate_instruct`. A batch `(inputs, targets, norm)` (training under
    `fit_examples(..., weigh=count_targets)`) gives the loss summed over its targets divided
    by `norm`, the batch's target count over all processes / their number."""
    inputs, targets, *norm = batch
    if not norm:
        return masked_lm_loss(model, inputs, targets)
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum") / norm[0]


def count_targets(batch: tuple) -> int:
    """The number of target tokens of a `collate_instruct` batch (`fit_examples`' `weigh`)."""
    return int((batch[1] != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate_instruct(model, examples: list, collate, batch_size: int = 16) -> dict:
    """`{"val_loss"}`: mean next-token loss over every target that is not -100 in the
    encoded `examples` (batched with `collate`, e.g. a `collate_instruct` partial)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x, y in iter_batches(examples, batch_size, collate):
        x, y = x.to(device), y.to(device)
        n = int((y != IGNORE_INDEX).sum())
        if n:
            total += lm_loss(model(x), y).item() * n
            count += n
    return {"val_loss": total / max(count, 1)}


class DecoderRun(NamedTuple):
    """What a decoder fine-tune (instruct, DPO) starts from; see `start_decoder_run`."""

    rank: int
    world: int
    device: torch.device
    train: list
    val: list
    test: list
    model: torch.nn.Module
    tokenizer: object
    max_length: int
    """the longest sequence trained on: --max-length, capped at the model's context"""


def check_generation_settings(cfg) -> None:
    """The dropout and reply-length settings both decoder fine-tunes take."""
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.max_new_tokens < 0:
        raise UserError("--max-new-tokens must be >= 0")


def start_decoder_run(cfg, command: str, read_records: Callable[[str], list]) -> DecoderRun:
    """The start every decoder fine-tune shares: the processes and device; the records read
    (rank 0 first: it may download them) and split in order; the model, seeded, refused in
    one line if it is an encoder, with the kernels applied when `cfg.kernels`."""
    from ..checkpoints.run import load_model

    rank, world, device = distributed_setup(cfg.device)
    records = rank0_first(world, rank == 0, lambda: read_records(cfg.data))
    train, val, test = split_in_order(records, parse_split(cfg.split))
    seed_everything(cfg.seed)
    model, tokenizer = load_model(cfg.model, device=device)
    model.kind.require("generate", command)  # a decoder's command
    if cfg.kernels:
        from ..kernels import apply_kernels

        apply_kernels(model)
    ctx = model.config.context_length
    return DecoderRun(rank, world, device, train, val, test, model, tokenizer, min(cfg.max_length or ctx, ctx))


def split_in_order(records: list, fractions: tuple[float, float, float]) -> tuple[list, list, list]:
    """Train/val/test parts in file order (the book's 85/5/10 split of alpaca-1100)."""
    n = len(records)
    n_train = int(n * fractions[0])
    n_val = int(n * fractions[1])
    parts = records[:n_train], records[n_train:n_train + n_val], records[n_train + n_val:]
    if min(len(p) for p in parts) < 1:
        raise UserError(f"dataset too small: {n} example(s) cannot fill a "
                        f"{'/'.join(str(round(f * 100)) for f in fractions)} train/val/test split "
                        "with at least one example each")
    return parts


def record_fields(messages: list[dict]) -> dict:
    """instruction / input / reference output of a conversation (its last exchange)."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return {"instruction": messages[last_user]["content"], "input": messages[last_user].get("input", ""),
            "output": messages[-1]["content"]}


@dataclass
class InstructConfig(FinetuneConfig):
    """Settings of `llmscratch finetune instruct` (plus the shared `FinetuneConfig`)."""

    model: str = "small"
    """run folder, Hugging Face GPT-2 folder or preset to start from"""
    data: str = "alpaca-1100"
    """alpaca-1100, an Alpaca .json/.jsonl file, or a chat .jsonl with messages"""
    out: str = "runs/instruct"
    """run folder to write (usable by generate and chat)"""
    template: str | None = None
    """prompt template: alpaca, phi3 or model (the tokenizer's own chat template); default: the
    model's own when its tokenizer has one (Llama 3.2 Instruct, Qwen3, SmolLM2), else alpaca"""
    mask_prompt: bool = False
    """train on the response tokens only"""
    split: str = "0.85,0.05,0.10"
    """train,val,test fractions, in file order"""
    max_length: int | None = None
    """truncate examples to this many tokens (default and maximum: the context length)"""
    trainable: str = "all"
    """all, last-N or lora"""
    seed: int = 123
    """seed for the data split, the shuffling, dropout and LoRA's initial weights"""
    max_new_tokens: int = 256
    """longest test-set response generated"""
    max_test: int | None = None
    """generate responses for at most this many test examples (default: all)"""
    epochs: int = 2


InstructResult = FinetuneResult  # the one result type of the fine-tuning commands


def finetune_instruct(cfg: InstructConfig, *, stop_after: int | None = None) -> InstructResult:
    """Instruction-tune a model as described by `cfg`.

    Writes to `cfg.out` a run folder (`model.safetensors`, `tokenizer.json`, `config.json`
    with the template) usable by `llmscratch generate` and `chat`, plus `responses.json`
    (test set: instruction, input, reference output, model response), `metrics.json`,
    `metrics.jsonl` and `loss.png`. Inputs are checked before anything is written. While
    training, `train_state.safetensors` holds the checkpoint `--resume` continues from
    (after Ctrl-C, SIGTERM or `stop_after` steps); it is removed once the run is done.
    """
    cfg.validate()
    if cfg.lora_rank:
        cfg.trainable = "lora"
    default = MODEL_TEMPLATE if has_own_template(cfg.model) else DEFAULT_TEMPLATE
    template = get_template(cfg.template or default, for_training=True)
    out = Path(cfg.out)
    check_out_folder(out, cfg)
    check_generation_settings(cfg)
    (rank, world, device, train, val, test, model, tokenizer,
     max_length) = start_decoder_run(cfg, "finetune instruct", read_instruction_records)
    master = rank == 0
    pad_id = tokenizer.eot_id
    encode = lambda recs: [encode_conversation(tokenizer, template, r["messages"]) for r in recs]  # noqa: E731
    train_ex, val_ex = encode(train), encode(val)
    n_cut = sum(len(ids) > max_length + 1 for ids, _ in train_ex + val_ex)  # collate_instruct cuts them
    set_dropout(model, cfg.dropout)
    params_line = set_trainable(model, cfg.trainable, cfg.lora_rank, cfg.lora_alpha)
    if master:
        print(f"{len(train)} train / {len(val)} val / {len(test)} test examples, template {template.name}, "
              f"max length {max_length} tokens; {params_line}", file=sys.stderr)
        if n_cut:
            print(f"note: {n_cut} of {len(train_ex) + len(val_ex)} train/val examples are longer than "
                  f"{max_length} tokens and are cut to it (their ends are not trained on)", file=sys.stderr)

    collate = partial(collate_instruct, pad_id=pad_id, mask_prompt=cfg.mask_prompt, max_length=max_length)
    evaluate = partial(evaluate_instruct, examples=val_ex, collate=collate, batch_size=cfg.batch_size)
    result = fit_examples(model, instruction_loss, train_ex, collate, cfg, device=device, evaluate=evaluate,
                          out=out, rank=rank, world=world, stop_after=stop_after, weigh=count_targets,
                          title="instruction fine-tuning loss", desc="instruct")
    merge_lora(model)

    test_run = (test[: cfg.max_test] if cfg.max_test is not None else test) if master else []
    responses = []
    replies = respond_batch(model, tokenizer, template, [r["messages"][:-1] for r in test_run], cfg.max_new_tokens,
                            progress=cfg.progress and master)
    for r, reply in zip(test_run, replies):
        msgs = r["messages"]
        entry = record_fields(msgs)
        if len([m for m in msgs if m["role"] != "system"]) > 2 or msgs[0]["role"] == "system":
            entry["messages"] = msgs[:-1]  # the context the response was generated in
        entry["response"] = reply
        responses.append(entry)

    val_loss = result.last_eval.get("val_loss")
    metrics = {"val_loss": val_loss, "template": template.name, "mask_prompt": cfg.mask_prompt,
               "trainable": cfg.trainable, "n_train": len(train), "n_val": len(val), "n_test": len(test),
               "n_truncated": n_cut, "n_responses": len(responses), "n_empty_responses": sum(not r["response"].strip() for r in responses),
               "interrupted": result.interrupted, "steps": result.step, "history": result.records}
    if not master:
        return InstructResult(out=out, metrics=metrics, interrupted=result.interrupted, params_line=params_line)
    # config.json is written last by save_model, after the weights: a folder with a
    # config always has the weights it describes.
    save_model(model, out, tokenizer, extra={"task": TASK, "template": template.name,
                                             "finetune": cfg.settings()})
    write_json(out / "responses.json", responses)
    write_json(out / "metrics.json", metrics)
    if not result.interrupted:
        (out / STATE_FILE).unlink(missing_ok=True)  # done: nothing left to resume
    return InstructResult(out=out, metrics=metrics, interrupted=result.interrupted, params_line=params_line)


