"""Pretraining: the loop that turns a corpus into a foundation model.

`pretrain(TrainConfig(...))` is the whole job, in plain functions (litgpt style):

    setup (tokenizer, data, model, optimizer, maybe resume)
      -> fit: for each step: micro-batches -> backward -> clip -> AdamW step
              every eval_every steps: validation loss/perplexity/bits-per-byte, a sample,
              metrics.jsonl, loss.png and a checkpoint
      -> final checkpoint

Exact resume. The learning rate is a pure function of the step (`get_lr`), batches are a
pure function of (seed, step) (`BatchSampler`), and the checkpoint holds the weights, the
optimizer's moments, the step and the RNG state (for dropout). So a run stopped at step 10
and resumed to 20 ends with the weights of an uninterrupted 20-step run.

Checkpoints. `train_state.safetensors` is one self-contained file (weights, optimizer,
RNG, step, metadata) written atomically, so a kill at any moment leaves the previous good
checkpoint; `model.safetensors` beside it holds just the weights, for inference.

Distributed. Launched by `torchrun`, each process takes its slice of every global batch
(gloo on CPU, NCCL on CUDA) and DDP averages the gradients, so N processes follow the
same loss trajectory as one process with the same global batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .checkpoint import model_state, save_model, save_safetensors
from .data import BatchSampler, iter_eval_batches, load_bin, split_train_val, tokenize_to_bin
from .datasets import cache_root, load_text
from .errors import UserError
from .model import GPT, GPTConfig, fused_lm_loss, lm_loss
from .utils import atomic_write, pick_device, seed_everything, write_json


def _opt(default, help: str, **kw):
    """A dataclass field carrying its --help text (the CLI builds its flags from these)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a pretraining run needs. Each field is also a `llmscratch pretrain` flag."""

    data: str = _opt("python-docs", "dataset name, text file, or folder of .txt files")
    model: str = _opt("small", "model preset to train from scratch")
    out: str = _opt("runs/pretrain", "run folder for config, weights, tokenizer, state, metrics, plot")
    tokenizer: str = _opt("bpe:8192", "bpe:VOCAB (train a byte-level BPE on the data), gpt2, or a tokenizer.json")
    max_steps: int = _opt(240, "optimizer steps to train for")
    batch_size: int = _opt(16, "sequences per optimizer step (global, all processes together)")
    grad_accum: int = _opt(1, "micro-batches per step; each micro-batch has batch_size sequences")
    context_length: int | None = _opt(None, "tokens per sequence (default: the preset's)")
    dropout: float = _opt(0.1, "dropout on embeddings, attention and residual branches")
    lr: float = _opt(1e-3, "peak learning rate")
    min_lr_ratio: float = _opt(0.1, "cosine decay floor, as a fraction of lr")
    warmup_steps: int = _opt(50, "linear warmup steps")
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices only, not biases/norms)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 = off)")
    eval_every: int = _opt(40, "evaluate, sample and checkpoint every N steps")
    eval_batches: int = _opt(20, "validation batches per evaluation")
    val_fraction: float = _opt(0.1, "share of the tokens held out for validation (the tail)")
    sample_tokens: int = _opt(60, "tokens generated at each evaluation (0 = none)")
    seed: int = _opt(1337, "seed for init, data order and dropout")
    device: str = _opt("auto", "cpu, cuda, cuda:N, mps or auto")
    precision: str = _opt("auto", "fp32, bf16 (autocast, fp32 master weights) or auto",
                          choices=("auto", "fp32", "bf16"))
    compile: bool = _opt(False, "torch.compile the model")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward: less memory, slower")
    encoding_errors: str = _opt("strict", "undecodable bytes in local text: strict, replace or ignore",
                                choices=("strict", "replace", "ignore"))
    resume: bool = _opt(False, "continue the run in --out from its last checkpoint")
    progress: bool = _opt(True, "show a progress bar")

    def validate(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batches")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.context_length is not None and self.context_length <= 0:
            raise UserError(f"--context-length must be positive, got {self.context_length}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.warmup_steps < 0:
            raise UserError("--warmup-steps must be >= 0")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UserError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")

    # Changing these between a run and its resume would silently train something else.
    RESUME_FIXED = ("data", "model", "tokenizer", "batch_size", "grad_accum", "context_length",
                    "dropout", "seed", "val_fraction")


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `cfg.lr`, then cosine decay to `cfg.lr * cfg.min_lr_ratio` at max_steps."""
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW with weight decay on matrices only: decaying biases and LayerNorm gains toward
    zero only hurts. The fused kernel is used where the device has one."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")  # PyTorch has fused AdamW for both
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain fp32."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        # bf16 is a win on CPUs with native bf16 dot products (AVX512-BF16, AMX); elsewhere
        # it is emulated and slower than fp32.
        ok = torch.backends.mkldnn.is_available() and (
            getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
            or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        )
    else:
        ok = device.type == "mps" and precision == "bf16"
    if not ok and precision == "bf16":
        raise UserError(f"--precision bf16 is not supported on {device}; use fp32")
    return torch.bfloat16 if ok else None


# ------------------------------------------------------------------------------ data


def build_tokenizer(spec: str, documents):
    """The run's tokenizer: GPT-2's, a BPE trained on the data (`bpe:4096`), or a file."""
    from .tokenizer import BPETokenizer, get_tokenizer

    if spec.startswith("bpe:"):
        try:
            vocab = int(spec[4:])
        except ValueError:
            raise UserError(f"--tokenizer {spec!r}: expected bpe:VOCAB_SIZE, e.g. bpe:4096") from None
        if vocab < 257:
            raise UserError(f"--tokenizer {spec}: a byte-level BPE needs a vocabulary of at least 257")
        tok = BPETokenizer()
        tok.train("\n\n".join(d.text for d in documents), vocab, special_tokens=("<|endoftext|>",))
        return tok
    return get_tokenizer(spec)


def prepare_data(cfg: TrainConfig, tokenizer, context_length: int, documents):
    """Tokenize (once, cached by content) and split into a training head and validation tail.

    Returns:
        `(train_ids, val_ids, bytes_per_token)`; the last turns nats/token into bits/byte.
    """
    n_bytes = sum(len(d.text.encode("utf-8")) for d in documents)
    bin_path = tokenize_to_bin(documents, tokenizer, cache_root() / "tokens", source=str(cfg.data),
                               progress=cfg.progress)
    ids = load_bin(bin_path)
    if len(ids) < 2 * (context_length + 1):
        raise UserError(
            f"--data {cfg.data}: the corpus has {len(ids):,} tokens, too short for --context-length "
            f"{context_length} (need at least {2 * (context_length + 1):,} for a training and a "
            "validation window); use more text or a shorter context"
        )
    train_ids, val_ids = split_train_val(ids, cfg.val_fraction, context_length)
    return train_ids, val_ids, n_bytes / len(ids)


# ------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: GPT, val_ids, batch_size: int, context_length: int, max_batches: int | None,
             device: torch.device, amp: torch.dtype | None = None, rank: int = 0,
             world_size: int = 1) -> float:
    """Mean next-token loss (nats/token) over the first `max_batches` validation batches."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, token count)
    ctx = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
    for x, y in iter_eval_batches(val_ids, batch_size, context_length, max_batches,
                                  rank=rank, world_size=world_size):
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


# ------------------------------------------------------------------------ checkpoints


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"rng.cuda.{i}"] = s
    return state


def _set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def save_train_state(out: Path, model: GPT, optimizer, step: int, tokens_seen: int) -> None:
    """One self-contained, atomically written resume file: weights, AdamW moments, RNG, step."""
    tensors = {f"model.{k}": v for k, v in model_state(model).items()}
    opt_sd = optimizer.state_dict()
    for idx, st in opt_sd["state"].items():
        for key, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{idx}.{key}"] = t.detach().to("cpu").contiguous()
    tensors.update(_rng_state())
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
              for g in opt_sd["param_groups"]]
    meta = {"step": str(step), "tokens_seen": str(tokens_seen), "param_groups": json.dumps(groups)}
    save_safetensors(tensors, out / "train_state.safetensors", metadata=meta)


def load_train_state(out: Path, model: GPT, optimizer) -> tuple[int, int]:
    """Restore what `save_train_state` wrote. Returns `(step, tokens_seen)`."""
    from safetensors import safe_open

    path = out / "train_state.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if model.config.tie_weights:
        weights["lm_head.weight"] = weights["wte.weight"]
    model.load_state_dict(weights)
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    _set_rng_state(tensors)
    return int(meta["step"]), int(meta["tokens_seen"])


def _write_metrics_line(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> list[dict]:
    """Keep only records up to `step` (a resumed run will log the later steps again)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if rec.get("step", 0) <= step:
            records.append(rec)
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def plot_losses(records: list[dict], path: Path, title: str = "") -> None:
    """Train and validation loss against tokens seen, saved atomically as a PNG."""
    # A bare Figure, not pyplot: no GUI backend needed, and a notebook's inline backend
    # is left alone.
    from matplotlib.figure import Figure

    train = [(r["tokens"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.8, linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=2)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title or "pretraining loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")


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


class _StopFlag:
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


def _dist_setup(device_arg: str):
    """(rank, world_size, device) — initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, pick_device(device_arg)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_arg)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _rank0_first(world: int, master: bool, fn):
    """`fn()` on rank 0 first, then on the other ranks. A UserError on rank 0 is sent to
    every rank and raised there too, so no process is left waiting for the others."""
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


def pretrain(cfg: TrainConfig, *, stop_after: int | None = None) -> TrainResult:
    """Run (or resume) a pretraining run as described by `cfg`; see the module docstring.

    Args:
        cfg: the run's settings.
        stop_after: behave as if interrupted once this step is done (checkpoint, then
            return with `interrupted=True`); the schedule still follows `cfg.max_steps`.
    """
    cfg.validate()
    rank, world, device = _dist_setup(cfg.device)
    master = rank == 0
    out = Path(cfg.out)
    state_file = out / "train_state.safetensors"

    if cfg.resume:
        if not state_file.is_file():
            raise UserError(f"--resume: {out} holds no checkpoint (train_state.safetensors)")
        _check_resume_compatible(out, cfg)
    elif state_file.exists():
        raise UserError(f"{out} already holds a run; pass --resume to continue it, or pick another --out")

    seed_everything(cfg.seed)

    def load_data():
        documents = load_text(cfg.data, encoding_errors=cfg.encoding_errors, progress=cfg.progress and master)
        if cfg.resume and (out / "tokenizer.json").is_file():
            from .tokenizer import load_tokenizer

            tokenizer = load_tokenizer(out / "tokenizer.json")
        else:
            tokenizer = build_tokenizer(cfg.tokenizer, documents)
        overrides = {"vocab_size": tokenizer.vocab_size, "dropout": cfg.dropout}
        if cfg.context_length:
            overrides["context_length"] = cfg.context_length
        model_cfg = GPTConfig.from_name(cfg.model, **overrides)
        return (tokenizer, model_cfg, *prepare_data(cfg, tokenizer, model_cfg.context_length, documents))

    # Rank 0 downloads and tokenizes first (both write shared cache files); the others then
    # find everything cached.
    tokenizer, model_cfg, train_ids, val_ids, bytes_per_token = _rank0_first(world, master, load_data)
    T = model_cfg.context_length
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    sampler = BatchSampler(train_ids, cfg.batch_size, T, seed=cfg.seed)

    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg).to(device)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    optimizer = configure_optimizer(model, cfg, device)
    step, tokens_seen = 0, 0
    if cfg.resume:
        step, tokens_seen = load_train_state(out, model, optimizer)
        records = _truncate_metrics(out / "metrics.jsonl", step) if master else []
    else:
        records = []
        if master:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
            save_model(model, out, tokenizer, extra=_run_info(cfg))
    amp = autocast_dtype(cfg.precision, device)

    fwd_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        fwd_model = torch.compile(fwd_model)

    tokens_per_step = cfg.batch_size * cfg.grad_accum * T
    if master:
        n = model.num_params()
        print(f"model {cfg.model}: {n / 1e6:.2f}M parameters, context {T}, vocab {model_cfg.vocab_size} "
              f"({tokenizer.name}); train {len(train_ids):,} tokens, validation {len(val_ids):,}; "
              f"{tokens_per_step:,} tokens/step on {world} x {device}"
              f"{' with bf16 autocast' if amp else ''}")

    def run_eval() -> dict:
        loss = evaluate(model, val_ids, cfg.batch_size, T, cfg.eval_batches, device, amp, rank, world)
        return metrics_from_loss(loss, bytes_per_token)

    def checkpoint(step: int) -> None:
        if master:
            save_train_state(out, model, optimizer, step, tokens_seen)
            save_model(model, out, tokenizer, extra=_run_info(cfg))

    ctx = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
    result_eval: dict = {}
    sample_text = ""
    interrupted = False
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (cfg.progress and master),
               desc="pretrain", unit="step", dynamic_ncols=True)
    t_last, tok_last = time.perf_counter(), tokens_seen
    model.train()
    with _StopFlag() as stop:
        while step < cfg.max_steps:
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                x, y = sampler.get_batch(step * cfg.grad_accum + micro, rank, world, device=device)
                # only the last micro-batch all-reduces gradients under DDP
                sync = nullcontext() if world == 1 or micro == cfg.grad_accum - 1 else fwd_model.no_sync()
                with sync:
                    with ctx:
                        hidden = fwd_model(x, return_hidden=True)
                        # head + cross-entropy chunk by chunk: the full (B*T, vocab) logits
                        # are never stored (see model.fused_lm_loss)
                        loss = fused_lm_loss(hidden, model.lm_head.weight, y) / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step

            if world > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= world
            train_loss = loss_sum.item()
            if not math.isfinite(train_loss):
                raise UserError(f"loss became {train_loss} at step {step}; lower --lr "
                                "(the last checkpoint on disk is intact)")
            now = time.perf_counter()
            tps = (tokens_seen - tok_last) / max(now - t_last, 1e-9)
            t_last, tok_last = now, tokens_seen
            rec = {"step": step, "tokens": tokens_seen, "train_loss": train_loss, "lr": lr,
                   "tokens_per_s": tps}
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")

            stop_now = stop.set or step == stop_after
            if world > 1:  # every rank must agree to stop at the same step
                flag = torch.tensor([int(stop_now)], device=device)
                dist.all_reduce(flag)
                stop_now = bool(flag.item())
            last = step == cfg.max_steps
            if step % cfg.eval_every == 0 or last or stop_now:
                result_eval = run_eval()
                rec.update(result_eval)
                if master and cfg.sample_tokens > 0:
                    sample_text = _sample(model, tokenizer, val_ids, cfg.sample_tokens, device, cfg.seed)
                    bar.write(f"step {step}: val loss {result_eval['val_loss']:.3f}, "
                              f"ppl {result_eval['val_ppl']:.1f}, {result_eval['val_bpb']:.3f} bits/byte"
                              f" | sample: {sample_text[:100]!r}")
            if master:
                records.append(rec)
                _write_metrics_line(out / "metrics.jsonl", rec)
            if step % cfg.eval_every == 0 or last or stop_now:
                checkpoint(step)
                if master:
                    plot_losses(records, out / "loss.png", f"{cfg.model} on {cfg.data}")
            if stop_now:
                interrupted = True
                break
    bar.close()
    if world > 1:
        dist.barrier()
    return TrainResult(out, step, tokens_seen, result_eval.get("val_loss"), result_eval.get("val_bpb"),
                       interrupted, sample_text)


def _run_info(cfg: TrainConfig) -> dict:
    return {"train": dataclasses.asdict(cfg), "tokenizer_file": "tokenizer.json"}


def _check_resume_compatible(out: Path, cfg: TrainConfig) -> None:
    from .checkpoint import read_run_config

    saved = read_run_config(out).get("train", {})
    now = dataclasses.asdict(cfg)
    diff = [f"{k} ({saved.get(k)!r} -> {now[k]!r})" for k in TrainConfig.RESUME_FIXED
            if k in saved and saved[k] != now[k]]
    if diff:
        raise UserError(f"--resume: the run in {out} was started with different settings: "
                        + ", ".join(diff))


def _sample(model: GPT, tokenizer, val_ids, n_tokens: int, device, seed: int) -> str:
    """A continuation of the first tokens of the validation text. Fixed prompt and seed, so
    samples from successive evaluations are comparable; the sampler's private generator
    leaves the training RNG (dropout) untouched, which exact resume depends on."""
    from .generate import generate

    prompt = torch.tensor([[int(t) for t in val_ids[:8]]], dtype=torch.long, device=device)
    out = generate(model, prompt, n_tokens, temperature=0.8, top_k=40, seed=seed)
    return tokenizer.decode(out[0].tolist())
