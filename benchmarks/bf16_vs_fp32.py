"""Does bf16 training learn what fp32 training learns? The same run twice, compared.

`llmscratch pretrain` trains under bf16 autocast on CPUs and GPUs that have it: matmuls
and attention in bf16, master weights, optimizer state and the loss in fp32. This script
runs one pretraining config with `--precision fp32` and again with `--precision bf16`
(same seed, same data order, same dropout masks) and reports both loss curves, their
largest gap, the validation losses and the wall-clock ratio. It writes the plot to
`benchmarks/bf16_vs_fp32.png` (or `--plot`).

    python benchmarks/bf16_vs_fp32.py                       # small on tinyshakespeare, 200 steps
    python benchmarks/bf16_vs_fp32.py --max-steps 60 --model tiny
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from llmscratch.train import TrainConfig, pretrain
from llmscratch.kernels import reuse_freed_memory
from results import write_result  # benchmarks/results.py


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _smooth(xs: list[float], k: int = 10) -> list[float]:
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="tinyshakespeare")
    p.add_argument("--model", default="small")
    p.add_argument("--tokenizer", default="bpe:4096")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--plot", default=str(Path(__file__).with_name("bf16_vs_fp32.png")))
    p.add_argument("--json", help="write the results here instead of benchmarks/results/bf16_vs_fp32.json")
    args = p.parse_args()
    reuse_freed_memory()
    root = Path(tempfile.mkdtemp(prefix="bf16-vs-fp32-"))
    runs, walls = {}, {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(data=args.data, model=args.model, tokenizer=args.tokenizer,
                          out=str(root / precision), max_steps=args.max_steps, batch_size=args.batch_size,
                          context_length=args.context_length, precision=precision,
                          eval_every=max(1, args.max_steps // 5), eval_batches=20, warmup_steps=20,
                          sample_tokens=0, progress=False)
        t0 = time.perf_counter()
        pretrain(cfg)
        walls[precision] = time.perf_counter() - t0
        runs[precision] = _records(root / precision)

    train = {k: [r["train_loss"] for r in v] for k, v in runs.items()}
    val = {k: [(r["step"], r["val_loss"]) for r in v if "val_loss" in r] for k, v in runs.items()}
    raw_gap = max(abs(a - b) for a, b in zip(train["fp32"], train["bf16"]))
    smooth_gap = max(abs(a - b) for a, b in zip(_smooth(train["fp32"]), _smooth(train["bf16"])))
    print(f"{args.model} on {args.data}, {args.max_steps} steps of {args.batch_size}x{args.context_length}")
    print(f"{'step':>6} {'val fp32':>9} {'val bf16':>9} {'diff':>8}")
    for (s, a), (_, b) in zip(val["fp32"], val["bf16"]):
        print(f"{s:6d} {a:9.4f} {b:9.4f} {b - a:+8.4f}")
    print(f"largest train-loss gap: {raw_gap:.4f} per step, {smooth_gap:.4f} on a 10-step moving average")
    print(f"wall clock: fp32 {walls['fp32']:.0f} s, bf16 {walls['bf16']:.0f} s "
          f"({walls['fp32'] / walls['bf16']:.2f}x faster in bf16, evaluation included)")

    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.subplots()
    for name, style in (("fp32", "-"), ("bf16", "--")):
        steps = [r["step"] for r in runs[name]]
        ax.plot(steps, _smooth(train[name]), style, label=f"train {name} (10-step mean)")
        ax.plot(*zip(*val[name]), "o" + style, label=f"validation {name}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(f"{args.model} on {args.data}: bf16 autocast vs fp32")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot)
    print(f"plot: {args.plot}")
    write_result("bf16_vs_fp32", {"args": vars(args), "val": val, "train_gap": raw_gap,
                                  "train_gap_smoothed": smooth_gap, "wall_seconds": walls,
                                  "bf16_speedup": walls["fp32"] / walls["bf16"]}, args.json)


if __name__ == "__main__":
    main()
