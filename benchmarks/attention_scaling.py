"""Where the naive attention formula falls off: tokens/s and peak memory of one attention
layer (forward + backward) against context length, our fast path vs the written-out formula.

The fast path (`CausalSelfAttention`: fused QKV + `scaled_dot_product_attention`) never
stores the (T, T) attention matrix; the naive one (`MultiHeadAttention`: scores, mask,
softmax, dropout, weighted sum) stores several, per head, for backward. Two more lines
show bf16 autocast on the CPU: the blocked causal attention that training uses there
(`kernels.blocked_causal_attention`, which keeps the causal half of the weights) against
PyTorch's fused flash kernel, each forced at every length: training takes the blocked one
up to 1024 positions, where it stops winning.

    python benchmarks/attention_scaling.py                 # writes attention_scaling.png and results/attention_scaling.json
    python benchmarks/attention_scaling.py --lengths 256 512 1024 2048 4096

Each point runs in a fresh process, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmscratch.models.attention import CausalSelfAttention, MultiHeadAttention
from peak_memory import peak_rss_mb  # benchmarks/peak_memory.py, beside this script
from results import write_result  # benchmarks/results.py

IMPLS = ("fast (sdpa)", "naive formula", "bf16: blocked", "bf16: sdpa flash kernel")


def child(impl: str, T: int, n_embd: int, n_head: int, batch: int) -> None:
    from contextlib import nullcontext

    from llmscratch.kernels import blocked_attention

    torch.manual_seed(0)
    if impl == "naive formula":
        layer = MultiHeadAttention(n_embd, n_embd, T, n_head, qkv_bias=True)
    else:
        layer = blocked_attention.BlockedCausalSelfAttention.from_attention(CausalSelfAttention(n_embd, n_head))
    if impl.startswith("bf16"):  # force one kernel at every length, to show the crossover
        blocked_attention.use_blocked = lambda q: impl == "bf16: blocked"
    else:  # "fast (sdpa)": the fused kernel (fp32 never takes the blocked path anyway)
        blocked_attention.use_blocked = lambda q: False
    amp = impl.startswith("bf16")
    x = torch.randn(batch, T, n_embd, requires_grad=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16) if amp else nullcontext():
            y = layer(x)
        y.float().sum().backward()

    step()
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    secs = (time.perf_counter() - t0) / 3
    rss = peak_rss_mb()
    print(json.dumps({"tokens_per_s": batch * T / secs, "peak_rss_mb": rss}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default=str(Path(__file__).with_name("attention_scaling.png")))
    p.add_argument("--child", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.n_embd, args.n_head, args.batch_size)
        return

    results: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
    for T in args.lengths:
        for impl in IMPLS:
            cmd = [sys.executable, __file__, "--child", impl, str(T), "--n-embd", str(args.n_embd),
                   "--n-head", str(args.n_head), "--batch-size", str(args.batch_size)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1]) | {"T": T}
            results[impl].append(row)
            print(f"T={T:5d}  {impl:24s} {row['tokens_per_s']:9.0f} tok/s  {row['peak_rss_mb']:7.0f} MB")

    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), dpi=110)
    ax1, ax2 = fig.subplots(1, 2)
    for impl, rows in results.items():
        Ts = [r["T"] for r in rows]
        ax1.plot(Ts, [r["tokens_per_s"] for r in rows], "o-", label=impl)
        ax2.plot(Ts, [r["peak_rss_mb"] for r in rows], "o-", label=impl)
    for ax, ylabel, title in ((ax1, "tokens / s", "throughput (forward + backward)"),
                              (ax2, "peak RSS (MB)", "memory")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.lengths, [str(t) for t in args.lengths])
        ax.set_xlabel("context length T (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"one attention layer, {args.n_embd} wide, {args.n_head} heads, batch {args.batch_size}, "
                 f"{torch.get_num_threads()} CPU threads")
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    ratios = {}  # blocked over the flash kernel, both bf16, at each length
    for blocked, flash in zip(results["bf16: blocked"], results["bf16: sdpa flash kernel"]):
        ratios[str(blocked["T"])] = blocked["tokens_per_s"] / flash["tokens_per_s"]
    write_result("attention_scaling", {"settings": {k: v for k, v in vars(args).items() if k != "child"},
                                       "rows": results, "bf16_blocked_over_flash": ratios})


if __name__ == "__main__":
    main()
