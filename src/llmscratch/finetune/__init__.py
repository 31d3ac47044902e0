"""Fine-tuning: a pretrained GPT becomes a text classifier or an instruction follower.

- `classify`: classification head, `classification_loss`, `evaluate_classifier`,
  accuracy/F1/confusion, the classifier folder.
- `instruct`: the masking collate, `instruction_loss`, `evaluate_instruct`, test-set responses.
- `data`: reading labeled and instruction files; balanced, stratified splits.
- `lora`: low-rank adapters, merged into plain weights on save.
- `dpo`: preference tuning; `grpo` / `grpo_run` / `rewards`: reinforcement learning with
  verifiable rewards (GRPO) on tasks of `{prompt, answer}`.
- `common`: the shared settings and `fit_examples`, which runs both on the one training
  loop (`llmscratch.train.fit`): exact `--resume`, SIGTERM-safe checkpoints, DDP.
"""

from .classify import ClassifyConfig, classify_texts, finetune_classify, load_classifier
from .common import EpochBatches, FinetuneConfig, count_params, fit_examples, iter_batches
from .lora import LoRALinear, apply_lora, merge_lora

__all__ = [
    "ClassifyConfig",
    "EpochBatches",
    "FinetuneConfig",
    "LoRALinear",
    "apply_lora",
    "classify_texts",
    "count_params",
    "finetune_classify",
    "fit_examples",
    "iter_batches",
    "load_classifier",
    "merge_lora",
]
