"""The glibc malloc setting for training: keep freed memory for reuse.

Not a module swap like the other kernels but a process-wide allocator setting, applied
by the commands that train or benchmark (`llmscratch pretrain`, `finetune`, `bench`)
before any tensor is allocated. `LLMSCRATCH_MALLOC=system` keeps glibc's default.
"""

from __future__ import annotations

import os


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees the same large buffers every time (the LM head's
    logits and weight gradient, the bf16 copies of the weights). glibc serves every
    allocation above its mmap threshold (at most 32 MB) with a fresh `mmap` and unmaps it on
    `free`, so each step page-faults those buffers in again and the kernel zeroes every page.
    Measured on the development CPU, that was about a quarter of a bf16 gpt2-124m training
    step, for llmscratch and transformers alike (compare `benchmarks/bench_train.py` with and
    without `LLMSCRATCH_MALLOC=system`).

    With mmap off and trimming raised, freed blocks stay in the heap and are reused, which
    is what PyTorch's CUDA caching allocator does on GPUs and what jemalloc or tcmalloc
    (`LD_PRELOAD`) do for CPU training. The cost: memory freed during training is not
    returned to the OS before the process ends (`release_freed_memory` hands it back).

    Applies to the whole process, Linux with glibc only; set `LLMSCRATCH_MALLOC=system` to
    keep the default. The training, fine-tuning and bench commands call it.

    Returns:
        Whether the setting was applied.
    """
    import sys

    if os.environ.get("LLMSCRATCH_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**30))


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc `malloc_trim`): after
    `reuse_freed_memory`, a process otherwise keeps its peak size until it exits. No-op
    where glibc is not there."""
    malloc_trim = _glibc("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def _glibc(name: str):
    """A function of the C library by name, or None where the library or the function is
    missing (not Linux, or not glibc: musl has no mallopt)."""
    import ctypes
    import ctypes.util

    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
