"""Masked-language-model pretraining (BERT's objective) on the one training loop.

The objective, in the loop's three pieces:

- `mlm_loss(model, batch)`: cross-entropy of the MLM head at the selected positions only
  (the head runs on those rows alone, not on the whole `(B, T, vocab)`).
- `MLMBatches`: windows of the corpus as `[CLS] window [SEP]`, masked by `mask_tokens`
  with a generator seeded from (seed, global micro-batch number). Masks are therefore
  drawn afresh every time a window comes round again (dynamic masking, RoBERTa's
  improvement on BERT's static masks), and they are a pure function of the step, so a
  resumed run sees exactly the masks an uninterrupted one does.
- `evaluate_mlm`: masked-token loss and accuracy on the held-out tail, with masks fixed
  once (seeded by the batch number), so successive evaluations are comparable.

The masking rule (`MaskingRule`, BERT's): each ordinary token is selected with probability
15%; a selected token is replaced by `[MASK]` 80% of the time, by a random token 10%, and
kept 10% (so the model cannot learn that only `[MASK]` positions matter); the loss is on
the selected tokens only. With `whole_word`, selection is per word: all the WordPiece
pieces of a word (`play ##ing`) are selected together, so a word is never half-visible.

`pretrain_mlm(cfg)` is the whole run (called by `pretrain.pretrain` when the objective is
`mlm`): WordPiece tokenizer (trained on the data, or loaded), a `Bert`, the run folder
(same files as a GPT run; its config's `"model_type": "bert"` marks the family).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..models.bert import Bert, BertConfig
from ..checkpoints.run import save_model
from ..data import BatchSampler, iter_eval_batches, split_train_val, token_ids
from ..data.corpora import load_text
from ..errors import UserError
from ..tokenizer.wordpiece import WordPieceTokenizer
from .config import TrainConfig, vocab_size_of
from .loop import FitResult, Objective, fit, rank0_first
from .prepared import is_prepared_dir
from .start import build_model, start_run

IGNORE = -100
"""The label of positions without a loss (not selected for masking)."""


def objective_of(cfg: TrainConfig) -> str:
    """"mlm" or "lm" for a `TrainConfig`: `--objective`, or with `auto` the model's kind
    (an encoder preset such as `bert-tiny` -> mlm). UserError for an impossible pair."""
    objective = cfg.objective
    encoder = cfg.model in BertConfig.presets()
    if objective == "auto":
        return "mlm" if encoder else "lm"
    if objective == "mlm" and not encoder:
        raise UserError(f"--objective mlm trains an encoder; --model {cfg.model} is not one "
                        f"(encoders: {', '.join(BertConfig.presets())})")
    if objective == "lm" and encoder:
        raise UserError(f"--model {cfg.model} is an encoder: it trains with --objective mlm, not lm")
    return objective


# ------------------------------------------------------------------------ masking


@dataclass(frozen=True)
class MaskingRule:
    """BERT's masking rule."""

    select: float = 0.15  # share of ordinary tokens that get a loss
    to_mask: float = 0.8  # of those: replaced by [MASK]
    to_random: float = 0.1  # of those: replaced by a random token (the rest are kept)
    whole_word: bool = False  # select all pieces of a word together


def mask_tokens(ids: torch.Tensor, *, mask_id: int, vocab_size: int, special: torch.Tensor,
                rule: MaskingRule = MaskingRule(), word_start: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the masking rule to a batch.

    Args:
        ids: `(B, T)` token ids.
        mask_id, vocab_size: the `[MASK]` id and the range random replacements come from.
        special: `(B, T)` bool, True at positions never selected (`[CLS]`, `[SEP]`, `[PAD]`).
        word_start: `(B, T)` bool, False at `##` continuation pieces (for `whole_word`).
        generator: the randomness (seed it for reproducible masks).

    Returns:
        `(inputs, labels)`: the corrupted ids, and the original ids at selected positions
        with `IGNORE` (-100) elsewhere.
    """
    B, T = ids.shape
    u = torch.rand(B, T, generator=generator)
    if rule.whole_word:
        if word_start is None:
            raise ValueError("whole-word masking needs word_start")
        # every piece takes the draw of the piece that starts its word
        starts = word_start | special  # a special token starts a "word" of its own
        word = torch.cumsum(starts.long(), dim=1) - 1  # (B, T) index of each token's word
        u = torch.gather(u, 1, word.clamp_min(0))
    selected = (u < rule.select) & ~special
    action = torch.rand(B, T, generator=generator)
    random_ids = torch.randint(vocab_size, (B, T), generator=generator)
    inputs = ids.clone()
    to_mask = selected & (action < rule.to_mask)
    to_random = selected & (action >= rule.to_mask) & (action < rule.to_mask + rule.to_random)
    inputs[to_mask] = mask_id
    inputs[to_random] = random_ids[to_random]
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE))
    return inputs, labels


def _generator(*numbers: int) -> torch.Generator:
    """A torch generator seeded from a tuple of integers (mixed by numpy's SeedSequence)."""
    seed = np.random.SeedSequence([n % 2**63 for n in numbers]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(seed))


class MaskedWindows:
    """Turns corpus windows into masked encoder inputs: `[CLS] window [SEP]`, masked."""

    def __init__(self, tokenizer: WordPieceTokenizer, rule: MaskingRule):
        self.rule = rule
        self.cls_id, self.sep_id, self.mask_id = tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id
        self.vocab_size = tokenizer.vocab_size
        self.special_ids = torch.tensor(sorted(tokenizer.special_tokens.values()))
        self.starts_word = torch.tensor(tokenizer.word_starts(range(tokenizer.vocab_size)))

    def __call__(self, windows: torch.Tensor, generator: torch.Generator):
        """`(B, W)` windows -> `(inputs, labels)` of shape `(B, W + 2)`."""
        B = windows.shape[0]
        ids = torch.cat([torch.full((B, 1), self.cls_id), windows.long().cpu(),
                         torch.full((B, 1), self.sep_id)], 1)
        special = torch.isin(ids, self.special_ids)
        return mask_tokens(ids, mask_id=self.mask_id, vocab_size=self.vocab_size, special=special,
                           rule=self.rule, word_start=self.starts_word[ids], generator=generator)


class MLMBatches:
    """The MLM `BatchSource`: micro-batch `micro` of step `step` is window batch
    `n = step * grad_accum + micro` of a `BatchSampler`, masked with a generator seeded by
    (seed, n). The whole global batch is masked and each rank takes its rows, so N
    processes see exactly what one process does."""

    unit = "tokens"

    def __init__(self, sampler: BatchSampler, grad_accum: int, masker: MaskedWindows, seed: int):
        self.sampler, self.grad_accum, self.masker, self.seed = sampler, grad_accum, masker, seed

    def get(self, step: int, micro: int, rank: int, world: int, device: torch.device):
        n = step * self.grad_accum + micro
        x, _ = self.sampler.get_batch(n, 0, 1)
        inputs, labels = self.masker(x, _generator(self.seed, n))
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        # The loss is a mean over the selected tokens of the GLOBAL batch: each rank divides
        # its sum by (global count / world), and DDP's average of the ranks' gradients is
        # then exactly one process's (the ranks hold different numbers of selected tokens).
        per_rank = max(int((labels != IGNORE).sum()), 1) / world
        return inputs[rows].to(device), labels[rows].to(device), per_rank

    def seen(self, step: int) -> int:
        return step * self.grad_accum * self.sampler.batch_size * (self.sampler.context_length + 2)

    def epoch_of(self, step: int) -> float:
        return self.sampler.epoch_of(step * self.grad_accum)


def mlm_loss(model: Bert, batch) -> torch.Tensor:
    """Cross-entropy over the selected (labelled) positions of a batch `(inputs, labels)`:
    their mean, or their sum divided by `denominator` for `(inputs, labels, denominator)`
    (what `MLMBatches` gives, so that ranks holding different numbers of selected tokens
    still average to the global mean)."""
    inputs, labels, *rest = batch
    h = model.hidden_states(inputs)
    selected = labels != IGNORE
    logits = model.mlm_logits(h[selected])  # only the selected rows go through the head
    if logits.shape[0] == 0:
        return (h.sum() + logits.sum()) * 0.0  # nothing selected: a zero loss that still has a graph
    if not rest:
        return F.cross_entropy(logits.float(), labels[selected])
    return F.cross_entropy(logits.float(), labels[selected], reduction="sum") / rest[0]


@torch.no_grad()
def evaluate_mlm(model: Bert, val_ids, masker: MaskedWindows, batch_size: int, window: int,
                 max_batches: int | None, device: torch.device, amp: torch.dtype | None = None,
                 seed: int = 0, rank: int = 0, world: int = 1) -> dict:
    """Masked-token loss and accuracy (top-1 prediction equals the original token) over the
    first `max_batches` validation batches, masks seeded by the batch number (the same at
    every evaluation)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    ctx = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
    for i, (x, _) in enumerate(iter_eval_batches(val_ids, batch_size, window, max_batches)):
        if i % world != rank:
            continue
        inputs, labels = masker(x, _generator(seed, -1, i))
        inputs, labels = inputs.to(device), labels.to(device)
        selected = labels != IGNORE
        with ctx:
            logits = model.mlm_logits(model.hidden_states(inputs)[selected]).float()
        total[0] += F.cross_entropy(logits, labels[selected], reduction="sum").double()
        total[1] += (logits.argmax(-1) == labels[selected]).sum()
        total[2] += selected.sum()
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    n = max(total[2].item(), 1.0)
    return {"val_loss": total[0].item() / n, "val_mlm_acc": total[1].item() / n}


# ------------------------------------------------------------------------ the run


def build_wordpiece(spec: str, documents) -> WordPieceTokenizer:
    """The run's tokenizer: `wordpiece:N` (or `bpe:N`, read as the encoder's equivalent)
    trains an uncased WordPiece vocabulary of N on the data; else a `vocab.txt`, a folder
    holding one, or a saved WordPiece `tokenizer.json`."""
    kind, _, size = spec.partition(":")
    if kind in ("wordpiece", "bpe") and size:
        return WordPieceTokenizer.from_corpus((d.text for d in documents), vocab_size_of(f"wordpiece:{size}"))
    path = Path(spec)
    if path.suffix == ".json" or (path / "tokenizer.json").is_file():
        from ..tokenizer import load_tokenizer

        tok = load_tokenizer(path)
    elif path.is_file() or (path / "vocab.txt").is_file():
        tok = WordPieceTokenizer.from_vocab_file(path)
    else:
        raise UserError(f"--tokenizer {spec!r}: an encoder needs wordpiece:VOCAB_SIZE, a vocab.txt, or a "
                        "WordPiece tokenizer.json")
    if not isinstance(tok, WordPieceTokenizer):
        raise UserError(f"--tokenizer {spec}: holds a {tok.name} tokenizer; an encoder needs a WordPiece one")
    return tok


def pretrain_mlm(cfg: TrainConfig, *, stop_after: int | None = None) -> tuple[Path, FitResult]:
    """Run (or resume) masked-LM pretraining of an encoder as described by a `TrainConfig`.

    Returns:
        `(run folder, FitResult)`.
    """
    for flag in ("time_budget", "gradient_checkpointing", "seq_len_warmup"):
        if getattr(cfg, flag):
            raise UserError(f"--{flag.replace('_', '-')} is not supported for an encoder yet (GPT pretraining only)")
    run = start_run(cfg, type(cfg).RESUME_FIXED + ("objective", "whole_word_masking"))
    rank, world, device, master, out, settings = run.rank, run.world, run.device, run.master, run.out, run.settings

    def load_data():
        if is_prepared_dir(cfg.data):
            raise UserError(f"--data {cfg.data}: token shards from `llmscratch prepare`, which masked-LM "
                            "pretraining does not read yet; pass the text (a file, folder or named corpus)")
        documents = load_text(cfg.data, encoding_errors=cfg.encoding_errors, progress=cfg.progress and master)
        if cfg.resume and (out / "tokenizer.json").is_file():
            tokenizer = build_wordpiece(str(out / "tokenizer.json"), documents)
        else:
            tokenizer = build_wordpiece(cfg.tokenizer, documents)
        model_cfg = BertConfig.from_name(cfg.model, vocab_size=tokenizer.vocab_size, dropout=cfg.dropout,
                                         pad_token_id=tokenizer.pad_id, **cfg.model_overrides())
        window = model_cfg.context_length - 2  # room for [CLS] and [SEP]
        ids, _ = token_ids(documents, tokenizer, source=str(cfg.data), progress=cfg.progress)
        if len(ids) < 2 * (window + 1):
            raise UserError(f"--data {cfg.data}: the corpus has {len(ids):,} tokens, too short for "
                            f"--context-length {model_cfg.context_length}; use more text or a shorter context")
        return (tokenizer, model_cfg, window, *split_train_val(ids, cfg.val_fraction, window))

    tokenizer, model_cfg, window, train_ids, val_ids = rank0_first(world, master, load_data)
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    masker = MaskedWindows(tokenizer, MaskingRule(whole_word=cfg.whole_word_masking))
    batches = MLMBatches(BatchSampler(train_ids, cfg.batch_size, window, seed=cfg.seed), cfg.grad_accum,
                         masker, cfg.seed)

    def make() -> Bert:
        model = Bert(model_cfg)
        # No next-sentence objective here, so nothing trains the pooler: frozen, it stays at its
        # init (fine-tuning trains it), and DDP sees no parameter without a gradient.
        model.pooler.requires_grad_(False)
        return model

    run_info = {"train": settings, "tokenizer_file": "tokenizer.json", "objective": "mlm"}
    model, amp = build_model(make, cfg, run, tokenizer, run_info)
    if master:
        print(f"encoder {cfg.model}: {model.num_params() / 1e6:.2f}M parameters, context "
              f"{model_cfg.context_length}, vocab {model_cfg.vocab_size} (wordpiece); masked LM on "
              f"{len(train_ids):,} tokens, validation {len(val_ids):,}; {batches.seen(1):,} tokens/step "
              f"on {world} x {device}{' with bf16 autocast' if amp else ''}")

    def evaluate_fn(m):
        return evaluate_mlm(m, val_ids, masker, cfg.batch_size, window, cfg.eval_batches, device, amp,
                            cfg.seed, rank, world)

    # validation runs without dropout and training with it: the gap is that, not a bug
    note = f"\nvalidation is below training: dropout {cfg.dropout:g} is on in training only" if cfg.dropout else ""
    loop = cfg.loop_settings(stop_after=stop_after, plot_title=f"{cfg.model} (masked LM) on {cfg.data}{note}",
                             desc="pretrain mlm")
    result = fit(model, Objective(mlm_loss, batches, evaluate_fn), loop, device=device, out=out,
                 settings=settings, rank=rank, world=world,
                 on_checkpoint=lambda step: save_model(model, out, tokenizer, extra=run_info))
    return out, result
