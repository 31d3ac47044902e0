"""What a run keeps on disk to resume exactly: the train state file and the metrics file.

`train_state.safetensors` is one self-contained file written atomically (a kill at any
moment leaves the previous good checkpoint): the model's weights, AdamW's moments, the RNG
state (dropout), the step, how many tokens or examples were seen, and the run's settings.
Batches are a pure function of the step (see `loop.BatchSource`), so with these a resumed
run continues exactly where the stopped one was.

`metrics.jsonl` has one JSON record per step; a resumed run first cuts it back to the
checkpoint's step, then logs the later steps again.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoints.run import model_state
from ..checkpoints.sharded import latest_sharded, read_marker
from ..errors import UserError
from ..utils import atomic_write, load_safetensors, save_safetensors

STATE_FILE = "train_state.safetensors"
METRICS_FILE = "metrics.jsonl"


def rng_state() -> dict[str, torch.Tensor]:
    """The global torch RNG states (CPU, and every CUDA device), as named tensors."""
    state = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"rng.cuda.{i}"] = s
    return state


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def save_train_state(out: Path, model: torch.nn.Module, optimizer, step: int, seen: int,
                     settings: dict | None = None) -> None:
    """Write `out/train_state.safetensors`: weights, AdamW moments, RNG, step, settings."""
    weights = model_state(model) if hasattr(model, "config") else {
        k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}  # any nn.Module
    tensors = {f"model.{k}": v for k, v in weights.items()}
    opt_sd = optimizer.state_dict()
    for idx, st in opt_sd["state"].items():
        for key, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{idx}.{key}"] = t.detach().to("cpu").contiguous()
    tensors.update(rng_state())
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
              for g in opt_sd["param_groups"]]
    meta = {"step": str(step), "seen": str(seen), "param_groups": json.dumps(groups)}
    if settings is not None:
        meta["settings"] = json.dumps(settings)
    save_safetensors(tensors, out / STATE_FILE, metadata=meta)


def _metadata(out: Path) -> dict[str, str]:
    try:
        with safe_open(str(out / STATE_FILE), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # SafetensorError: a truncated or foreign file
        raise UserError(f"{out / STATE_FILE}: not a readable safetensors file ({e})") from None


def load_train_state(out: Path, model: torch.nn.Module, optimizer) -> tuple[int, int]:
    """Restore what `save_train_state` wrote into `model` and `optimizer` (built exactly as
    for the saved run), and the RNG. Returns `(step, seen)`."""
    meta = _metadata(out)
    tensors = load_safetensors(out / STATE_FILE)
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if getattr(getattr(model, "config", None), "tie_weights", False):
        weights["lm_head.weight"] = weights["wte.weight"]
    for key, source in getattr(model, "tied_weights", {}).items():  # an encoder's tied decoder
        weights[key] = weights[source]
    model.load_state_dict(weights)
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    set_rng_state(tensors)
    # "tokens_seen": checkpoints written before fine-tuning shared this loop
    return int(meta["step"]), int(meta.get("seen", meta.get("tokens_seen", 0)))


def has_checkpoint(out: Path) -> bool:
    """Whether run folder `out` holds a checkpoint to resume: `train_state.safetensors`, or
    a complete sharded one (an FSDP run's, `checkpoints/sharded.py`)."""
    return (Path(out) / STATE_FILE).is_file() or latest_sharded(out) is not None


def saved_run(out: Path) -> tuple[dict, int]:
    """`(settings, step)` of the checkpoint in `out`: the settings the run was started with
    and the last step it finished.

    Raises:
        UserError: no checkpoint in `out`.
    """
    if not (Path(out) / STATE_FILE).is_file():
        sharded = latest_sharded(out)
        if sharded is None:
            raise UserError(f"--resume: {out} holds no checkpoint ({STATE_FILE} or a complete sharded one)")
        marker = read_marker(sharded)
        return marker.get("settings") or {}, int(marker["step"])
    meta = _metadata(Path(out))
    saved_json = meta.get("settings")
    if saved_json is not None:
        saved = json.loads(saved_json)
    else:  # an older pretraining checkpoint: the settings are in config.json
        from ..checkpoints.run import read_run_config

        saved = read_run_config(out).get("train", {})
    return saved, int(meta.get("step", 0))


def check_resume(out: Path, settings: dict, fixed: tuple[str, ...]) -> None:
    """Refuse to resume the run in `out` if any setting in `fixed` changed since it started.

    Raises:
        UserError: no checkpoint in `out`, or the list of changed settings.
    """
    saved, _ = saved_run(out)
    diff = [f"{k} ({saved.get(k)!r} -> {settings[k]!r})" for k in fixed
            if k in saved and k in settings and saved[k] != settings[k]]
    if diff:
        raise UserError(f"--resume: the run in {out} was started with different settings: "
                        + ", ".join(diff))


def append_metrics(path: Path, record: dict) -> None:
    """Append one record to a metrics.jsonl file."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path, up_to_step: int) -> list[dict]:
    """The records of `path` up to `up_to_step`, rewriting the file to just those (a
    resumed run logs the later steps again). Lines cut by a kill are dropped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= up_to_step:
            records.append(rec)
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records
