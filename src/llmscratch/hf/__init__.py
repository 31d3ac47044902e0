"""Hugging Face checkpoint folders, both ways: one module per family (`gpt2`, `llama`,
`bert`) on one shared reader and writer (`common`), in one table (`registry.HF_FAMILIES`)
that `load_hf` and `save_hf` dispatch on.

    model = load_hf("checkpoints/Qwen3-0.6B")   # by config.json's model_type
    save_hf(model, "export/qwen3")             # by the model's family

A new family is one module here whose `HFFamily` is listed in `registry.FAMILIES`.
"""

from .common import HFFamily, hf_model_type
from .registry import HF_FAMILIES, is_hf_dir, load_hf, register_hf_family, save_hf
from .gpt2 import load_hf_gpt2, save_hf_gpt2
from .llama import load_hf_llama, save_hf_llama
from .bert import load_hf_bert, save_hf_bert

__all__ = ["HF_FAMILIES", "HFFamily", "hf_model_type", "is_hf_dir", "load_hf", "load_hf_bert", "load_hf_gpt2",
           "load_hf_llama", "register_hf_family", "save_hf", "save_hf_bert", "save_hf_gpt2", "save_hf_llama"]
