"""Pretraining from a folder `llmscratch prepare` wrote (`--data PREPARED_DIR`).

The shards are memory-mapped (`data.shards.open_prepared`), the training split read as one
stream by the same seeded `BatchSampler` as a single `.bin` (a batch a pure function of
the seed and the step, so `--resume` continues the data position exactly), the validation
loss measured on the held-out documents' shards. The tokenizer is the folder's own
`tokenizer.json`, which the run folder saves like any other run's, so `generate` and `eval`
work on the run unchanged.
"""

from __future__ import annotations

from pathlib import Path

from ..data.shards import PreparedData, is_prepared_dir, open_prepared
from ..data.tokens import tokenizer_fingerprint
from ..errors import UserError

__all__ = ["is_prepared_dir", "prepared_splits", "prepared_tokenizer"]


def _check_tokenizer(cfg, data: PreparedData, out: Path):
    """The tokenizer of the run: the prepared folder's, which must be the one the run asks
    for (--tokenizer) and, on a resume, the one the run was trained with."""
    from ..tokenizer import get_tokenizer, load_tokenizer

    manifest = data.manifest["tokenizer"]
    where = data.folder / "manifest.json"
    if cfg.resume and (out / "tokenizer.json").is_file():
        own = tokenizer_fingerprint(load_tokenizer(out / "tokenizer.json"))
        if own != data.fingerprint:
            raise UserError(f"{where} was prepared with another tokenizer ({manifest['spec']}, fingerprint "
                            f"{data.fingerprint[:12]}) than the run in {out} was trained with ({own[:12]}); "
                            f"resume with the data it was trained on")
    elif cfg.tokenizer != manifest["spec"]:
        fingerprint = None
        if cfg.tokenizer == "gpt2" or Path(cfg.tokenizer).exists():
            fingerprint = tokenizer_fingerprint(get_tokenizer(cfg.tokenizer))
        if fingerprint != data.fingerprint:
            raise UserError(f"--tokenizer {cfg.tokenizer}: {where} was prepared with --tokenizer {manifest['spec']} "
                            f"({manifest['vocab_size']:,} ids); pass --tokenizer {manifest['spec']} "
                            f"(or {data.tokenizer_file})")
    tokenizer = load_tokenizer(data.tokenizer_file)
    if tokenizer_fingerprint(tokenizer) != data.fingerprint:
        raise UserError(f"{data.tokenizer_file} is not the tokenizer {where} was prepared with "
                        "(fingerprints differ); prepare the corpus again")
    return tokenizer


def prepared_tokenizer(cfg, out: Path, verify: bool = True) -> tuple:
    """`(tokenizer, PreparedData)` of the prepared folder `cfg.data` for the run in `out`
    (`verify`: check the shards' sha256; their sizes are always checked)."""
    data = open_prepared(cfg.data, verify=verify)
    return _check_tokenizer(cfg, data, Path(out)), data


def prepared_splits(data: PreparedData, cfg, context_length: int) -> tuple:
    """`(train_ids, val_ids, bytes_per_token)`: each split must hold a window of `context_length`."""
    need = context_length + 1
    if len(data.train) < need:
        raise UserError(f"--data {cfg.data}: the training split has {len(data.train):,} tokens, fewer than "
                        f"--context-length {context_length} + 1")
    if data.val is None or len(data.val) < need:
        have = 0 if data.val is None else len(data.val)
        raise UserError(f"--data {cfg.data}: the validation split has {have:,} tokens, fewer than one window of "
                        f"{need:,}; prepare it again with a larger --val-fraction")
    return data.train, data.val, data.bytes_per_token("val")
