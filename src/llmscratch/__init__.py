"""llmscratch: a GPT-style language model built from scratch in PyTorch.

The package follows the pipeline: `tokenizer` -> `data` / `datasets` -> `attention` ->
`model` -> `train` -> `generate` -> `weights` (GPT-2 checkpoints) -> `cli`.
"""

from .errors import UserError
from .decoding.engine import Engine
from .decoding.generate import generate, stream_text
from .decoding.sampling import Sampling, sample
from .models.gpt import GPT, GPTConfig, lm_loss
from .tokenizer import BPETokenizer, GPT2Tokenizer, WordTokenizer, get_tokenizer, load_tokenizer
from .hf.decoders import load_hf_gpt2, save_hf_gpt2

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
    "load_hf_gpt2",
    "load_tokenizer",
    "Sampling",
    "sample",
    "save_hf_gpt2",
    "stream_text",
]
