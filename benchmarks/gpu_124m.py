"""GPT-2 124M training on one GPU: tokens/s and MFU for llmscratch and a nanoGPT-equivalent
reference, then 200 steps from token shards with an FSDP sharded checkpoint and a resume.

ONE prepared script for a GPU machine (`python benchmarks/gpu_124m.py`, ~5 minutes on an
H100), writing benchmarks/results/gpu_124m.json. On a CPU, `--smoke` runs the same code on
a tiny model for a few steps (the proof that the script works where no GPU is at hand).

1. Throughput. A training step (bf16 autocast, fused AdamW, grad clipping, torch.compile on
   for both) of gpt2-124m at micro-batch B x 1024, timed after warmup:
   - llmscratch: `GPT` with its kernels and its loss (`pretrain.lm_train_loss`), as
     `llmscratch pretrain` builds it;
   - reference: the same model as Hugging Face's `GPT2LMHeadModel` (SDPA attention), the
     standard nanoGPT-style step. nanoGPT's own `train.py` cannot be downloaded here; both
     are the same architecture and the same step, so the FLOPs per token are the same.
   MFU = flops_per_token (6N + 12·L·C·T) x tokens/s / the GPU's dense bf16 peak (`train/mfu.py`).
2. Shards, checkpoint, resume. Synthetic token shards (uint16, memory-mapped, written here,
   so the script stands alone; `llmscratch prepare`'s shards read the same way) feed
   `loop.fit` with `strategy="fsdp"` (a one-process group): 200 steps stopped at 100 with a
   sharded checkpoint, resumed to 200, against an uninterrupted 200-step run; the run
   folder's `model.safetensors` is consolidated from the shards.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from llmscratch.checkpoints.run import save_model
from llmscratch.data import BatchSampler
from llmscratch.kernels import apply_kernels
from llmscratch.models.gpt import GPT, GPTConfig
from llmscratch.train.loop import Objective, autocast_dtype, fit
from llmscratch.train.mfu import device_peak_flops, mfu
from llmscratch.train.pretrain import LMBatches, lm_train_loss
from llmscratch.train.settings import LoopSettings
from results import write_result  # benchmarks/results.py


def shapes(smoke: bool) -> dict:
    if smoke:
        return dict(model=dict(n_layer=2, n_head=4, n_embd=64, context_length=64, vocab_size=512), batch=4)
    return dict(model=dict(n_layer=12, n_head=12, n_embd=768, context_length=1024, vocab_size=50257), batch=16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, batch, device, warmup: int, steps: int) -> float:
    """Seconds per training step, the median of `steps` after `warmup` (compilation)."""
    for _ in range(warmup):
        step(batch)
    sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step(batch)
        sync(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def make_step(module, loss_of, params, amp, device, lr=6e-4):
    """One training step of `loss_of(batch)`: forward + backward under autocast, clip, AdamW."""
    optim = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                               {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                              lr=lr, betas=(0.9, 0.95), fused=device.type in ("cuda", "cpu"))
    ctx = torch.autocast(device.type, dtype=amp, enabled=amp is not None)

    def step(batch):
        with ctx:
            loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        return loss

    return step


def throughput(args, device, amp) -> list[dict]:
    sh = shapes(args.smoke)
    mc = sh["model"]
    B, T = sh["batch"], mc["context_length"]
    torch.manual_seed(0)
    x = torch.randint(0, mc["vocab_size"], (B, T + 1), device=device)
    batch = (x[:, :-1].contiguous(), x[:, 1:].contiguous())
    peak = device_peak_flops(device, amp)
    rows = []

    ours = GPT(GPTConfig(**mc, dropout=0.0)).to(device)
    apply_kernels(ours)
    flops = ours.flops_per_token()
    ours_fwd = torch.compile(ours) if args.compile else ours
    impls = [("llmscratch", make_step(ours, lambda b: lm_train_loss(ours_fwd, b), list(ours.parameters()), amp, device))]

    try:
        from transformers import GPT2Config, GPT2LMHeadModel

        hf = GPT2LMHeadModel(GPT2Config(n_layer=mc["n_layer"], n_head=mc["n_head"], n_embd=mc["n_embd"],
                                        n_positions=T, vocab_size=mc["vocab_size"], resid_pdrop=0.0,
                                        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
                                        bos_token_id=mc["vocab_size"] - 1, eos_token_id=mc["vocab_size"] - 1)).to(device)
        hf_fwd = torch.compile(hf) if args.compile else hf

        def hf_loss(b):  # next-token cross-entropy of (x, y), as nanoGPT's model computes it
            logits = hf_fwd(input_ids=b[0]).logits
            return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), b[1].view(-1))

        impls.append(("reference: transformers GPT2LMHeadModel (nanoGPT-equivalent step)",
                      make_step(hf, hf_loss, list(hf.parameters()), amp, device)))
    except ImportError:
        rows.append({"impl": "reference", "skipped": "transformers is not installed"})

    for name, step in impls:
        sec = time_steps(step, batch, device, args.warmup, args.steps)
        tps = B * T / sec
        row = {"impl": name, "step_seconds": sec, "tokens_per_s": tps, "flops_per_token": flops,
               "mfu": mfu(flops, tps, peak) if peak else None}
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        print(f"{name}: {tps:,.0f} tokens/s, {sec * 1e3:.1f} ms/step"
              + (f", MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""))
        rows.append(row)
    return rows


def write_shards(folder: Path, vocab: int, tokens: int, n_shards: int = 2) -> Path:
    """Synthetic uint16 token shards (a repeated random block: the loss can fall), and
    their concatenation as one memory-mapped file (what the sampler reads)."""
    rng = np.random.default_rng(0)
    block = rng.integers(0, vocab, 20_000, dtype=np.uint16)
    data = np.resize(block, tokens)
    for i, part in enumerate(np.array_split(data, n_shards)):
        part.tofile(folder / f"shard_{i:05d}.bin")
    joined = folder / "train.bin"
    with open(joined, "wb") as f:
        for i in range(n_shards):
            f.write((folder / f"shard_{i:05d}.bin").read_bytes())
    return joined


def sharded_run(args, device, amp, folder: Path) -> dict:
    """200 steps (smoke: 20) through `fit` with FSDP; stopped half way, resumed, compared."""
    sh = shapes(args.smoke)
    mc, B = sh["model"], sh["batch"]
    T = mc["context_length"]
    steps = 20 if args.smoke else 200
    shard = write_shards(folder, mc["vocab_size"], tokens=B * (T + 1) * (steps + 10))
    ids = np.memmap(shard, dtype=np.uint16, mode="r")
    batches = LMBatches(BatchSampler(ids, B, T, seed=0), grad_accum=1)

    def run(out: Path, resume: bool = False, stop_after: int | None = None):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**mc, dropout=0.0)).to(device)
        if not resume:
            save_model(model, out)  # a run folder: the loop consolidates model.safetensors into it
        loop = LoopSettings(max_steps=steps, warmup_steps=steps // 10, eval_every=steps // 2, lr=6e-4,
                            precision="bf16" if amp else "fp32", compile=args.compile, strategy="fsdp",
                            resume=resume, stop_after=stop_after, progress=False)
        t = time.perf_counter()
        result = fit(model, Objective(lm_train_loss, batches), loop, device=device, out=out, settings={})
        return result, time.perf_counter() - t

    full, t_full = run(folder / "uninterrupted")
    half, _ = run(folder / "resumed", stop_after=steps // 2)
    rest, _ = run(folder / "resumed", resume=True)
    loss_full = [r["train_loss"] for r in full.records]
    loss_resumed = [r["train_loss"] for r in rest.records]  # the whole metrics file, cut and continued
    ckpt = sorted((folder / "resumed" / "sharded").iterdir())
    return {"steps": steps, "micro_batch": B, "context": T, "shard_tokens": int(len(ids)),
            "wall_seconds_uninterrupted": t_full, "first_loss": loss_full[0], "last_loss": loss_full[-1],
            "stopped_at": half.step, "resumed_to": rest.step,
            "max_abs_loss_diff_resumed_vs_uninterrupted": float(np.max(np.abs(np.subtract(loss_full, loss_resumed)))),
            "checkpoint": [p.name for p in ckpt],
            "consolidated_model": (folder / "resumed" / "model.safetensors").is_file(),
            "mfu_last_step": full.records[-1].get("mfu")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps: proves the script on a CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager (default: torch.compile both)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10; smoke 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30; smoke 3)")
    p.add_argument("--json", help="write here instead of benchmarks/results/gpu_124m.json (smoke: gpu_124m_smoke.json)")
    args = p.parse_args()
    args.warmup = args.warmup if args.warmup is not None else (2 if args.smoke else 10)
    args.steps = args.steps if args.steps is not None else (3 if args.smoke else 30)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = autocast_dtype("auto", device)  # bf16 on a GPU that has it; fp32 on a CPU without native bf16
    rows = throughput(args, device, amp)

    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    addr = f"tcp://127.0.0.1:{port.getsockname()[1]}"
    port.close()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=addr, rank=0, world_size=1)
    try:
        with tempfile.TemporaryDirectory(prefix="gpu124m-") as tmp:
            resume = sharded_run(args, device, amp, Path(tmp))
    finally:
        dist.destroy_process_group()
    print(f"fsdp from shards: {resume['steps']} steps, loss {resume['first_loss']:.3f} -> {resume['last_loss']:.3f}; "
          f"stopped at {resume['stopped_at']}, resumed to {resume['resumed_to']}: max |loss diff| vs uninterrupted "
          f"{resume['max_abs_loss_diff_resumed_vs_uninterrupted']:.2e}")
    note = ("a GPU run" if device.type == "cuda" else
            "CPU smoke run of the script's logic on a 2-core machine shared with other sessions (under load): "
            "the figures are not throughput claims")
    write_result("gpu_124m_smoke" if args.smoke else "gpu_124m",
                 {"settings": vars(args), "precision": str(amp), "note": note, "throughput": rows,
                  "sharded_resume": resume, "omp_threads": os.environ.get("OMP_NUM_THREADS")}, args.json)


if __name__ == "__main__":
    main()
