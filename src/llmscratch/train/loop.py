"""The one training loop: every objective (pretraining, classification, instruction tuning,
and the next ones) is trained by `fit`.

An objective is three small things (`Objective`):

- `loss(model, batch) -> scalar tensor`: a module-level function. The loop calls it under
  autocast and backpropagates it; `model` is the plain model (never a DDP wrapper).
- `batches`: a `BatchSource`, whose batch for (step, micro-batch, rank) is a pure function
  of those numbers. The step is therefore the whole position in the data, and resuming at
  step s needs nothing else.
- `evaluate(model) -> dict` (optional): validation metrics, called in eval mode, without
  gradients and under autocast, every `eval_every` steps, at the end, and when stopped.
- `metrics() -> dict` (optional): the objective's own numbers for the step just done
  (GRPO's mean reward, KL, clip fraction), added to that step's record.

A new objective (masked LM, DPO, ...) is a loss function and a batch source; the loop does
the rest once for all: AdamW (fused where PyTorch has it) with weight decay on matrices
only, linear warmup then cosine or warmup-stable-decay (`get_lr`; a time budget drives the
latter by the clock, `budget.py`), gradient accumulation, gradient clipping, bf16 autocast,
DDP or FSDP2 (`sharding.py`, sharded checkpoints) under torchrun, atomic checkpoints with
exact resume (`state.py`), Ctrl-C/SIGTERM that finish the step and checkpoint,
`metrics.jsonl` (with MFU, `mfu.py`; TensorBoard too with `logger`) and a loss plot.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

from ..checkpoints.run import is_run_dir
from ..checkpoints.sharded import consolidate, remove_stale
from ..errors import UserError
from ..utils import pick_device, progress_bar, remove_stale_temporaries
from .budget import ClockSchedule, format_decay_ends
from .config import get_lr, parse_decay_ends
from .mfu import device_peak_flops, mfu, open_tracker
from .plots import plot_losses
from .settings import LoopSettings
from .sharding import load_sharded, local_bytes, require_launcher, save_sharded, shard_model
from .state import METRICS_FILE, append_metrics, load_train_state, read_metrics, save_train_state


class BatchSource(Protocol):
    """Where an objective's batches come from; the position in it is the step alone."""

    unit: str
    """what `seen` counts: "tokens" or "examples" (the x axis of the loss plot)"""

    def get(self, step: int, micro: int, rank: int, world: int, device: torch.device) -> Any:
        """This rank's share of micro-batch `micro` of optimizer step `step`, on `device`."""

    def seen(self, step: int) -> int:
        """Tokens or examples consumed by all ranks in steps `0 .. step - 1`."""

    def epoch_of(self, step: int) -> float:
        """Passes over the training data done at the start of `step`."""


@dataclass
class Objective:
    """What `fit` trains: a loss, the batches it is computed on, and how to evaluate."""

    loss: Callable[[torch.nn.Module, Any], torch.Tensor]
    """module-level `loss(model, batch) -> scalar`, e.g. `pretrain.lm_train_loss`"""
    batches: BatchSource
    """the training batches, indexed by step (see `BatchSource`)"""
    evaluate: Callable[[torch.nn.Module], dict] | None = None
    """`evaluate(model) -> {"val_loss": ..., ...}`; float values are logged, strings printed"""
    metrics: Callable[[], dict] | None = None
    """`metrics() -> {name: number}` after every step, merged into its record (e.g. GRPO's
    mean reward); called on every rank, so it may all-reduce"""


@dataclass
class FitResult:
    step: int
    """optimizer steps done (including those before a resume)"""
    seen: int
    """tokens or examples trained on (the source's `unit`)"""
    records: list[dict] = field(default_factory=list)
    """the metrics records, one per step (rank 0 only); eval steps carry the eval metrics"""
    interrupted: bool = False
    """Ctrl-C, SIGTERM or `stop_after` ended the run before `cfg.max_steps`"""
    last_eval: dict = field(default_factory=dict)
    """the metrics of the last evaluation"""
    shard_bytes: dict = field(default_factory=dict)
    """under FSDP: the bytes this process holds (`sharding.local_bytes`) after its first step"""


# ------------------------------------------------------------------------------ setup


def configure_optimizer(model: torch.nn.Module, cfg: LoopSettings, device: torch.device):
    """AdamW over the parameters that require grad, weight decay on matrices only: decaying
    biases and LayerNorm gains toward zero only hurts. The fused kernel is used where the
    device has one. Reads `cfg.lr`, `weight_decay`, `beta1`, `beta2` and `optimizer`:
    "muon" gives the blocks' weight matrices Muon (`muon.py`)."""
    if cfg.optimizer == "muon":
        from .muon import Muon, muon_param_groups

        return Muon(muon_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")  # PyTorch has fused AdamW for both
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products natively (AVX512-BF16 or AMX)."""
    return torch.backends.mkldnn.is_available() and (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain fp32."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        # bf16 is a win on CPUs with native bf16 dot products; elsewhere it is emulated
        # and slower than fp32.
        ok = cpu_has_native_bf16()
    else:
        ok = device.type == "mps" and precision == "bf16"
    if not ok and precision == "bf16":
        raise UserError(f"--precision bf16 is not supported on {device}; use fp32")
    return torch.bfloat16 if ok else None


def distributed_setup(device_arg: str, strategy: str = "ddp") -> tuple[int, int, torch.device]:
    """`(rank, world_size, device)`; initialises torch.distributed under torchrun (gloo on
    CPU, NCCL on CUDA), also for one process with `strategy="fsdp"` (UserError without
    torchrun). On CUDA, float32 matmuls may use TF32 (what bf16 autocast leaves in fp32)."""
    require_launcher(strategy)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and strategy != "fsdp":
        return 0, 1, pick_device(device_arg)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_arg)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def rank0_first(world: int, master: bool, fn: Callable):
    """`fn()` on rank 0 first, then on the other ranks (rank 0 fills shared caches). A
    UserError on rank 0 is sent to every rank and raised there too, so no process is left
    waiting for the others."""
    if world == 1:
        return fn()
    if master:
        try:
            result, error = fn(), None
        except UserError as e:
            result, error = None, str(e)
        dist.broadcast_object_list([error], src=0)
        if error is not None:
            raise UserError(error)
        return result
    box = [None]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise UserError(box[0])
    return fn()


def flash_attention_first(device: torch.device):
    """On CUDA, SDPA tries FlashAttention first (then memory-efficient, cuDNN, math): the
    attention calls SDPA causal and unmasked, which flash serves for bf16 and fp16. Elsewhere
    (and on a PyTorch without backend priorities) a no-op."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
             SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # PyTorch < 2.6: no priorities, its own order (flash first) applies
        return nullcontext()


class StopFlag:
    """Ctrl-C and SIGTERM set a flag; the loop finishes its step, saves, and stops. A second
    Ctrl-C raises at once (the last checkpoint on disk stays intact)."""

    def __init__(self):
        self.set = False
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class _LossModule(torch.nn.Module):
    """`loss(model, batch)` as a module's forward, so that DDP (which syncs gradients of
    what runs inside its forward) and torch.compile see the whole loss computation."""

    def __init__(self, model: torch.nn.Module, loss: Callable):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch):
        return self.loss(self.model, batch)


# ------------------------------------------------------------------------------- fit


def fit(model: torch.nn.Module, objective: Objective, cfg: LoopSettings, *, device: torch.device,
        out: Path | None = None, settings: dict | None = None, rank: int = 0, world: int = 1,
        on_checkpoint: Callable[[int], None] | None = None,
        on_schedule: Callable[[dict], None] | None = None,
        step_hook: Callable[[int], None] | None = None) -> FitResult:
    """Train the parameters of `model` that require grad on `objective` for `cfg.max_steps`.

    Args:
        model: on `device`, built (and seeded) the same way for a fresh run and a resume.
        objective: loss, batches and evaluation (see the module docstring).
        cfg: the schedule, optimizer, precision, evaluation interval, resume, stop and
            display settings (`LoopSettings`, e.g. from `TrainConfig.loop_settings()`). With
            `cfg.budget_s` (a time budget) the wsd schedule follows the clock (`budget.py`):
            `max_steps`, `decay_start` and `decay_ends` are re-estimated after every step and
            passed to `on_schedule` (rank 0) whenever they change.
        out: the run folder for `train_state.safetensors`, `metrics.jsonl` and `loss.png`;
            None keeps everything in memory (no checkpoints, no resume).
        settings: stored in the checkpoint, for `state.check_resume`.
        rank, world: this process and the process count (`distributed_setup`).
        on_checkpoint: called on rank 0 after each checkpoint with the step (e.g. to
            write the inference weights beside it). Under `cfg.strategy == "fsdp"` the
            loop writes a run folder's `model.safetensors` itself, from the sharded
            checkpoint (`checkpoints.sharded.consolidate`), and does not call it.
        on_schedule: called on rank 0 with `{"max_steps", "decay_start", "decay_ends"}` when
            a time budget moves them (to save them with the run).
        step_hook: called with the step index inside each timed training step, after the
            optimizer step (tests use it to slow the machine down).

    Returns:
        A `FitResult`; the model holds the weights of the last finished step.
    """
    master = rank == 0
    sharded = cfg.strategy == "fsdp"
    if sharded and not dist.is_initialized():
        raise UserError("--strategy fsdp needs torch.distributed set up (run under torchrun)")
    if master and out is not None and out.is_dir():
        remove_stale_temporaries(out)  # left by a process killed in the middle of a write
        remove_stale(out)
    batches = objective.batches
    amp = autocast_dtype(cfg.precision, device)
    ctx = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
    # MFU: the model's training FLOPs per token (6N + attention) over the device's peak
    flops = model.flops_per_token() if batches.unit == "tokens" and hasattr(model, "flops_per_token") else None
    peak = device_peak_flops(device, amp) if flops else None
    if sharded:
        shard_model(model, device, amp)  # before the optimizer: it holds the sharded parameters
    optimizer = configure_optimizer(model, cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    metrics_path = out / METRICS_FILE if out is not None else None
    step, seen = 0, 0
    records: list[dict] = []
    if cfg.resume:
        step, seen = (load_sharded if sharded else load_train_state)(out, model, optimizer)
        if master:
            records = read_metrics(metrics_path, step)
            print(f"resuming from step {step} of {cfg.max_steps}", flush=True)
    elif master and out is not None:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.unlink(missing_ok=True)
    tracker = open_tracker(cfg.logger, out, step) if master else None
    shard_bytes: dict = {}

    fwd = _LossModule(model, objective.loss)
    if world > 1 and not sharded:
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd = DDP(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        fwd = torch.compile(fwd)

    def evaluate() -> dict:
        model.eval()
        with torch.no_grad(), ctx:
            result = objective.evaluate(model)
        model.train()
        return result

    def checkpoint(step: int) -> None:
        if out is None:
            return
        if sharded:  # every process writes its shard
            save_sharded(out, model, optimizer, step, seen, settings, rank, world)
        if master:
            if not sharded:
                save_train_state(out, model, optimizer, step, seen, settings)
                if on_checkpoint is not None:
                    on_checkpoint(step)
            elif is_run_dir(out):  # the inference weights, read back from the shards on disk
                consolidate(out)
            plot_losses(records, out / "loss.png", cfg.plot_title, x=batches.unit)

    clock_start = cfg.clock_start if cfg.clock_start is not None else time.perf_counter()
    # a resumed run's clock goes on from the elapsed time of its last step
    offset = records[-1].get("elapsed_s", 0.0) if records else 0.0
    clock = None
    if cfg.budget_s is not None:
        if world > 1:  # rank 0's records carry the offset
            box = [offset]
            dist.broadcast_object_list(box, src=0)
            offset = box[0]
        clock = ClockSchedule(clock_start + cfg.budget_s - offset, cfg.budget_s, cfg.decay_fraction,
                              cfg.eval_every, cfg.eval_batches, cfg.grad_accum, cfg.decay_start,
                              parse_decay_ends(cfg.decay_ends))
        # until the clock starts the decay, no step count and no decay start are known
        cfg = dataclasses.replace(cfg, schedule="wsd", max_steps=max(cfg.max_steps, step + 1) if cfg.resume else 10**9,
                                  decay_start=NOT_YET if cfg.decay_start is None else cfg.decay_start)
    last_eval: dict = {}
    interrupted = False
    # under a time budget the total is not known until the clock starts the decay
    bar = progress_bar(total=None if clock else cfg.max_steps, initial=step, disable=not (cfg.progress and master),
                       desc=cfg.desc, unit="step", dynamic_ncols=True)
    t_last, seen_last = time.perf_counter(), seen
    model.train()
    with StopFlag() as stop, flash_attention_first(device):
        while step < cfg.max_steps:
            t_step = time.perf_counter()
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                batch = batches.get(step, micro, rank, world, device)
                # only the last micro-batch all-reduces gradients under DDP (FSDP
                # reduce-scatters every micro-batch's: the gradients stay sharded)
                sync = nullcontext() if world == 1 or sharded or micro == cfg.grad_accum - 1 else fwd.no_sync()
                with sync:
                    with ctx:
                        loss = fwd(batch) / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            if sharded and not shard_bytes:
                shard_bytes = local_bytes(model, optimizer)
                b = shard_bytes  # every rank says what it holds
                bar.write(f"fsdp rank {rank}/{world} holds params {b['params']:,} B, grads {b['grads']:,} B, "
                           f"optimizer state {b['optimizer']:,} B (the whole model's params: {b['full_params']:,} B)")
            optimizer.zero_grad(set_to_none=True)
            if step_hook is not None:
                step_hook(step)
            step += 1
            seen = batches.seen(step)

            if world > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= world
            train_loss = loss_sum.item()
            if not math.isfinite(train_loss):
                raise UserError(f"loss became {train_loss} at step {step}; lower --lr "
                                "(the last checkpoint on disk is intact)")
            now = time.perf_counter()
            rate = (seen - seen_last) / max(now - t_last, 1e-9)
            t_last, seen_last = now, seen
            rec = {"step": step, batches.unit: seen, "train_loss": train_loss, "lr": lr,
                   f"{batches.unit}_per_s": rate, "elapsed_s": round(offset + now - clock_start, 3)}
            if objective.metrics is not None:
                rec.update(objective.metrics())
            if peak:
                rec["mfu"] = mfu(flops, rate, peak, world)
            if clock is not None:
                cfg = _follow_clock(clock, cfg, step, now - t_step, now, master, world, on_schedule)
                bar.total = cfg.max_steps
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", **{f"{batches.unit[:3]}_s": f"{rate:,.0f}"},
                            **({"mfu": f"{rec['mfu']:.1%}"} if "mfu" in rec else {}))

            stop_now = stop.set or step == cfg.stop_after
            if world > 1:  # every rank must agree to stop at the same step
                flag = torch.tensor([int(stop_now)], device=device)
                dist.all_reduce(flag)
                stop_now = bool(flag.item())
            boundary = step % cfg.eval_every == 0 or step == cfg.max_steps or stop_now
            t_boundary = time.perf_counter()
            if boundary and objective.evaluate is not None:
                last_eval = evaluate()
                numbers = {k: v for k, v in last_eval.items() if isinstance(v, (int, float))}
                rec.update(numbers, epoch=round(batches.epoch_of(step), 4))
                if master:
                    shown = ", ".join(f"{k} {v:.4f}" for k, v in numbers.items())
                    texts = "".join(f" | {k}: {v[:100]!r}" for k, v in last_eval.items() if isinstance(v, str))
                    bar.write(f"step {step}: {shown}{texts}")
            if master:
                records.append(rec)
                if metrics_path is not None:
                    append_metrics(metrics_path, rec)
                if tracker is not None:
                    tracker.log(rec)
            if boundary:
                checkpoint(step)
                if clock is not None:  # timed apart from the steps
                    clock.aside(time.perf_counter() - t_boundary)
            if stop_now:
                interrupted = True
                break
    bar.close()
    if tracker is not None:
        tracker.close()
    model.eval()
    if world > 1 or sharded:
        dist.barrier()
    return FitResult(step=step, seen=seen, records=records, interrupted=interrupted, last_eval=last_eval,
                     shard_bytes=shard_bytes)


NOT_YET = 10**9
"""`decay_start` while a time budget's decay has not started: no step reaches it"""


def _follow_clock(clock: ClockSchedule, cfg: LoopSettings, step: int, step_seconds: float, now: float,
                  master: bool, world: int, on_schedule: Callable[[dict], None] | None) -> LoopSettings:
    """`cfg` with the time budget's plan after `step` (rank 0's, sent to every process, so
    all take the same steps at the same learning rates); `on_schedule` hears of a change."""
    clock.step_done(step_seconds)
    plan = clock.plan(step, now, cfg.max_steps) if master else None
    if world > 1:
        box = [plan]
        dist.broadcast_object_list(box, src=0)
        plan = box[0]
    max_steps, start, ends = plan
    ends = format_decay_ends(ends) or None
    changed = (max_steps, start if start is not None else NOT_YET, ends)
    if changed == (cfg.max_steps, cfg.decay_start, cfg.decay_ends):
        return cfg
    if master and on_schedule is not None:
        on_schedule({"max_steps": max_steps, "decay_start": start, "decay_ends": ends})
    return dataclasses.replace(cfg, max_steps=max_steps, decay_start=changed[1], decay_ends=ends)
