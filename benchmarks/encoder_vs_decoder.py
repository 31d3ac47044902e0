"""Encoder vs decoder on sms-spam: the same parameters, text, tokens and fine-tuning.

For each seed:

1. The split `llmscratch finetune classify` makes (balanced by undersampling, stratified
   70/10/20 with that seed); the unlabeled pretraining text is every message whose text is
   not in its validation or test part.
2. One WordPiece vocabulary (`--vocab`, trained from scratch on that text), used by both.
3. Pretraining on the one loop, the same steps x batch x context tokens for both:
   - the **encoder**: `--encoder` (default `bert-tiny`: 2 layers, 128 wide, 2 heads) with
     masked LM (`llmscratch.train.pretrain`, objective chosen from the model);
   - the **decoder**: a GPT of the same shape (layers, width, heads; tied head), so the
     same parameter count up to BERT's extras (token types, MLM transform, pooler: both
     counts are in the JSON), with next-token prediction (`train.fit` on
     `pretrain.lm_train_loss` / `LMBatches`).
4. Fine-tuning both with `finetune_classify` (all layers; the decoder reads the last token,
   the encoder the pooled `[CLS]`), test accuracy on the held-out 20%.

Fine-tuning settings are `benchmarks/sms_spam.py`'s (10 epochs, lr 1e-3, batch 16, dropout
0.1). Reported: test accuracy mean ± std (sample std over seeds) for each model, the wall-clock
of a pretraining step and of a fine-tuning epoch, both parameter counts, and the encoder's
masked-token accuracy on held-out text. Writes `benchmarks/results/<--name>.json` (through
`results.write_result`) and a plot beside it.

    python benchmarks/encoder_vs_decoder.py --seeds 1 2 3                     # the figures (sms-spam)
    python benchmarks/encoder_vs_decoder.py --quick --data sms.tsv --name encoder_vs_decoder_quick  # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from llmscratch.checkpoints.run import save_model
from llmscratch.data import BatchSampler, split_train_val, token_ids
from llmscratch.data.corpora import load_text
from llmscratch.finetune.classify import ClassifyConfig, balance_classes, finetune_classify, stratified_split
from llmscratch.finetune.data import read_labeled
from llmscratch.kernels import apply_kernels, reuse_freed_memory
from llmscratch.models.gpt import GPT, GPTConfig
from llmscratch.tokenizer import WordPieceTokenizer
from llmscratch.train import LMBatches, Objective, TrainConfig, evaluate, fit, pretrain
from llmscratch.train.pretrain import lm_train_loss
from llmscratch.models.bert import BertConfig
from results import write_result  # benchmarks/results.py


def build_corpus(data: str, folder: Path, seed: int, vocab: int) -> tuple[Path, Path, int]:
    """The unlabeled text (validation and test messages left out) and its WordPiece vocabulary."""
    rows = read_labeled(data, text_column="1", label_column="0")
    _, val, test = stratified_split(balance_classes(rows, seed), (0.7, 0.1, 0.2), seed)
    held_out = {t.strip() for t, _, _ in val + test}
    texts = [t.strip() for t, _, _ in rows if t.strip() not in held_out]
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    tok = WordPieceTokenizer.from_corpus(texts, vocab)
    tok.save(folder / "wordpiece.json")
    return corpus, folder / "wordpiece.json", len(texts)


def pretrain_decoder(cfg: TrainConfig, shape: BertConfig) -> tuple[float, float]:
    """Next-token pretraining of a GPT shaped like the encoder, on the one loop; the run
    folder (weights + tokenizer) in `cfg.out`. Returns (validation loss, seconds)."""
    from llmscratch.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.tokenizer)
    ids, _ = token_ids(load_text(cfg.data, progress=False), tok, source=cfg.data, progress=False)
    T = cfg.context_length
    train_ids, val_ids = split_train_val(ids, cfg.val_fraction, T)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=T, n_embd=shape.n_embd, n_layer=shape.n_layer,
                          n_head=shape.n_head, dropout=cfg.dropout))
    if cfg.kernels:
        apply_kernels(model)
    out = Path(cfg.out)
    batches = LMBatches(BatchSampler(train_ids, cfg.batch_size, T, seed=cfg.seed), cfg.grad_accum)
    device = torch.device("cpu") if cfg.device == "cpu" else None
    from llmscratch.utils import pick_device

    device = device or pick_device(cfg.device)
    model.to(device)

    def val(m):
        return {"val_loss": evaluate(m, val_ids, cfg.batch_size, T, cfg.eval_batches, device)}

    loop = cfg.loop_settings(plot_title="decoder (GPT) on SMS text", desc="pretrain decoder")
    result = fit(model, Objective(lm_train_loss, batches, val), loop, device=device, out=out)
    save_model(model, out, tok)
    return result.last_eval.get("val_loss"), time.perf_counter() - t0


def finetune(run: Path, data: str, out: Path, args, seed: int) -> tuple[dict, float]:
    t0 = time.perf_counter()
    clf = finetune_classify(ClassifyConfig(
        model=str(run), data=data, text_column="1", label_column="0", out=str(out), trainable="all",
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, dropout=args.dropout, seed=seed,
        max_length=args.context_length, progress=False))
    return clf.metrics, time.perf_counter() - t0


def step_ms(run: Path) -> float:
    """Median wall-clock of a pretraining step (from the loop's tokens/s in metrics.jsonl,
    the first 3 steps left out as warm-up): the step alone, not evaluation or saving."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    per_step = recs[0]["tokens"]
    times = [1000 * per_step / r["tokens_per_s"] for r in recs if r["step"] > 3 and r.get("tokens_per_s")]
    return statistics.median(times)


def n_params(run: Path) -> int:
    from llmscratch.checkpoints.run import load_model

    return sum(p.numel() for p in load_model(str(run))[0].parameters())


def mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["decoder", "encoder"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    acc = [summary[n]["test_accuracy"] for n in names]
    a1.bar(names, [100 * a["mean"] for a in acc], yerr=[100 * a["std"] for a in acc], capsize=6,
           color=["#dd8452", "#4c72b0"])
    a1.set_ylim(max(0, min(100 * a["mean"] for a in acc) - 15), 100)
    a1.set_ylabel("test accuracy (%)")
    a1.set_title(f"sms-spam, mean ± std over {len(summary['seeds'])} seed(s)")
    step = [summary[n]["pretrain_step_ms"] for n in names]
    a2.bar(names, [s["mean"] for s in step], yerr=[s["std"] for s in step], capsize=6, color=["#dd8452", "#4c72b0"])
    a2.set_ylabel("ms per pretraining step")
    a2.set_title(f"wall-clock of a step ({summary['settings']['batch_size_pretrain']} x "
                 f"{summary['settings']['context_length']} tokens)")
    plt.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="sms-spam", help="dataset name or headerless label<TAB>text file")
    p.add_argument("--out", default="runs/encoder-vs-decoder", help="work folder (runs, classifiers)")
    p.add_argument("--name", default="encoder_vs_decoder", help="result name under benchmarks/results/")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--encoder", default="bert-tiny", choices=BertConfig.presets())
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--context-length", type=int, default=64)
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--quick", action="store_true", help="a smoke test: 30 steps, 3 epochs, small vocab")
    args = p.parse_args()
    if args.quick:
        args.pretrain_steps, args.epochs, args.vocab, args.context_length, args.pretrain_batch = 30, 3, 500, 32, 8
    reuse_freed_memory()
    work = Path(args.out)
    if work.exists() and any(work.iterdir()):
        print(f"error: {work} is not empty; pick a new --out", file=sys.stderr)
        return 2
    shape = BertConfig.from_name(args.encoder)
    per_seed = []
    for seed in args.seeds:
        folder = work / f"seed{seed}"
        corpus, tok_file, n_texts = build_corpus(args.data, folder, seed, args.vocab)
        common = dict(data=str(corpus), tokenizer=str(tok_file), context_length=args.context_length,
                      max_steps=args.pretrain_steps, batch_size=args.pretrain_batch, lr=args.pretrain_lr,
                      warmup_steps=max(1, args.pretrain_steps // 10), eval_every=max(1, args.pretrain_steps // 3),
                      eval_batches=10, sample_tokens=0, seed=seed, dropout=args.dropout, progress=False)
        t0 = time.perf_counter()
        enc = pretrain(TrainConfig(model=args.encoder, out=str(folder / "encoder"), **common))
        enc_s = time.perf_counter() - t0
        dec_loss, dec_s = pretrain_decoder(TrainConfig(model="tiny", out=str(folder / "decoder"), **common), shape)
        row = {"seed": seed, "pretrain_messages": n_texts}
        for name, run, secs in [("encoder", enc.out, enc_s), ("decoder", folder / "decoder", dec_s)]:
            metrics, ft_s = finetune(run, args.data, folder / f"classify-{name}", args, seed)
            row[name] = {"test_accuracy": metrics["test_accuracy"], "val_accuracy": metrics["val_accuracy"],
                         "params": n_params(run), "pretrain_seconds": round(secs, 1),
                         "pretrain_step_ms": step_ms(run),
                         "finetune_epoch_s": ft_s / args.epochs, "n_test": metrics["n_test"]}
        row["encoder"]["val_mlm_acc"] = enc.val_mlm_acc
        row["encoder"]["val_mlm_loss"] = enc.val_loss
        row["decoder"]["val_lm_loss"] = dec_loss
        per_seed.append(row)
        print(json.dumps(row, indent=1), flush=True)

    summary = {"seeds": args.seeds, "per_seed": per_seed,
               "settings": {"data": args.data, "encoder": args.encoder, "vocab": args.vocab,
                            "context_length": args.context_length, "pretrain_steps": args.pretrain_steps,
                            "batch_size_pretrain": args.pretrain_batch, "pretrain_lr": args.pretrain_lr,
                            "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                            "dropout": args.dropout, "quick": args.quick,
                            "pretrain_tokens": args.pretrain_steps * args.pretrain_batch * args.context_length}}
    for name in ("encoder", "decoder"):
        summary[name] = {k: mean_std([r[name][k] for r in per_seed])
                         for k in ("test_accuracy", "pretrain_step_ms", "finetune_epoch_s")}
        summary[name]["params"] = per_seed[0][name]["params"]
    summary["encoder"]["val_mlm_acc"] = mean_std([r["encoder"]["val_mlm_acc"] for r in per_seed])
    out = write_result(args.name, summary)
    plot(summary, out.with_suffix(".png"))
    for name in ("decoder", "encoder"):
        s = summary[name]
        print(f"{name}: {s['params']:,} parameters, test accuracy {100 * s['test_accuracy']['mean']:.2f} ± "
              f"{100 * s['test_accuracy']['std']:.2f}%, {s['pretrain_step_ms']['mean']:.0f} ms per pretraining step")
    print(f"encoder masked-token accuracy on held-out text: {100 * summary['encoder']['val_mlm_acc']['mean']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
