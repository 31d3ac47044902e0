"""Which kernel runs: measured on the machine at hand, once, and remembered.

A kernel that pays on one CPU can cost on another: the split matrix-vector linear doubles
batch-1 fp32 decoding on an AMD EPYC without AMX and halves it on an Intel Xeon with AMX
(issue 29). So no kernel is taken on the strength of a rule alone. Each kernel module asks
`choose(key, kernel, reference)` the first time it meets a shape class (dtype, weight
shape, rows or sequence length bucket); `choose` times the kernel and the reference
computation it replaces, interleaved over a few rounds (a few milliseconds, the best
round of each), and the kernel is used only if it is at least `MARGIN` faster.

Decisions are cached in memory and in `<cache>/kernels/<machine>.json` (the cache folder of
`data.corpora.cache_root`, `$LLMSCRATCH_CACHE_DIR` moves it), one file per CPU model + CPU
flags + torch version, so a model loaded again on the same machine measures nothing. Each
new measurement prints one line on stderr (`kernels: ...`); `decisions()` lists them.

Modes, set per kernel module by `apply_kernels(model, force=...)`:
- measured (the default): the kernel where `choose` measured it faster;
- forced (`force=True`, the CLI's explicit `--kernels`): every applicable kernel, no
  measurement;
- off: `apply_kernels` not called (`--no-kernels`): the reference model.
`LLMSCRATCH_KERNELS_MEASURE=0` turns measuring off: a shape class with no cached decision
then takes the reference computation (what a machine one cannot time should run).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

MARGIN = 0.05  # the kernel must be at least 5% faster than the reference to be chosen
ROUNDS = 5  # interleaved timing rounds per decision; the fastest round of each side counts
SAMPLE_SECONDS = 5e-4  # each timed sample repeats the call until it lasts about this long
ENV_MEASURE = "LLMSCRATCH_KERNELS_MEASURE"

_lock = threading.Lock()
_memory: dict[str, dict] = {}  # key -> decision, for this process
_loaded_from: Path | None = None


@functools.lru_cache(maxsize=1)
def _cpu() -> tuple[str, str]:
    """`(model name, sorted flags)` of the CPU, from /proc/cpuinfo where there is one."""
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def machine() -> dict:
    """What a decision depends on besides the shape: CPU model and flags, threads, torch."""
    model, flags = _cpu()
    return {"cpu": model, "flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
            "amx": "amx_tile" in flags.split(), "avx512_bf16": "avx512_bf16" in flags.split(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def cache_file() -> Path:
    """`<cache>/kernels/<hash of machine()>.json`: one file per machine and torch version."""
    from ..data.corpora import cache_root

    digest = hashlib.sha256(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "kernels" / f"{digest}.json"


def _load() -> None:
    """Read the machine's cache file into memory (once per file: tests move the cache)."""
    global _loaded_from
    path = cache_file()
    if _loaded_from == path:
        return
    _memory.clear()
    _loaded_from = path
    try:
        _memory.update(json.loads(path.read_text(encoding="utf-8"))["decisions"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no file yet, or a damaged one: measure again


def _save() -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"machine": machine(), "decisions": _memory}, indent=1, sort_keys=True),
                       encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: the decision still holds for this process


def time_pair(kernel: Callable[[], object], reference: Callable[[], object],
              rounds: int = ROUNDS) -> tuple[float, float]:
    """Seconds per call of `kernel` and `reference`: one warm-up call each, then `rounds`
    interleaved samples (kernel, reference, kernel, ...), each repeating the call until it
    lasts about `SAMPLE_SECONDS`; the fastest sample of each, as noise only adds time."""
    kernel()
    t0 = time.perf_counter()
    reference()
    once = max(time.perf_counter() - t0, 1e-7)
    number = max(1, min(1000, math.ceil(SAMPLE_SECONDS / once)))
    best = [math.inf, math.inf]
    for _ in range(rounds):
        for i, fn in enumerate((kernel, reference)):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            best[i] = min(best[i], (time.perf_counter() - t0) / number)
    return best[0], best[1]


def choose(key: str, kernel: Callable[[], object], reference: Callable[[], object]) -> bool:
    """Whether the kernel for shape class `key` is faster here than the reference.

    The first call for a key on a machine measures (`time_pair`), prints one line on stderr
    and caches the decision; later calls, in this process or another, read it.

    Args:
        key: names the kernel and the shape class, e.g. `"split_linear float32 768x3072 rows=1"`.
        kernel / reference: the two computations on representative inputs (no arguments).

    Returns:
        True when the kernel measured at least `MARGIN` faster.
    """
    with _lock:
        _load()
        if key in _memory:
            return bool(_memory[key]["use"])
        if os.environ.get(ENV_MEASURE, "1") == "0":
            return False
        with torch.no_grad():
            kernel_s, reference_s = time_pair(kernel, reference)
        use = kernel_s < (1 - MARGIN) * reference_s
        _memory[key] = {"use": use, "kernel_s": kernel_s, "reference_s": reference_s,
                        "speedup": reference_s / kernel_s if kernel_s > 0 else None}
        _save()
    print(f"kernels: {key}: {describe(key)}", file=sys.stderr)
    return use


def describe(key: str) -> str:
    """One line on the decision for `key`: which path, and the measured speed-up."""
    d = _memory.get(key)
    if d is None:
        return "not measured"
    speed = f"{d['speedup']:.2f}x the reference" if d.get("speedup") else "forced"
    return f"{'kernel' if d['use'] else 'reference'} ({speed}, measured on this machine)"


def decisions() -> dict[str, dict]:
    """Every decision known for this machine (cached or measured): key -> `use`,
    `kernel_s`, `reference_s`, `speedup`."""
    with _lock:
        _load()
        return {k: dict(v) for k, v in _memory.items()}


def forget(cache: bool = True) -> None:
    """Drop this process's decisions and, with `cache`, the machine's cache file too (every
    shape class is measured again); without it, the file is read again on the next use, as
    a new process would."""
    global _loaded_from
    with _lock:
        _memory.clear()
        _loaded_from = None
        if cache:
            try:
                cache_file().unlink()
            except OSError:
                pass
