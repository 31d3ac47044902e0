"""llmscratch: a GPT-style language model built from scratch in PyTorch.

The package's folders are its layers, in import order (ARCHITECTURE.md): `tokenizer` ->
`data` -> `models` -> `kernels` -> `hf` -> `checkpoints` -> `decoding` -> `train` ->
`finetune` -> `evaluation` -> `serve` -> `cli`. This file is the public API above them.

Checkpoints from the top: `load_model(run_folder_hf_folder_or_preset)` gives `(model,
tokenizer)`; `load_hf` / `save_hf` read and write Hugging Face folders of every family.
"""

import os as _os

# How PyTorch's OpenMP (libgomp) threads wait between parallel regions: spin about 30k
# iterations, then sleep, instead of libgomp's 300k. Quiet, the speed is the same (decoding
# 0.92-1.10x, a training step 1.03x); on a machine where other jobs want the cores, a
# spinning thread holds the core the thread it waits for needs, and decoding ran 2-8x and
# training 2x faster with it (benchmarks/omp_wait.py, docs/benchmarks.md). libgomp reads
# this when torch is imported, so it applies only if llmscratch is imported first (as the
# CLI does); a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "30000")

from .errors import UserError  # noqa: E402  (after the thread setting: see above)
from .decoding.engine import Engine
from .decoding.generate import generate, stream_text
from .decoding.sampling import Sampling, sample
from .models.gpt import GPT, GPTConfig, lm_loss
from .tokenizer import BPETokenizer, GPT2Tokenizer, WordTokenizer, get_tokenizer, load_tokenizer
from .hf import load_hf, load_hf_gpt2, save_hf, save_hf_gpt2
from .checkpoints.run import load_model

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "GPTConfig",
    "BPETokenizer",
    "Engine",
    "GPT2Tokenizer",
    "WordTokenizer",
    "UserError",
    "generate",
    "get_tokenizer",
    "lm_loss",
    "load_hf",
    "load_hf_gpt2",
    "load_model",
    "load_tokenizer",
    "Sampling",
    "sample",
    "save_hf",
    "save_hf_gpt2",
    "stream_text",
]
