"""Pretrain for about five minutes on a CPU and report validation loss and bits per byte.

The reference point is nanoGPT's character-level "baby GPT" on tinyshakespeare, which
reaches about 1.6 nats/char (about 2.3 bits per character) on validation in 5 CPU minutes
with its best schedule. Bits per byte equals bits per character on this ASCII corpus, and,
unlike loss per token, it compares models with different tokenizers.

    python benchmarks/pretrain_5min.py                      # tinyshakespeare, best config
    python benchmarks/pretrain_5min.py --max-steps 200 --tokenizer bpe:4096

Equivalent CLI command (same settings):

    llmscratch pretrain --data tinyshakespeare --model small --tokenizer bpe:4096 \
        --max-steps 320 --batch-size 16 --context-length 256 --lr 1e-3 --dropout 0.1 \
        --eval-every 80 --eval-batches 40 --out runs/shakespeare
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from llmscratch.train import TrainConfig, pretrain
from llmscratch.kernels import reuse_freed_memory
from results import write_result  # benchmarks/results.py


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="tinyshakespeare")
    p.add_argument("--model", default="small")
    p.add_argument("--tokenizer", default="bpe:4096")
    p.add_argument("--max-steps", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--out", default=None, help="run folder (default: a temp folder)")
    p.add_argument("--json", help="write the results here instead of benchmarks/results/pretrain_5min.json")
    args = p.parse_args()
    reuse_freed_memory()  # as `llmscratch pretrain` / `finetune` do
    out = args.out or tempfile.mkdtemp(prefix="pretrain5min-")
    cfg = TrainConfig(data=args.data, model=args.model, tokenizer=args.tokenizer, out=out,
                      max_steps=args.max_steps, batch_size=args.batch_size,
                      context_length=args.context_length, lr=args.lr, dropout=args.dropout,
                      eval_every=max(1, args.max_steps // 4), eval_batches=40, warmup_steps=30)
    t0 = time.perf_counter()
    res = pretrain(cfg)
    wall = time.perf_counter() - t0
    result = {"data": args.data, "model": args.model, "tokenizer": args.tokenizer, "steps": res.step,
              "tokens_seen": res.tokens_seen, "wall_seconds": wall, "val_loss_nats_per_token": res.val_loss,
              "val_bits_per_byte": res.val_bpb, "run_folder": str(out)}
    print(json.dumps(result, indent=2))
    print(f"\n{args.data}: {res.val_bpb:.3f} bits/byte on validation after {wall / 60:.1f} min "
          f"(nanoGPT char-level baby GPT reference: about 2.3 bits/char in 5 min)")
    write_result("pretrain_5min", {"settings": vars(args), **result}, args.json)


if __name__ == "__main__":
    main()
