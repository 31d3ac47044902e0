"""Sharded checkpoints on disk: where they live, when one is complete, and turning the
latest into a run folder's `model.safetensors` (`consolidate`).

An FSDP run (`pretrain --strategy fsdp`) checkpoints with `torch.distributed.checkpoint`
(DCP): every process writes its own shard of the weights and AdamW's moments, nothing is
gathered to one process (`train/sharding.py` writes them). The layout in a run folder:

    sharded/step-00000040/       one complete checkpoint (DCP files: .metadata, __0_0.distcp, ...)
        COMPLETE.json            written last: step, seen, settings, tensor shapes, process count
        rng.safetensors          rank 0's RNG state (dropout), which every rank restores
    sharded/.tmp-step-00000080/  a checkpoint being written (or left by a kill: never loaded)

A checkpoint is written into a `.tmp-` folder, its `COMPLETE.json` last, then renamed into
place; only a `step-` folder holding `COMPLETE.json` is ever loaded, so a process killed
mid-write leaves the previous checkpoint in charge. DCP stores each tensor with its global
shape, so a checkpoint written by N processes loads into M.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from ..errors import UserError
from ..models.bert import Bert, BertConfig, is_encoder_config
from ..models.gpt import GPT, GPTConfig
from ..utils import save_safetensors
from .run import model_state, read_run_config

SHARDED_DIR = "sharded"
MARKER = "COMPLETE.json"
RNG_FILE = "rng.safetensors"
_PREFIX, _TMP = "step-", ".tmp-step-"


def step_folder(out: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of `step` lives once complete."""
    return Path(out) / SHARDED_DIR / f"{_PREFIX}{step:08d}"


def temp_folder(out: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of `step` is written before it is complete."""
    return Path(out) / SHARDED_DIR / f"{_TMP}{step:08d}"


def latest_sharded(out: str | os.PathLike) -> Path | None:
    """The complete sharded checkpoint of the highest step in run folder `out`, or None.
    Folders without their `COMPLETE.json` (a write cut short) are passed over."""
    root = Path(out) / SHARDED_DIR
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / MARKER).is_file()]
    return max(done, key=lambda p: p.name) if done else None


def read_marker(folder: str | os.PathLike) -> dict:
    """The `COMPLETE.json` of a sharded checkpoint folder (UserError if absent or unreadable)."""
    path = Path(folder) / MARKER
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder}: not a complete sharded checkpoint (no {MARKER})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def finish(out: str | os.PathLike, step: int, marker: dict) -> Path:
    """Complete the checkpoint written into `temp_folder(out, step)`: write its marker, rename
    it into place, then delete the older checkpoints and any leftover temporary folders.
    Called by one process, after every process has written its shard."""
    tmp, final = temp_folder(out, step), step_folder(out, step)
    (tmp / MARKER).write_text(json.dumps(marker), encoding="utf-8")
    if final.exists():  # the same step saved again (a resume that stops where it started)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for p in (Path(out) / SHARDED_DIR).iterdir():
        if p != final and p.name.startswith((_PREFIX, _TMP)):
            shutil.rmtree(p, ignore_errors=True)
    return final


def remove_stale(out: str | os.PathLike) -> None:
    """Delete the temporary checkpoint folders a killed process left in run folder `out`."""
    root = Path(out) / SHARDED_DIR
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(_TMP):
                shutil.rmtree(p, ignore_errors=True)


def check_shapes(folder: Path, marker: dict, state: dict[str, torch.Tensor], what: str = "model") -> None:
    """UserError naming the first tensor whose shape in checkpoint `folder` differs from
    `state`'s (its global shape), or a tensor one has and the other lacks."""
    saved = marker.get("shapes", {})
    for key, t in state.items():
        if key not in saved:
            raise UserError(f"{folder}: the checkpoint holds no {key}; it was written for another {what}")
        if list(saved[key]) != list(t.shape):
            raise UserError(f"{folder}: {key} has shape {tuple(saved[key])} in the checkpoint, the {what} "
                            f"needs {tuple(t.shape)} (a checkpoint of another model shape)")


def read_shards(folder: Path, load):
    """`load()` (a DCP load from `folder`), a missing or damaged shard file becoming one
    UserError naming the folder. Every process reads the same files, so all fail alike."""
    try:
        return load()
    except BaseException as e:  # DCP's CheckpointException (wrapping the reader's error) is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        first = str(e).strip().splitlines()
        detail = next((line.strip() for line in first if "Error" in line or "error" in line), first[0] if first else "")
        raise UserError(f"{folder}: a shard of this checkpoint is missing or damaged ({type(e).__name__}: "
                        f"{detail[:200]})") from None


def consolidate(run: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> Path:
    """Write `model.safetensors` of run folder `run` from a sharded checkpoint (default: its
    latest complete one), so `generate`, `eval`, `convert` and fine-tuning load it. Reads
    the shards from disk in this one process (no process group needed). Returns the path.

    Raises:
        UserError: not a run folder, no complete sharded checkpoint, or one of another shape.
    """
    import torch.distributed.checkpoint as dcp

    run = Path(run)
    folder = Path(checkpoint) if checkpoint is not None else latest_sharded(run)
    if folder is None:
        raise UserError(f"{run}: no complete sharded checkpoint in {run / SHARDED_DIR}")
    marker = read_marker(folder)
    cfg = read_run_config(run)
    model_class, config_class = (Bert, BertConfig) if is_encoder_config(cfg.get("model")) else (GPT, GPTConfig)
    try:
        model = model_class(config_class.from_dict(cfg["model"]))  # every weight is overwritten below
    except (KeyError, TypeError) as e:
        raise UserError(f"{run / 'config.json'}: bad \"model\" section ({e})") from None
    weights = model_state(model)  # a tied head left out: it is the embedding
    check_shapes(folder, marker, {f"model.{k}": v for k, v in weights.items()})
    state = {"model": weights}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore")
        read_shards(folder, lambda: dcp.load(state, checkpoint_id=str(folder), no_dist=True))
    path = run / "model.safetensors"
    save_safetensors({k: v.contiguous() for k, v in state["model"].items()}, path, metadata={"format": "pt"})
    return path
