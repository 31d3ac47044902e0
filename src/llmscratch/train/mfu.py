"""How much of the hardware a run uses (MFU), and the experiment trackers beside `metrics.jsonl`.

MFU (model FLOPs utilization, PaLM's appendix B): the FLOPs the model needs per token
(`GPT.flops_per_token`: 6 per weight for forward + backward, plus attention's 12·L·C·T)
times the tokens per second, over what the devices could do at their peak:

    mfu = flops_per_token * tokens_per_s / (peak_flops_per_device * processes)

Only the model's arithmetic counts, not what recomputation (gradient checkpointing) or
padding adds, so MFU compares runs and codebases fairly. A GPU's peak is its dense
(no sparsity) bf16 tensor-core figure from the vendor's datasheet (`GPU_PEAK_TFLOPS`; the
usual yardstick, also for fp32 runs with TF32 matmuls); a GPU not in the table can be
given with the `LLMSCRATCH_PEAK_TFLOPS` environment variable. A CPU has no datasheet
figure we can trust, so its peak is measured: the best of a few fp32 (or bf16, when the
run autocasts to it) 1024×1024 matmuls at the current thread count, once per process
(~0.1 s), cached for the process's life.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from pathlib import Path

import torch

from ..errors import UserError

# Dense bf16 tensor-core peaks in TFLOPS (datasheets; "with sparsity" figures halved).
GPU_PEAK_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100 SXM": 989.0,  # also "H100 80GB HBM3"
    "H100 PCIE": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,  # AWS; the A10 is 125
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,  # fp16 (no bf16)
    "T4": 65.0,  # fp16 (no bf16)
}


def gpu_peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of the GPU called `name` (as `torch.cuda.get_device_name`
    gives it), or None if it is not in `GPU_PEAK_TFLOPS`."""
    up = name.upper()
    if "H100" in up:
        if "PCIE" in up:
            return GPU_PEAK_TFLOPS["H100 PCIE"]
        return GPU_PEAK_TFLOPS["H100 NVL"] if "NVL" in up else GPU_PEAK_TFLOPS["H100 SXM"]
    # longest names first: "A10G" before "A10", "L40S" before "L4"
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if key in up:
            return GPU_PEAK_TFLOPS[key]
    return None


@functools.cache
def measured_matmul_flops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` `n`×`n` matmuls on the CPU at the current thread
    count: the CPU's practical peak. Cached per process."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def device_peak_flops(device: torch.device, amp: torch.dtype | None = None) -> float | None:
    """Peak FLOP/s of one `device`: `LLMSCRATCH_PEAK_TFLOPS` if set, a GPU's datasheet
    figure, a CPU's measured matmul rate (in the autocast dtype); None if unknown."""
    if os.environ.get("LLMSCRATCH_PEAK_TFLOPS"):
        try:
            return float(os.environ["LLMSCRATCH_PEAK_TFLOPS"]) * 1e12
        except ValueError:
            raise UserError(f"LLMSCRATCH_PEAK_TFLOPS={os.environ['LLMSCRATCH_PEAK_TFLOPS']!r}: expected a "
                            "number (the device's peak in TFLOPS)") from None
    if device.type == "cuda":
        tflops = gpu_peak_tflops(torch.cuda.get_device_name(device))
        return tflops * 1e12 if tflops else None
    if device.type == "cpu":
        state = torch.get_rng_state()  # measuring must not move the training RNG (exact resume)
        try:
            return measured_matmul_flops(amp or torch.float32)
        finally:
            torch.set_rng_state(state)
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float, devices: int = 1) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over `devices` × `peak_flops`."""
    return flops_per_token * tokens_per_s / (peak_flops * devices)


# ------------------------------------------------------------------------------ trackers


class TensorBoardTracker:
    """Every numeric field of each metrics record as a TensorBoard scalar at its step, in
    `out/tensorboard` (`tensorboard --logdir OUT/tensorboard`). A resume purges the events
    after its step, as `metrics.jsonl` is cut back."""

    def __init__(self, folder: Path, step: int):
        try:
            with warnings.catch_warnings():  # tensorboard's import trips torch's deprecation warnings
                warnings.simplefilter("ignore", DeprecationWarning)
                from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--logger tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(str(folder), purge_step=step + 1 if step else None)

    def log(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


def open_tracker(logger: str, out: Path | None, step: int):
    """The tracker `logger` names for run folder `out` (None for "none" or no folder)."""
    if logger == "none" or out is None:
        return None
    if logger == "tensorboard":
        return TensorBoardTracker(Path(out) / "tensorboard", step)
    raise UserError(f"--logger must be none or tensorboard, got {logger!r}")
