"""The GPT-2 block against the modern (Llama-style) block at equal parameter count.

Both train on the same data with the same tokenizer, optimizer, schedule and settings; only
the block differs: `small` (LayerNorm, learned positions, GELU MLP, 6 heads, biases) against
`llama-small` (RMSNorm, RoPE, SwiGLU, 6 query / 2 key-value heads, no biases), whose
parameter counts differ by 0.2% (1.1% without the shared embedding). Two budgets, each with
every seed:

- the same wall-clock budget (`--time-budget`, 5 minutes by default: the trainer's clock-driven
  warmup-stable-decay schedule ends at the budget), which rewards the faster block;
- the same token budget (`--steps`, default: the mean number of steps the GPT-2 block reached
  in its wall-clock runs), which compares what each block learns per token.

It reports validation bits/byte (mean and each seed), training tokens/s (median over each
run's steps after warmup), and one plot of the validation curves of both blocks against
tokens seen, one panel per budget. Results: `benchmarks/results/modern_vs_gpt2.json` and
`benchmarks/modern_vs_gpt2.png`.

    LLMSCRATCH_DATA_DIR=/path/with/tinyshakespeare.txt python benchmarks/modern_vs_gpt2.py
    python benchmarks/modern_vs_gpt2.py --quick          # a 1-minute check of the whole script
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from llmscratch.kernels import reuse_freed_memory
from llmscratch.models.gpt import GPT, GPTConfig
from llmscratch.train import TrainConfig, pretrain
from results import write_result  # benchmarks/results.py

BLOCKS = {"small": ("small", "llama-small"), "tiny": ("tiny", "llama-tiny")}
PLOT = Path(__file__).with_name("modern_vs_gpt2.png")


def run(args, model: str, seed: int, out: Path, *, time_budget: str | None = None, steps: int | None = None) -> dict:
    """One pretraining run; its result, validation curve and training speed."""
    cfg = TrainConfig(data=args.data, model=model, tokenizer=args.tokenizer, out=str(out), seed=seed,
                      max_steps=steps or 10**6, time_budget=time_budget, batch_size=args.batch_size,
                      context_length=args.context_length, lr=args.lr, dropout=args.dropout,
                      warmup_steps=args.warmup_steps, eval_every=args.eval_every, eval_batches=args.eval_batches,
                      sample_tokens=0, progress=False)
    t0 = time.perf_counter()
    res = pretrain(cfg)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if r["step"] > args.warmup_steps and "tokens_per_s" in r]
    return {"model": model, "seed": seed, "steps": res.step, "tokens": res.tokens_seen, "wall_seconds": wall,
            "val_bits_per_byte": res.val_bpb, "val_loss": res.val_loss,
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "curve": [(r["tokens"], r["val_bpb"]) for r in records if "val_bpb" in r]}


def summarize(runs: list[dict]) -> dict:
    bpbs = [r["val_bits_per_byte"] for r in runs]
    speeds = [r["tokens_per_s"] for r in runs if r["tokens_per_s"]]
    return {"val_bits_per_byte_mean": statistics.mean(bpbs), "val_bits_per_byte_each": bpbs,
            "steps_each": [r["steps"] for r in runs], "tokens_each": [r["tokens"] for r in runs],
            "tokens_per_s_median": statistics.median(speeds) if speeds else None}


def params(model: str, vocab: int) -> dict:
    import torch

    with torch.device("meta"):
        m = GPT(GPTConfig.from_name(model, vocab_size=vocab))
    return {"total": m.num_params(), "non_embedding": m.num_params(include_embeddings=False)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, budget in zip(axes, ("same_wall_clock", "same_tokens")):
        for (block, runs), color in zip(results[budget]["runs"].items(), ("tab:blue", "tab:orange")):
            for i, r in enumerate(runs):
                xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
                ax.plot(xs, ys, "o-", markersize=3, color=color, alpha=0.9 if i == 0 else 0.5,
                        label=f"{block} ({results['blocks'][block]})" if i == 0 else None)
        ax.set_title(results[budget]["title"])
        ax.set_xlabel("tokens seen")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation bits/byte")
    axes[0].legend()
    fig.suptitle(f"GPT-2 block vs modern block, {results['data']}, seeds {results['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="tinyshakespeare")
    p.add_argument("--size", choices=sorted(BLOCKS), default="small", help="small (30M) or tiny (3M) pair")
    p.add_argument("--tokenizer", default="bpe:4096")
    p.add_argument("--time-budget", default="5m", help="the wall-clock budget of each run")
    p.add_argument("--steps", type=int, default=None,
                   help="the token budget in steps (default: the GPT-2 block's mean steps in its wall-clock runs)")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--eval-batches", type=int, default=40)
    p.add_argument("--quick", action="store_true",
                   help="check the script end to end in a few minutes (tiny pair, 15 s, tiny batches); "
                        "writes its JSON and plot into the temporary run folder")
    p.add_argument("--json", help="write the results here instead of benchmarks/results/modern_vs_gpt2.json")
    p.add_argument("--plot", default=None, help=f"the figure (default: {PLOT})")
    args = p.parse_args()
    if args.quick:
        args.size, args.tokenizer, args.time_budget, args.batch_size = "tiny", "bpe:512", "15s", 4
        args.context_length, args.warmup_steps, args.eval_every, args.eval_batches = 64, 5, 10, 4
        args.seeds = "1,2"
    reuse_freed_memory()
    seeds = [int(s) for s in args.seeds.split(",")]
    gpt2, modern = BLOCKS[args.size]
    vocab = int(args.tokenizer.split(":")[1]) if args.tokenizer.startswith("bpe:") else 50257
    root = Path(tempfile.mkdtemp(prefix="modern-vs-gpt2-"))

    timed = {m: [run(args, m, s, root / f"time-{m}-{s}", time_budget=args.time_budget) for s in seeds]
             for m in (gpt2, modern)}
    steps = args.steps or round(statistics.mean(r["steps"] for r in timed[gpt2]))
    same_tokens = {m: [run(args, m, s, root / f"tokens-{m}-{s}", steps=steps) for s in seeds] for m in (gpt2, modern)}

    results = {
        "data": args.data, "seeds": seeds, "settings": vars(args),
        "blocks": {gpt2: "GPT-2 block", modern: "modern block"},
        "params": {m: params(m, vocab) for m in (gpt2, modern)},
        "same_wall_clock": {"title": f"same wall-clock ({args.time_budget} per run)",
                            "summary": {m: summarize(r) for m, r in timed.items()}, "runs": timed},
        "same_tokens": {"title": f"same tokens ({steps} steps x {args.batch_size} x {args.context_length})",
                        "steps": steps, "summary": {m: summarize(r) for m, r in same_tokens.items()},
                        "runs": same_tokens},
    }
    for budget in ("same_wall_clock", "same_tokens"):
        print(results[budget]["title"])
        for m, s in results[budget]["summary"].items():
            speed = f"{s['tokens_per_s_median']:,.0f}" if s["tokens_per_s_median"] else "?"
            print(f"  {m:12s} val bits/byte {s['val_bits_per_byte_mean']:.3f} (seeds {s['val_bits_per_byte_each']}), "
                  f"steps {s['steps_each']}, train {speed} tokens/s")
    # a quick check writes beside its runs, never over the real figures
    figure = Path(args.plot) if args.plot else (root / "modern_vs_gpt2_quick.png" if args.quick else PLOT)
    plot(results, figure)
    results["plot"] = str(figure)
    write_result("modern_vs_gpt2", results, args.json or (root / "modern_vs_gpt2_quick.json" if args.quick else None))


if __name__ == "__main__":
    main()
