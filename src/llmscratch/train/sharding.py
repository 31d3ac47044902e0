"""FSDP2 for the training loop (`pretrain --strategy fsdp`): the model's parameters,
gradients and AdamW moments are split across the processes, each holding about 1/N.

`shard_model` applies `torch.distributed.fsdp.fully_shard` to every transformer block and
then to the whole model (the embeddings, final norm and head), so a block's full weights
exist only while it runs (all-gathered before, freed after; gradients reduce-scattered).
On a GPU with bf16 the blocks compute with bf16 copies of the weights and reduce gradients
in fp32 (`MixedPrecisionPolicy`), while the sharded fp32 weights stay the optimizer's
master copy. AdamW is then built on the sharded parameters (DTensors), so its moments are
sharded too.

Checkpoints are `torch.distributed.checkpoint` folders written by every process at once
(`save_sharded`, layout and completion rule in `checkpoints/sharded.py`); `load_sharded`
loads one into any number of processes (DCP reshards from the global shapes).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoints import sharded as ckpt
from ..errors import UserError
from ..utils import save_safetensors
from .state import rng_state, set_rng_state

STRATEGIES = ("ddp", "fsdp")


def require_launcher(strategy: str) -> None:
    """UserError unless `--strategy fsdp` runs under torchrun (which sets RANK and WORLD_SIZE)."""
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy must be ddp or fsdp, got {strategy!r}")
    if strategy == "fsdp" and "RANK" not in os.environ:
        raise UserError("--strategy fsdp shards the model across processes started by torchrun: run "
                        "`torchrun --nproc_per_node N -m llmscratch pretrain --strategy fsdp ...` (N may be 1)")


def shard_model(model: torch.nn.Module, device: torch.device, amp: torch.dtype | None) -> torch.nn.Module:
    """Apply FSDP2 in place: each block of `model.h`, then the root. Methods other than
    `forward` that the loop and evaluation call (`hidden_states`) get FSDP's hooks too. The
    mixed-precision policy (bf16 compute, fp32 gradient reduction) applies on CUDA with bf16
    only; on CPU the shards compute in fp32 (under autocast where that is on)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if device.type == "cuda" and amp == torch.bfloat16 else MixedPrecisionPolicy())
    for block in getattr(model, "h", []):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    if hasattr(model, "hidden_states"):
        register_fsdp_forward_method(model, "hidden_states")
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def local_bytes(model: torch.nn.Module, optimizer) -> dict[str, int]:
    """Bytes this process holds of the parameters, their gradients and the optimizer state
    (its shards under FSDP), and `full_params`: the bytes of the whole model's parameters."""
    params = list(model.parameters())
    out = {"params": sum(_local(p).numel() * p.element_size() for p in params),
           "grads": sum(_local(p.grad).numel() * p.grad.element_size() for p in params if p.grad is not None),
           "optimizer": sum(_local(v).numel() * v.element_size() for st in optimizer.state.values()
                            for v in st.values() if torch.is_tensor(v) and v.dim() > 0),
           "full_params": sum(p.numel() * p.element_size() for p in params)}
    return out


def _states(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _model_shapes(model_sd: dict) -> dict[str, list[int]]:
    return {f"model.{k}": list(v.shape) for k, v in model_sd.items() if torch.is_tensor(v)}


def save_sharded(out: Path, model, optimizer, step: int, seen: int, settings: dict | None,
                 rank: int, world: int) -> Path:
    """Every process writes its shard of the weights and optimizer state into a temporary
    folder; once all have, rank 0 adds the RNG state and the marker and renames it into
    place (`checkpoints.sharded.finish`). Call on every process."""
    import torch.distributed.checkpoint as dcp

    tmp = ckpt.temp_folder(out, step)
    if rank == 0:
        tmp.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = _states(model, optimizer)
    dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()  # every shard is on disk
    final = ckpt.step_folder(out, step)
    if rank == 0:
        save_safetensors(rng_state(), tmp / ckpt.RNG_FILE)
        marker = {"step": step, "seen": seen, "world": world, "settings": settings,
                  "shapes": _model_shapes(state["model"])}
        ckpt.finish(out, step, marker)
    dist.barrier()
    return final


def load_sharded(out: Path, model, optimizer) -> tuple[int, int]:
    """Load the latest complete sharded checkpoint of `out` into the sharded `model` and
    `optimizer` (built as for the saved run, on any number of processes) and the RNG.
    Returns `(step, seen)`.

    Raises:
        UserError: no complete checkpoint, or one of another model shape.
    """
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_state_dict

    folder = ckpt.latest_sharded(out)
    if folder is None:
        raise UserError(f"--resume: {out} holds no complete sharded checkpoint ({out / ckpt.SHARDED_DIR})")
    marker = ckpt.read_marker(folder)
    state = _states(model, optimizer)
    ckpt.check_shapes(folder, marker, {f"model.{k}": v for k, v in state["model"].items()})
    ckpt.read_shards(folder, lambda: dcp.load(state, checkpoint_id=str(folder)))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    set_rng_state(load_file(str(folder / ckpt.RNG_FILE)))
    return int(marker["step"]), int(marker["seen"])
