"""The start every pretraining run shares, whatever its objective (`pretrain.py` next-token,
`mlm.py` masked-LM): settings checked, processes set up, a fresh run or a resumable one
told apart, seeds set; then the model built, its kernels applied and its first weights
saved, so the run folder loads from step 0."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..checkpoints.run import save_model
from ..errors import UserError
from ..kernels import apply_kernels
from ..kernels.choice import KERNELS_FILE, record_run
from ..utils import seed_everything
from .config import TrainConfig
from .loop import autocast_dtype, distributed_setup
from .state import check_resume, has_checkpoint


@dataclass
class RunStart:
    rank: int
    world: int
    device: torch.device
    out: Path
    settings: dict
    """the config as a dict: what the checkpoints and config.json store"""

    @property
    def master(self) -> bool:
        return self.rank == 0


def start_run(cfg: TrainConfig, resume_fixed: tuple[str, ...]) -> RunStart:
    """Validate `cfg`, set up the processes and seed. A resume must keep every setting in
    `resume_fixed`; a fresh run must not land on another run's checkpoint (UserError)."""
    cfg.validate()
    rank, world, device = distributed_setup(cfg.device, getattr(cfg, "strategy", "ddp"))
    out = Path(cfg.out)
    settings = cfg.settings()
    if cfg.resume:
        check_resume(out, settings, resume_fixed)
    elif has_checkpoint(out):
        raise UserError(f"{out} already holds a run; pass --resume to continue it, or pick another --out")
    seed_everything(cfg.seed)
    return RunStart(rank, world, device, out, settings)


def build_model(make: Callable[[], nn.Module], cfg: TrainConfig, run: RunStart, tokenizer, run_info: dict
                ) -> tuple[nn.Module, torch.dtype | None]:
    """`make()` seeded by `cfg.seed` and moved to the run's device, with the kernels if
    `cfg.kernels`; a fresh run saves it (with `tokenizer` and `run_info`) before its first
    step. Returns `(model, autocast dtype or None)`."""
    torch.manual_seed(cfg.seed)
    model = make().to(run.device)
    if cfg.kernels:
        apply_kernels(model)
        # the paths taken are kept with the run, and a resume takes the same ones
        record_run(run.out / KERNELS_FILE, pin=cfg.resume, write=run.master)
    else:
        record_run(None)
    if run.master and not cfg.resume:
        save_model(model, run.out, tokenizer, extra=run_info)
    return model, autocast_dtype(cfg.precision, run.device)
