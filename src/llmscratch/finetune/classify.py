"""Classification fine-tuning: a GPT becomes a text classifier (e.g. spam / not spam).

The language-model head (n_embd -> vocab) is replaced by a classification head
(n_embd -> n_classes). Texts are right-padded with `<|endoftext|>`; under causal attention
the last real token is the only position that has seen the whole text (and padding to its
right cannot change it), so the prediction reads that position's output.

Pipeline: `read_labeled` -> optional undersampling to balance the classes -> stratified
train/val/test split -> tokenize and truncate -> `fit_examples` (the one training loop) on
`classification_loss`, with `evaluate_classifier` each epoch -> metrics, plots, and a
classifier folder that `load_classifier` / `llmscratch classify` read back.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.bert import is_encoder_config
from ..checkpoints.run import FORMAT, load_run_model, model_kind_of, read_run_config, save_safetensors
from ..errors import UserError
from ..models.gpt import GPT, GPTConfig
from ..train import distributed_setup, rank0_first
from ..train.state import STATE_FILE
from ..utils import load_safetensors, seed_everything, write_json
from .common import FinetuneConfig, FinetuneResult, check_out_folder, count_params, fit_examples, iter_batches
from .data import balance_classes, parse_split, read_labeled, stratified_split
from .lora import apply_lora, merge_lora

TASK = "classify"


# --------------------------------------------------------------------------- data


def encode_texts(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, cut to its first `max_length` tokens. `<|endoftext|>`
    written inside a text stays ordinary text: it must not look like padding."""
    if getattr(tokenizer, "type_name", "") == "wordpiece":  # an encoder's input: [CLS] text [SEP]
        return [[tokenizer.cls_id, *tokenizer.encode(t, allowed_special="none")[:max_length - 2], tokenizer.sep_id]
                for t in texts]
    return [tokenizer.encode(t, allowed_special="none")[:max_length] or [tokenizer.eot_id] for t in texts]


def collate_classification(batch: list[tuple[list[int], int]], pad_id: int):
    """Right-pad a batch of `(ids, label)` to its longest sequence.

    Returns:
        `(idx (B, T), lengths (B,), labels (B,))`, padding with `pad_id`.
    """
    T = max(len(ids) for ids, _ in batch)
    idx = torch.full((len(batch), T), pad_id, dtype=torch.long)
    for i, (ids, _) in enumerate(batch):
        idx[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids, _ in batch], dtype=torch.long)
    labels = torch.tensor([y for _, y in batch], dtype=torch.long)
    return idx, lengths, labels


# -------------------------------------------------------------------------- model


def add_classification_head(model: GPT, num_classes: int) -> GPT:
    """Replace `model.lm_head` by a fresh `Linear(n_embd, num_classes)` (with bias), in place.

    The config's `tie_weights` becomes False: the head no longer shares the embedding.
    """
    if model.kind.can("classify-cls"):  # an encoder: a head on the pooled [CLS] vector (bert.py)
        model.add_classifier(num_classes)
        return model
    if num_classes < 2:
        raise UserError(f"classification needs at least 2 classes, found {num_classes}")
    ref = model.wte.weight
    head = nn.Linear(model.config.n_embd, num_classes, device=ref.device, dtype=ref.dtype)
    nn.init.normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    model.lm_head = head
    model.config = dataclasses.replace(model.config, tie_weights=False)
    return model


def set_dropout(model: GPT, p: float) -> None:
    """Set every dropout rate in `model` to `p` (and its config's, so a save records it)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif hasattr(m, "resid_dropout"):  # attention applies its own rate inside SDPA
            m.dropout = p
    model.config = dataclasses.replace(model.config, dropout=p)


def set_trainable(model: GPT, trainable: str, lora_rank: int = 0, lora_alpha: float = 16.0,
                  extra: tuple[nn.Module, ...] = ()) -> str:
    """Choose which parameters train.

    Args:
        model: the model (changed in place).
        trainable: `all`, `last-N` (the last N blocks + final LayerNorm), or `lora`
            (frozen base with adapters of rank `lora_rank`; see `lora.py`).
        extra: modules that train in every mode (a new classification head).

    Returns:
        A one-line description, e.g. `"trainable 1,234 of 5,678 parameters (21.7%)"`.
    """
    if trainable == "lora":
        if lora_rank <= 0:
            raise UserError("--trainable lora needs --lora-rank R (e.g. 8)")
        apply_lora(model, lora_rank, lora_alpha)
    elif trainable == "all":
        for p in model.parameters():
            p.requires_grad_(True)
    elif trainable.startswith("last-"):
        try:
            n = int(trainable[len("last-"):])
        except ValueError:
            n = -1
        if not 0 <= n <= model.config.n_layer:
            raise UserError(f"--trainable {trainable}: N must be between 0 and {model.config.n_layer}")
        for p in model.parameters():
            p.requires_grad_(False)
        for block in list(model.h)[len(model.h) - n:]:
            for p in block.parameters():
                p.requires_grad_(True)
        for p in getattr(model, "ln_f", nn.Identity()).parameters():  # an encoder (post-LN) has none
            p.requires_grad_(True)
    else:
        raise UserError(f"--trainable {trainable!r}: use all, last-N (e.g. last-1) or lora")
    for m in extra:
        for p in m.parameters():
            p.requires_grad_(True)
    n_train, n_total = count_params(model)
    return f"trainable {n_train:,} of {n_total:,} parameters ({100 * n_train / n_total:.2f}%)"


def classifier_logits(model: GPT, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Class logits read at each row's last real token.

    Args:
        idx: `(B, T)` right-padded token ids; lengths: `(B,)` real lengths (>= 1).

    Returns:
        `(B, n_classes)` logits.
    """
    if model.kind.can("classify-cls"):  # the pooled [CLS] position, padding masked out
        return model.class_logits(idx, key_mask=torch.arange(idx.shape[1], device=idx.device) < lengths[:, None])
    logits = model(idx)  # (B, T, n_classes)
    rows = torch.arange(idx.shape[0], device=idx.device)
    return logits[rows, lengths.to(idx.device) - 1]  # (B, n_classes)


@torch.no_grad()
def predict_ids(model: GPT, encoded: list[list[int]], pad_id: int, batch_size: int = 32,
                device=None) -> torch.Tensor:
    """Class probabilities `(N, n_classes)` for already-tokenized texts."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    batch_iter = iter_batches([(ids, 0) for ids in encoded], batch_size,
                              lambda b: collate_classification(b, pad_id))
    for idx, lengths, _ in batch_iter:
        logits = classifier_logits(model, idx.to(device), lengths.to(device))
        out.append(torch.softmax(logits.float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.lm_head.out_features)


def classification_loss(model: GPT, batch) -> torch.Tensor:
    """The classification objective: cross-entropy of the class logits at each row's last
    real token, for a batch `(idx, lengths, labels)` from `collate_classification`."""
    idx, lengths, y = batch
    return F.cross_entropy(classifier_logits(model, idx, lengths).float(), y)


def evaluate_classifier(model: GPT, examples: list[tuple[list[int], int]], pad_id: int,
                        batch_size: int = 32) -> dict:
    """`{"val_loss", "val_accuracy"}` of the model on encoded `(ids, label)` examples."""
    probs = predict_ids(model, [ids for ids, _ in examples], pad_id, batch_size)
    y = torch.tensor([label for _, label in examples])
    return {"val_loss": F.nll_loss(torch.log(probs.clamp_min(1e-12)), y).item(),
            "val_accuracy": (probs.argmax(-1) == y).float().mean().item()}


def classification_accuracy(model: GPT, examples: list[tuple[list[int], int]], pad_id: int,
                            batch_size: int = 32) -> float:
    """Share of the encoded `(ids, label)` examples the model labels correctly."""
    return evaluate_classifier(model, examples, pad_id, batch_size)["val_accuracy"]


# ------------------------------------------------------------------------ metrics


def classification_metrics(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix.

    Returns:
        `{"accuracy", "per_class": {label: {"precision", "recall", "f1", "support"}},
        "confusion_matrix": rows = true class, columns = predicted class}`.
    """
    k = len(labels)
    cm = [[0] * k for _ in range(k)]
    for t, p in zip(y_true, y_pred):
        cm[t][p] += 1
    per_class = {}
    for c, name in enumerate(labels):
        tp = cm[c][c]
        predicted = sum(cm[r][c] for r in range(k))
        actual = sum(cm[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    n = len(y_true)
    accuracy = sum(cm[c][c] for c in range(k)) / n if n else 0.0
    return {"accuracy": accuracy, "per_class": per_class, "confusion_matrix": cm}


def plot_confusion(cm: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    """The confusion matrix as an annotated heat map, written atomically."""
    from matplotlib.figure import Figure  # not pyplot: leaves a notebook's backend alone

    from ..utils import atomic_write

    fig = Figure(figsize=(1.6 + 1.1 * len(labels), 1.2 + 1.0 * len(labels)), dpi=110)
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    top = max(max(r) for r in cm) or 1
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")


# --------------------------------------------------------------------------- run


@dataclass
class ClassifyConfig(FinetuneConfig):
    """Settings of `llmscratch finetune classify` (plus the shared `FinetuneConfig`)."""

    model: str = "small"
    """run folder, Hugging Face GPT-2 folder or preset to start from"""
    data: str = "sms-spam"
    """dataset name or .tsv/.csv/.jsonl/.json file of text + label"""
    out: str = "runs/classifier"
    """folder for the classifier, metrics and plots"""
    text_column: str | None = None
    """column/field holding the text (default: text; sms-spam: 1)"""
    label_column: str | None = None
    """column/field holding the label (default: label; sms-spam: 0)"""
    format: str | None = None
    """tsv, csv, jsonl or json (default: from the extension)"""
    val_data: str | None = None
    """separate validation file (with --test-data; --data is then used whole for training)"""
    test_data: str | None = None
    """separate test file"""
    balance: bool = True
    """undersample every class to the smallest one's size"""
    split: str = "0.7,0.1,0.2"
    """train,val,test fractions (stratified)"""
    split_seed: int | None = None
    """seed of the class balancing and the split (default: --seed); fix it to compare training
    seeds on the same test set"""
    max_length: int | None = None
    """truncate texts to this many tokens (default: the longest training text, capped at the context length)"""
    trainable: str | None = None
    """all, last-N (last N blocks + final LayerNorm; the head always trains) or lora
    (default: last-1 for a GPT, all for an encoder)"""
    lr: float | None = None
    """peak learning rate (default: 5e-5; 1e-3 for an encoder under 10M parameters, e.g. bert-tiny)"""


@dataclass
class ClassifyResult(FinetuneResult):
    """`FinetuneResult` with the trained classifier in memory."""

    model: GPT | None = None
    """the trained classifier in memory (adapters merged), as saved in `out`"""


def _prepare_splits(cfg: ClassifyConfig):
    """Read, balance and split the data; with --val-data/--test-data those files are used
    as given and --data is the training set."""
    fractions = parse_split(cfg.split)
    seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    rows = read_labeled(cfg.data, cfg.text_column, cfg.label_column, cfg.format)
    if cfg.val_data or cfg.test_data:
        if not (cfg.val_data and cfg.test_data):
            raise UserError("give both --val-data and --test-data (or neither, to split --data)")
        train = balance_classes(rows, seed) if cfg.balance else rows
        val = read_labeled(cfg.val_data, cfg.text_column, cfg.label_column, cfg.format)
        test = read_labeled(cfg.test_data, cfg.text_column, cfg.label_column, cfg.format)
    else:
        if cfg.balance:
            rows = balance_classes(rows, seed)
        train, val, test = stratified_split(rows, fractions, seed)
    labels = sorted({r[1] for r in train})
    if len(labels) < 2:
        raise UserError(f"--data {cfg.data}: only one label ({labels[0]!r}); classification needs two or more")
    known = set(labels)
    for part in (val, test):
        for text, label, where in part:
            if label not in known:
                raise UserError(f"{where}: unknown label {label!r} (the training data has {labels})")
    return labels, train, val, test


def unlabeled_texts(cfg: ClassifyConfig) -> list[str]:
    """The texts of `cfg.data` a classifier may pretrain on: every distinct text that is not
    in the validation or test split `finetune_classify` makes with the same settings, with
    no labels. That is the training split plus the texts class balancing left out (e.g.
    the unused ham messages of `sms-spam`): text like any other, never evaluated on.

    Returns:
        The texts, stripped, in the data's order, each once.
    """
    rows = read_labeled(cfg.data, cfg.text_column, cfg.label_column, cfg.format)
    _, _, val, test = _prepare_splits(cfg)
    held_out = {text.strip() for text, _, _ in val + test}
    texts = [text.strip() for text, _, _ in rows if text.strip() and text.strip() not in held_out]
    return list(dict.fromkeys(texts))


def resolve_defaults(cfg: ClassifyConfig) -> None:
    """Fill `trainable` and `lr` left unset by the kind of `cfg.model` (a bert-tiny pretrained
    here stalls at chance with a GPT's last-1 at 5e-5; BERT-base takes 5e-5, all layers)."""
    encoder, n_params = model_kind_of(cfg.model)
    if cfg.trainable is None:
        cfg.trainable = "all" if encoder else "last-1"
    if cfg.lr is None:
        cfg.lr = 1e-3 if encoder and n_params < 10_000_000 else 5e-5


def finetune_classify(cfg: ClassifyConfig, *, stop_after: int | None = None) -> ClassifyResult:
    """Fine-tune a classifier as described by `cfg`; writes the classifier folder.

    Writes to `cfg.out`: `model.safetensors`, `tokenizer.json`, `config.json` (model config,
    labels, max length), `metrics.json`, `metrics.jsonl`, `loss.png`, `confusion.png`. All
    inputs are checked before anything is written, and every file is written atomically.
    While training, `train_state.safetensors` holds the checkpoint `--resume` continues
    from (after Ctrl-C, SIGTERM or `stop_after` steps); it is removed once the run is done.
    """
    from ..checkpoints.run import load_model

    resolve_defaults(cfg)
    cfg.validate()
    if cfg.lora_rank:
        cfg.trainable = "lora"
    out = Path(cfg.out)
    check_out_folder(out, cfg)
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    rank, world, device = distributed_setup(cfg.device)
    master = rank == 0
    labels, train, val, test = rank0_first(world, master, lambda: _prepare_splits(cfg))
    seed_everything(cfg.seed)
    model, tokenizer = load_model(cfg.model, device=device)
    if cfg.kernels:
        from ..kernels import apply_kernels

        apply_kernels(model)
    pad_id = tokenizer.eot_id
    ctx = model.config.context_length
    if cfg.max_length is not None:
        if cfg.max_length <= 0:
            raise UserError(f"--max-length must be positive, got {cfg.max_length}")
        if cfg.max_length > ctx:
            warnings.warn(f"--max-length {cfg.max_length} exceeds the context length {ctx}; using {ctx}")
        max_length = min(cfg.max_length, ctx)
    else:
        max_length = min(ctx, max(len(tokenizer.encode(t, allowed_special="none")) for t, _, _ in train))
    index = {name: i for i, name in enumerate(labels)}

    def encode(part):
        ids = encode_texts(tokenizer, [t for t, _, _ in part], max_length)
        return list(zip(ids, [index[y] for _, y, _ in part]))

    train_ex, val_ex, test_ex = encode(train), encode(val), encode(test)
    set_dropout(model, cfg.dropout)
    add_classification_head(model, len(labels))
    head = (model.classifier, model.pooler) if model.kind.can("classify-cls") else (model.lm_head,)
    params_line = set_trainable(model, cfg.trainable, cfg.lora_rank, cfg.lora_alpha, extra=head)
    if master:
        print(f"{len(train_ex)} train / {len(val_ex)} val / {len(test_ex)} test examples, "
              f"labels {labels}, max length {max_length} tokens; {params_line}", file=sys.stderr)

    evaluate = partial(evaluate_classifier, examples=val_ex, pad_id=pad_id, batch_size=cfg.batch_size * 2)
    result = fit_examples(model, classification_loss, train_ex, partial(collate_classification, pad_id=pad_id),
                          cfg, device=device, evaluate=evaluate, out=out, rank=rank, world=world,
                          stop_after=stop_after, title="classification fine-tuning loss", desc="classify")

    # Merge adapters first: the saved model is a plain GPT with a classification head.
    merge_lora(model)
    metrics: dict = {"labels": labels, "max_length": max_length, "trainable": cfg.trainable,
                     "n_train": len(train_ex), "n_val": len(val_ex), "n_test": len(test_ex)}
    splits = {"train": train_ex, "val": val_ex, "test": test_ex}
    for name, examples in splits.items():
        probs = predict_ids(model, [ids for ids, _ in examples], pad_id, cfg.batch_size * 2, device)
        m = classification_metrics([lab for _, lab in examples], probs.argmax(-1).tolist(), labels)
        metrics[f"{name}_accuracy"] = m["accuracy"]
        if name == "test":
            metrics["per_class"] = m["per_class"]
            metrics["confusion_matrix"] = m["confusion_matrix"]
    metrics["interrupted"] = result.interrupted
    metrics["steps"] = result.step
    metrics["history"] = result.records
    metrics["settings"] = cfg.settings()

    if master:
        save_classifier(model, out, tokenizer, labels, max_length)
        write_json(out / "metrics.json", metrics)
        plot_confusion(metrics["confusion_matrix"], labels, out / "confusion.png",
                       f"test set: accuracy {100 * metrics['test_accuracy']:.2f}%")
        if not result.interrupted:
            (out / STATE_FILE).unlink(missing_ok=True)  # done: nothing left to resume
    return ClassifyResult(out=out, metrics=metrics, interrupted=result.interrupted, params_line=params_line,
                          model=model)


# ------------------------------------------------------------------- save / load


def save_classifier(model: GPT, out: str | Path, tokenizer, labels: list[str], max_length: int) -> Path:
    """Write a classifier folder: weights, then tokenizer, then `config.json` last (its
    presence marks a complete folder)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
             if k not in getattr(model, "tied_weights", ())}  # an encoder's decoder is its embedding
    save_safetensors(state, out / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save(out / "tokenizer.json")
    write_json(out / "config.json", {"format": FORMAT, "task": TASK, "model": model.config.to_dict(),
                                     "labels": list(labels), "max_length": max_length})
    return out


def load_classifier(path: str | Path, device=None):
    """A classifier folder written by `finetune_classify`.

    Returns:
        `(model, tokenizer, labels, max_length)`, the model in eval mode.
    """
    from ..tokenizer import load_tokenizer

    path = Path(path)
    cfg = read_run_config(path)
    if cfg.get("task") != TASK or "labels" not in cfg:
        raise UserError(f"{path}: not a classifier folder (make one with `llmscratch finetune classify`)")
    if is_encoder_config(cfg["model"]):  # an encoder with its classifier (weights_bert.py)
        return (load_run_model(path, device, classifier=True), load_tokenizer(path / "tokenizer.json"), list(cfg["labels"]),
                int(cfg["max_length"]))
    config = GPTConfig.from_dict(cfg["model"])
    labels = list(cfg["labels"])
    with torch.device("meta"):
        model = GPT(config)
        model.lm_head = nn.Linear(config.n_embd, len(labels))
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{path}: no model.safetensors")
    state = load_safetensors(weights)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise UserError(f"{weights}: weights do not match config.json ({str(e).splitlines()[0]})") from None
    model.to(device=device)
    return model.eval(), load_tokenizer(path / "tokenizer.json"), labels, int(cfg["max_length"])


def classify_texts(path_or_model, texts: list[str], device=None) -> list[tuple[str, float]]:
    """Label and probability of the predicted label for each text.

    Args:
        path_or_model: a classifier folder, or the tuple `load_classifier` returns.
        texts: the texts to classify.
    """
    model, tokenizer, labels, max_length = (
        load_classifier(path_or_model, device) if isinstance(path_or_model, (str, Path)) else path_or_model
    )
    probs = predict_ids(model, encode_texts(tokenizer, texts, max_length), tokenizer.eot_id)
    best = probs.argmax(-1)
    return [(labels[int(b)], float(probs[i, b])) for i, b in enumerate(best)]
