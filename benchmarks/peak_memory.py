"""Peak memory of a training step, each measured in a fresh process (`llmscratch bench
--what memory`): ours fp32, with activation checkpointing, under bf16 autocast, and
transformers fp32. Part of the harness (`harness.py`).

    python benchmarks/peak_memory.py IMPL PRESET B T AMP CKPT KERNELS   # one child run
"""

from __future__ import annotations

import time

import torch

from harness import hf_train_step, ours_train_step
from llmscratch.kernels import reuse_freed_memory
from llmscratch.models.gpt import GPTConfig


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    On Linux this is `VmHWM` of the process's own address space: `ru_maxrss` would also
    count the parent's peak, which a child started with fork + exec inherits."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux (bytes on macOS)


def _rss_child(impl: str, preset: str, B: int, T: int, amp: str, checkpointing: bool,
               kernels: bool = True) -> None:
    """Run inside a fresh process: two training steps, then print the peak RSS in MB."""
    reuse_freed_memory()  # as the CLI's training commands do

    dtype = torch.bfloat16 if amp == "bf16" else None
    cfg = GPTConfig.from_name(preset, context_length=max(T, 1))
    if impl == "llmscratch":
        step, _ = ours_train_step(cfg, B, T, dtype, checkpointing=checkpointing, kernels=kernels)
    else:
        step = hf_train_step(cfg, B, T, dtype)
    t0 = time.perf_counter()
    step()
    step()
    secs = (time.perf_counter() - t0) / 2
    print(f"RSS {peak_rss_mb():.1f} {B * T / secs:.1f}")


def peak_rss_train_step(impl: str, preset: str = "gpt2-124m", batch_size: int = 4, seq_len: int = 1024,
                        amp: str = "fp32", checkpointing: bool = False, kernels: bool = True) -> tuple[float, float]:
    """Peak resident memory (MB) and tokens/s of a training step, measured in a fresh
    process so earlier allocations do not count. `impl` is "llmscratch" or "transformers"."""
    import subprocess
    import sys

    cmd = [sys.executable, __file__, impl, preset, str(batch_size), str(seq_len), amp,
           "1" if checkpointing else "0", "1" if kernels else "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = [ln for ln in out.splitlines() if ln.startswith("RSS ")][-1]
    rss, tps = line.split()[1:]
    return float(rss), float(tps)


def bench_memory(preset: str = "gpt2-124m", batch_size: int = 4, seq_len: int = 1024,
                 peers: bool = True, kernels: bool = True) -> list[dict]:
    """Peak RSS of a training step: ours fp32, ours with activation checkpointing, ours bf16
    autocast, and transformers fp32."""
    runs = [("llmscratch", "fp32", False), ("llmscratch", "fp32", True), ("llmscratch", "bf16", False)]
    if peers:
        runs.append(("transformers", "fp32", False))
    rows = []
    for impl, amp, ckpt in runs:
        try:
            rss, tps = peak_rss_train_step(impl, preset, batch_size, seq_len, amp, ckpt, kernels)
        except Exception as e:  # a missing peer or an out-of-memory child: report, go on
            print(f"  {impl} {amp}: failed ({e})")
            continue
        name = f"{impl} {amp}" + (" + activation checkpointing" if ckpt else "")
        rows.append({"shape": f"{preset} {batch_size}x{seq_len}", "impl": name, "peak_rss_mb": rss,
                     "tokens_per_s": tps})
    return rows


if __name__ == "__main__":  # the child process of peak_rss_train_step
    import sys

    _impl, _preset, _b, _t, _amp, _ckpt, _kern = sys.argv[1:8]
    _rss_child(_impl, _preset, int(_b), int(_t), _amp, _ckpt == "1", _kern == "1")
