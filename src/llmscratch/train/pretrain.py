"""Pretraining: the language-model objective, its data and its run folder.

`pretrain(TrainConfig(...))` is the whole job, in plain functions (litgpt style):

    setup (tokenizer, data, model, maybe resume)
      -> fit (loop.py): for each step: micro-batches -> backward -> clip -> AdamW step
              every eval_every steps: validation loss/perplexity/bits-per-byte, a sample,
              metrics.jsonl, loss.png and a checkpoint
      -> final checkpoint

The objective is `lm_train_loss` (next-token cross-entropy, the one place the LM-head loss
is computed) on `LMBatches` (random windows of the corpus, a pure function of the step), with
`evaluate` on the held-out tail.

Exact resume. The learning rate is a pure function of the step (`get_lr`), batches are a
pure function of (seed, step) (`data.BatchSampler`), and the checkpoint holds the weights,
the optimizer's moments, the step and the RNG state (for dropout). So a run stopped at step
10 and resumed to 20 ends with the weights of an uninterrupted 20-step run.

Checkpoints. `train_state.safetensors` is one self-contained file (see `state.py`);
`model.safetensors` beside it holds just the weights, for inference.

Distributed. Launched by `torchrun`, each process takes its slice of every global batch
and DDP averages the gradients, so N processes follow the same loss trajectory as one
process with the same global batch.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..checkpoints.run import save_model
from ..data import BatchSampler, iter_eval_batches, split_train_val, token_ids
from ..data.corpora import load_text
from ..errors import UserError
from ..kernels import lm_head_loss
from ..models.gpt import GPT, GPTConfig, lm_loss
from .config import TrainConfig, parse_duration, schedule_of
from .loop import Objective, fit, rank0_first
from .mlm import objective_of, pretrain_mlm
from .prepared import is_prepared_dir, prepared_splits, prepared_tokenizer
from .start import build_model, start_run

# ------------------------------------------------------------------------ the objective


def lm_train_loss(model: GPT, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch `(x, y)`, from the final hidden states: with
    the kernels on, head + cross-entropy run chunk by chunk and the full `(B*T, vocab)`
    logits are never stored (see `kernels.lm_head_loss`)."""
    x, y = batch
    return lm_head_loss(model, model.hidden_states(x), y)


class LMBatches:
    """The pretraining `BatchSource`: micro-batch `micro` of step `step` is window batch
    `step * grad_accum + micro` of a `BatchSampler` (a pure function of the seed and that
    number; each rank takes its rows of it). With `seq_len_warmup` N, the windows of step s < N
    are cut to their first `length(s)` tokens: an eighth of the context growing linearly to
    all of it (multiples of 8), still a pure function of the step."""

    unit = "tokens"

    def __init__(self, sampler: BatchSampler, grad_accum: int, seq_len_warmup: int = 0):
        self.sampler = sampler
        self.grad_accum = grad_accum
        self.seq_len_warmup = seq_len_warmup

    def length(self, step: int) -> int:
        """Tokens per training sequence at `step`."""
        T, n = self.sampler.context_length, self.seq_len_warmup
        if step >= n:
            return T
        return min(T, max(8, T // 8, T * (step + 1) // n // 8 * 8))

    def get(self, step: int, micro: int, rank: int, world: int, device: torch.device):
        x, y = self.sampler.get_batch(step * self.grad_accum + micro, rank, world, device=device)
        if step < self.seq_len_warmup:
            n = self.length(step)
            x, y = x[:, :n], y[:, :n]
        return x, y

    def seen(self, step: int) -> int:
        rows = self.grad_accum * self.sampler.batch_size
        warm = min(step, self.seq_len_warmup)
        return rows * (sum(self.length(s) for s in range(warm)) + (step - warm) * self.sampler.context_length)

    def epoch_of(self, step: int) -> float:
        return self.sampler.epoch_of(step * self.grad_accum)


# ------------------------------------------------------------------------------ data


def build_tokenizer(spec: str, documents):
    """The run's tokenizer: GPT-2's, a BPE trained on the data (`bpe:4096`), an uncased
    WordPiece trained on it (`wordpiece:4096`, BERT's kind: no case, no accents), or a file."""
    from ..tokenizer import build_tokenizer as build

    return build(spec, (d.text for d in documents))


def prepare_data(cfg: TrainConfig, tokenizer, context_length: int, documents):
    """Tokenize (once, cached by content) and split into a training head and validation tail.

    Returns:
        `(train_ids, val_ids, bytes_per_token)`; the last turns nats/token into bits/byte.
    """
    ids, bytes_per_token = token_ids(documents, tokenizer, source=str(cfg.data), progress=cfg.progress)
    if len(ids) < 2 * (context_length + 1):
        raise UserError(
            f"--data {cfg.data}: the corpus has {len(ids):,} tokens, too short for --context-length "
            f"{context_length} (need at least {2 * (context_length + 1):,} for a training and a "
            "validation window); use more text or a shorter context"
        )
    train_ids, val_ids = split_train_val(ids, cfg.val_fraction, context_length)
    return train_ids, val_ids, bytes_per_token


# ------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: GPT, val_ids, batch_size: int, context_length: int, max_batches: int | None,
             device: torch.device, amp: torch.dtype | None = None, rank: int = 0,
             world_size: int = 1, progress: bool = False) -> float:
    """Mean next-token loss (nats/token) over the first `max_batches` validation batches
    (with a progress bar if `progress`)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, token count)
    ctx = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
    batches = iter_eval_batches(val_ids, batch_size, context_length, max_batches, rank=rank, world_size=world_size)
    if progress:
        from ..utils import progress_bar

        n = -(-((len(val_ids) - 1) // context_length) // batch_size)
        batches = progress_bar(batches, total=min(n, max_batches or n), desc="eval", unit="batch", dynamic_ncols=True)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with ctx:
            logits = model(x)
        total[0] += lm_loss(logits, y).double() * y.numel()
        total[1] += y.numel()
    if world_size > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


def metrics_from_loss(loss: float, bytes_per_token: float) -> dict:
    """Loss in nats/token -> perplexity and bits per byte (comparable across tokenizers)."""
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
            "val_bpb": loss / math.log(2) / bytes_per_token}


def evaluate_pretraining(model: GPT, val_ids, bytes_per_token: float, cfg: TrainConfig, device: torch.device,
                          amp: torch.dtype | None, rank: int, world: int, tokenizer=None,
                          task_eval: Callable | None = None) -> dict:
    """The pretraining evaluation: loss, perplexity and bits per byte on the validation
    tail, plus (rank 0, `cfg.sample_tokens` > 0) a sample continuing its first tokens and
    (rank 0, `task_eval`) the task scores `task_eval(model, tokenizer)` returns."""
    loss = evaluate(model, val_ids, cfg.batch_size, model.config.context_length, cfg.eval_batches,
                    device, amp, rank, world)
    result = metrics_from_loss(loss, bytes_per_token)
    # under FSDP every rank samples (each forward all-gathers the weights); rank 0's is shown
    if (rank == 0 or cfg.strategy == "fsdp") and tokenizer is not None and cfg.sample_tokens > 0:
        with torch.autocast(device.type, enabled=False):  # sampled in the weights' own dtype
            result["sample"] = _sample(model, tokenizer, val_ids, cfg.sample_tokens, device, cfg.seed)
    if task_eval is not None and rank == 0:
        with torch.autocast(device.type, enabled=False):
            result.update(task_eval(model, tokenizer))
    return result


# ----------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    out: Path
    step: int
    tokens_seen: int
    val_loss: float | None
    val_bpb: float | None
    interrupted: bool
    sample: str = ""
    val_mlm_acc: float | None = None  # an encoder's masked-token accuracy


def pretrain(cfg: TrainConfig, *, stop_after: int | None = None,
             step_hook: Callable[[int], None] | None = None, task_eval: Callable | None = None) -> TrainResult:
    """Run (or resume) a pretraining run as described by `cfg`; see the module docstring.

    Args:
        cfg: the run's settings.
        stop_after: behave as if interrupted once this step is done (checkpoint, then
            return with `interrupted=True`); the schedule still follows `cfg.max_steps`.
        step_hook: called with the step index inside each training step (`loop.fit`).
        task_eval: `task_eval(model, tokenizer) -> {name: score}`, merged into each
            evaluation's record: what `cfg.eval_task` asks for, built by the evaluation
            layer (`evaluation.watch.pretrain_watching`).
    """
    if cfg.eval_task and task_eval is None:
        raise UserError("--eval-task needs the task evaluator: call evaluation.watch.pretrain_watching(cfg) "
                        "(as llmscratch pretrain does) instead of train.pretrain(cfg)")
    if objective_of(cfg) == "mlm":  # an encoder: masked-LM pretraining (train/mlm.py)
        if task_eval is not None:
            raise UserError("--eval-task scores a GPT's continuations; an encoder (masked LM) has none")
        out, fitted = pretrain_mlm(cfg, stop_after=stop_after)
        ev = fitted.last_eval
        return TrainResult(out, fitted.step, fitted.seen, ev.get("val_loss"), None, fitted.interrupted,
                           val_mlm_acc=ev.get("val_mlm_acc"))
    started = time.perf_counter()
    run = start_run(cfg, TrainConfig.RESUME_FIXED)
    rank, world, device, master, out, settings = run.rank, run.world, run.device, run.master, run.out, run.settings

    def load_data():
        if is_prepared_dir(cfg.data):  # token shards from `llmscratch prepare` (prepared.py)
            tokenizer, data = prepared_tokenizer(cfg, out, verify=master)
            model_cfg = GPTConfig.from_name(cfg.model, vocab_size=tokenizer.vocab_size, dropout=cfg.dropout,
                                            **cfg.model_overrides())
            return (tokenizer, model_cfg, *prepared_splits(data, cfg, model_cfg.context_length))
        documents = load_text(cfg.data, encoding_errors=cfg.encoding_errors, progress=cfg.progress and master)
        if cfg.resume and (out / "tokenizer.json").is_file():
            from ..tokenizer import load_tokenizer

            tokenizer = load_tokenizer(out / "tokenizer.json")
        else:
            tokenizer = build_tokenizer(cfg.tokenizer, documents)
        model_cfg = GPTConfig.from_name(cfg.model, vocab_size=tokenizer.vocab_size, dropout=cfg.dropout,
                                        **cfg.model_overrides())
        return (tokenizer, model_cfg, *prepare_data(cfg, tokenizer, model_cfg.context_length, documents))

    # Rank 0 downloads and tokenizes first (both write shared cache files); the others then
    # find everything cached.
    tokenizer, model_cfg, train_ids, val_ids, bytes_per_token = rank0_first(world, master, load_data)
    T = model_cfg.context_length
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    batches = LMBatches(BatchSampler(train_ids, cfg.batch_size, T, seed=cfg.seed), cfg.grad_accum, cfg.seq_len_warmup)

    run_info = {"train": settings, "tokenizer_file": "tokenizer.json"}
    model, amp = build_model(lambda: GPT(model_cfg), cfg, run, tokenizer, run_info)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    if master:
        print(f"model {cfg.model}: {model.num_params() / 1e6:.2f}M parameters, context {T}, vocab "
              f"{model_cfg.vocab_size} ({tokenizer.name}); train {len(train_ids):,} tokens, validation "
              f"{len(val_ids):,}; {batches.seen(1):,} tokens/step on {world} x {device}"
              f"{' with bf16 autocast' if amp else ''}")

    evaluate_fn = partial(evaluate_pretraining, val_ids=val_ids, bytes_per_token=bytes_per_token, cfg=cfg,
                          device=device, amp=amp, rank=rank, world=world, tokenizer=tokenizer,
                          task_eval=task_eval)
    budget = parse_duration(cfg.time_budget) if cfg.time_budget is not None else None
    loop = cfg.loop_settings(stop_after=stop_after, schedule=schedule_of(cfg), budget_s=budget, clock_start=started,
                             plot_title=f"{cfg.model} on {cfg.data}", desc="pretrain")
    result = fit(model, Objective(lm_train_loss, batches, evaluate_fn), loop, device=device, out=out,
                 settings=settings, rank=rank, world=world,
                 on_checkpoint=lambda step: save_model(model, out, tokenizer, extra=run_info),
                 on_schedule=settings.update, step_hook=step_hook)
    if budget is not None and master and not result.interrupted:
        ends = f" --decay-ends {settings['decay_ends']}" if settings.get("decay_ends") else ""
        tqdm.write(f"--time-budget {cfg.time_budget}: {result.step} steps in {time.perf_counter() - started:.1f} s, "
                   f"decay from step {settings.get('decay_start')}; saved in config.json, and --max-steps "
                   f"{result.step} --decay-start {settings.get('decay_start')}{ends} replays this run")
    ev = result.last_eval
    return TrainResult(out, result.step, result.seen, ev.get("val_loss"), ev.get("val_bpb"),
                       result.interrupted, ev.get("sample", ""))


def _sample(model: GPT, tokenizer, val_ids, n_tokens: int, device, seed: int) -> str:
    """A continuation of the first tokens of the validation text. Fixed prompt and seed, so
    samples from successive evaluations are comparable; the sampler's private generator
    leaves the training RNG (dropout) untouched, which exact resume depends on."""
    from ..decoding.engine import Engine
    from ..decoding.sampling import Sampling

    prompt = torch.tensor([[int(t) for t in val_ids[:8]]], dtype=torch.long, device=device)
    out = Engine(model).generate(prompt, n_tokens, Sampling(temperature=0.8, top_k=40, seed=seed))
    return tokenizer.decode(out[0].tolist())
