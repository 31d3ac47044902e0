"""Fine-tuning: a pretrained GPT becomes a text classifier or an instruction follower.

- `classify`: classification head, balanced stratified splits, accuracy/F1/confusion.
- `instruct`: prompt templates (Alpaca, Phi-3), the masking collate, test-set responses.
- `lora`: low-rank adapters, merged into plain weights on save.
- `loop`: the one training loop both use.
"""

from .classify import ClassifyConfig, classify_texts, finetune_classify, load_classifier
from .loop import FinetuneConfig, fit
from .lora import LoRALinear, apply_lora, merge_lora

__all__ = [
    "ClassifyConfig",
    "FinetuneConfig",
    "LoRALinear",
    "apply_lora",
    "classify_texts",
    "finetune_classify",
    "fit",
    "load_classifier",
    "merge_lora",
]
