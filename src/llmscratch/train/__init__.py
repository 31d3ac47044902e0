"""Training: one loop (`loop.fit`) that every objective runs, and pretraining on it.

- `settings.py`: `RunConfig` (the settings pretraining and fine-tuning share, with their
  checks) and `LoopSettings` (what `fit` reads).
- `config.py`: `TrainConfig` (the pretraining settings) and the schedule `get_lr`.
- `loop.py`: `fit(model, Objective(loss, batches, evaluate), settings, ...)`: AdamW, schedule,
  accumulation, clipping, autocast, DDP, checkpoints, Ctrl-C/SIGTERM, metrics, the plot.
- `state.py`: the resume file (weights, optimizer, RNG, step) and `metrics.jsonl`.
- `pretrain.py`: the language-model objective, its data, and `pretrain(cfg)`.

Fine-tuning (`llmscratch.finetune`) runs its objectives on the same `fit`.
"""

from .config import TrainConfig, get_lr
from .loop import (
    BatchSource,
    FitResult,
    Objective,
    StopFlag,
    autocast_dtype,
    configure_optimizer,
    distributed_setup,
    fit,
    plot_losses,
    rank0_first,
)
from .pretrain import (
    LMBatches,
    TrainResult,
    build_tokenizer,
    evaluate,
    evaluate_pretraining,
    lm_train_loss,
    metrics_from_loss,
    prepare_data,
    pretrain,
)
from .settings import LoopSettings, RunConfig
from .state import check_resume, load_train_state, save_train_state

__all__ = [
    "BatchSource",
    "FitResult",
    "LMBatches",
    "LoopSettings",
    "Objective",
    "RunConfig",
    "StopFlag",
    "TrainConfig",
    "TrainResult",
    "autocast_dtype",
    "build_tokenizer",
    "check_resume",
    "configure_optimizer",
    "distributed_setup",
    "evaluate",
    "evaluate_pretraining",
    "fit",
    "get_lr",
    "lm_train_loss",
    "load_train_state",
    "metrics_from_loss",
    "plot_losses",
    "prepare_data",
    "pretrain",
    "rank0_first",
    "save_train_state",
]
