"""What lower-precision weights cost in quality: a trained model's validation perplexity with
fp32, bf16 and int8 (weight-only, one scale per output channel) weights, in one run.

The model is a run folder (e.g. the one `benchmarks/pretrain_5min.py --out DIR` trains); the
text is the run's own validation split: the corpus tokenized as pretraining does, then its
last `--val-fraction` of tokens (`data.split_train_val`), evaluated in non-overlapping
windows of the model's context (`train.evaluate`, what pretraining reports as val loss).

    python benchmarks/pretrain_5min.py --out runs/p5
    python benchmarks/int8_quality.py --model runs/p5 --data tinyshakespeare
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from llmscratch.checkpoints.run import load_model
from llmscratch.data import split_train_val, token_ids
from llmscratch.data.corpora import load_text
from llmscratch.errors import UserError
from llmscratch.train import evaluate
from results import write_result  # benchmarks/results.py


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a run folder")
    p.add_argument("--data", default="tinyshakespeare", help="the corpus the run was trained on")
    p.add_argument("--val-fraction", type=float, default=0.1, help="as the run's --val-fraction")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", help="write the results here instead of benchmarks/results/int8_quality.json")
    args = p.parse_args()
    try:
        _, tok = load_model(args.model)
        ids, bytes_per_token = token_ids(load_text(args.data), tok, source=args.data, progress=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _, val = split_train_val(ids, args.val_fraction)
    rows = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("int8", "int8")):
        model, _ = load_model(args.model, dtype=dtype, kernels=True)
        t0 = time.perf_counter()
        loss = evaluate(model, val, args.batch_size, model.config.context_length, None, torch.device("cpu"))
        rows[name] = {"val_loss": loss, "val_ppl": math.exp(loss),
                      "val_bpb": loss / math.log(2) / bytes_per_token,
                      "seconds": time.perf_counter() - t0}
        print(f"{name:5s} val loss {loss:.5f}  ppl {math.exp(loss):8.3f}  ({rows[name]['seconds']:.1f} s)")
    for name in ("bf16", "int8"):
        rows[name]["ppl_vs_fp32"] = rows[name]["val_ppl"] / rows["fp32"]["val_ppl"]
    write_result("int8_quality", {"settings": vars(args), "val_tokens": len(val), "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
