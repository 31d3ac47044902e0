"""From text to training batches: token storage, then batch samplers.

The path from text to batches:

1. `tokens.py`: `tokenize_to_bin(documents, tokenizer)` encodes the corpus once into a flat
   binary file of token ids, cached by content; `load_bin` maps it back as a read-only
   memmap; `token_ids` does both (and counts bytes per token); `split_train_val` cuts a
   training head and a validation tail.
2. `batches.py`: `SlidingWindowDataset` / `create_dataloader` (the book's sliding windows,
   through a torch DataLoader, for reading and notebooks) and `BatchSampler` (what the
   training loop uses: each batch a pure function of (seed, step), so resuming and
   multi-GPU sharding are exact); `iter_eval_batches` for a validation loss.
3. `ids.py`: the checks and reads on 1-D token ids both of them share.

For a corpus larger than memory, `prepare.py` (`llmscratch prepare`) streams it (`sources.py`)
into fixed-size token shards with a manifest, and `shards.py` reads them back
(`open_prepared`) as `ShardedTokens`, which the samplers take like one array.

Every name is importable from `llmscratch.data` directly.
"""

from .batches import BatchSampler, SlidingWindowDataset, create_dataloader, iter_eval_batches
from .prepare import PrepareConfig  # the function is `prepare.prepare` (the name is the module's)
from .shards import ShardedTokens, open_prepared
from .tokens import load_bin, split_train_val, token_ids, tokenize_to_bin

__all__ = [
    "BatchSampler",
    "PrepareConfig",
    "ShardedTokens",
    "SlidingWindowDataset",
    "create_dataloader",
    "iter_eval_batches",
    "load_bin",
    "open_prepared",
    "split_train_val",
    "token_ids",
    "tokenize_to_bin",
]
