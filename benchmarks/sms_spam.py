"""The README's spam recipe, run as a user runs it, for several seeds, beside a TF-IDF baseline.

The figure: test accuracy on `sms-spam`, balanced by undersampling, stratified 70/10/20
split with seed 123 (`--split-seed 123`, the same test set for every seed). No downloaded
weights exist here, so the recipe pretrains its own model on the collection's unlabeled
text first. Per seed S, three CLI commands (the README's):

    llmscratch finetune unlabeled --data sms-spam --out OUT/texts.txt
    llmscratch pretrain --data OUT/texts.txt --out OUT/lm-S --seed S  PRETRAIN_FLAGS
    llmscratch finetune classify --model OUT/lm-S --data sms-spam --split-seed 123 --seed S \
        --out OUT/clf-S  CLASSIFY_FLAGS

The unlabeled text is every message outside the validation and test split (labels never
used; the undersampling leaves ~4,000 unused ham messages, which are text like any other).

The baseline: TF-IDF of character 1-5-grams + logistic regression (scikit-learn, the
`bench` extra), fitted on the same training split, C chosen on the validation split.

    python benchmarks/sms_spam.py --out runs/sms-spam-bench                 # 3 seeds
    python benchmarks/sms_spam.py --out /tmp/x --seeds 1 --pretrain-steps 20 --epochs 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results import write_result  # benchmarks/results.py

# A GPT of bert-tiny's shape (2 layers, width 128, 2 heads) on an uncased WordPiece vocabulary:
# the decoder of benchmarks/encoder_vs_decoder.py, which averaged 97.5% over 3 seeds there.
PRETRAIN = {"--model": "tiny", "--n-embd": "128", "--n-head": "2", "--context-length": "64",
            "--tokenizer": "wordpiece:4096", "--max-steps": "1500",
            "--batch-size": "32", "--lr": "2e-3", "--warmup-steps": "150", "--eval-every": "500",
            "--eval-batches": "10", "--sample-tokens": "0", "--dropout": "0.1"}
CLASSIFY = {"--trainable": "all", "--epochs": "10", "--lr": "1e-3", "--batch-size": "16", "--dropout": "0.1"}


def llmscratch(*args: str) -> float:
    """Run one CLI command; return its wall-clock seconds (exit on failure, with its error)."""
    cmd = [sys.executable, "-m", "llmscratch", *args]
    print("$ llmscratch " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def flags(d: dict) -> list[str]:
    return [x for kv in d.items() for x in kv]


def tfidf_baseline(split_seed: int) -> dict:
    """Character n-gram TF-IDF + logistic regression on the recipe's split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from llmscratch.finetune.classify import ClassifyConfig, _prepare_splits

    _, train, val, test = _prepare_splits(ClassifyConfig(data="sms-spam", split_seed=split_seed))
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 5), sublinear_tf=True, min_df=2)
    x_train = vec.fit_transform([t for t, _, _ in train])
    y = lambda part: [label for _, label, _ in part]  # noqa: E731
    best = None
    for c in (1, 3, 10, 30, 100):
        clf = LogisticRegression(C=c, max_iter=2000).fit(x_train, y(train))
        acc = clf.score(vec.transform([t for t, _, _ in val]), y(val))
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    val_acc, c, clf = best
    test_acc = clf.score(vec.transform([t for t, _, _ in test]), y(test))
    return {"test_accuracy": test_acc, "val_accuracy": val_acc, "C": c, "test_examples": len(test)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/sms-spam-bench")
    p.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3])
    p.add_argument("--split-seed", type=int, default=123)
    p.add_argument("--pretrain-steps", type=int, help="override the recipe's --max-steps (smoke tests)")
    p.add_argument("--epochs", type=int, help="override the recipe's classify --epochs (smoke tests)")
    p.add_argument("--json", help="write here instead of benchmarks/results/sms_spam.json")
    args = p.parse_args()
    out = Path(args.out)
    if out.exists():
        print(f"error: {out} exists; pick a new --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True)
    pretrain = dict(PRETRAIN, **({"--max-steps": str(args.pretrain_steps)} if args.pretrain_steps else {}))
    classify = dict(CLASSIFY, **({"--epochs": str(args.epochs)} if args.epochs else {}))
    if args.pretrain_steps:
        pretrain["--warmup-steps"] = str(max(1, args.pretrain_steps // 10))
        pretrain["--eval-every"] = str(args.pretrain_steps)

    texts = out / "texts.txt"
    t_texts = llmscratch("finetune", "unlabeled", "--data", "sms-spam", "--split-seed", str(args.split_seed),
                         "--out", str(texts))
    runs = []
    for seed in args.seeds:
        lm, clf = out / f"lm-{seed}", out / f"clf-{seed}"
        t_pre = llmscratch("pretrain", "--data", str(texts), "--out", str(lm), "--seed", str(seed), *flags(pretrain))
        t_clf = llmscratch("finetune", "classify", "--model", str(lm), "--data", "sms-spam", "--split-seed",
                           str(args.split_seed), "--seed", str(seed), "--out", str(clf), *flags(classify))
        m = json.loads((clf / "metrics.json").read_text())
        runs.append({"seed": seed, "test_accuracy": m["test_accuracy"], "val_accuracy": m["val_accuracy"],
                     "pretrain_seconds": round(t_pre, 1), "finetune_seconds": round(t_clf, 1),
                     "total_seconds": round(t_texts + t_pre + t_clf, 1)})
        print(f"seed {seed}: test accuracy {100 * m['test_accuracy']:.2f}% in {t_texts + t_pre + t_clf:.0f} s",
              flush=True)
    accs = [r["test_accuracy"] for r in runs]
    summary = {
        "recipe": {"pretrain": pretrain, "classify": classify, "split_seed": args.split_seed},
        "runs": runs,
        "test_accuracy_mean": statistics.mean(accs),
        "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "baseline_tfidf_logreg": tfidf_baseline(args.split_seed),
    }
    write_result("sms_spam", summary, args.json)
    base = summary["baseline_tfidf_logreg"]["test_accuracy"]
    print(f"\nsms-spam test accuracy {100 * summary['test_accuracy_mean']:.2f}% ± "
          f"{100 * summary['test_accuracy_std']:.2f} over {len(accs)} seeds; "
          f"TF-IDF + logistic regression {100 * base:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
