"""Which kernel runs: measured on the machine at hand, once, and remembered.

A kernel that pays on one CPU can cost on another: the split matrix-vector linear doubles
batch-1 fp32 decoding on an AMD EPYC without AMX and halves it on an Intel Xeon with AMX
(issue 29). So no kernel is taken on the strength of a rule alone. Each kernel module asks
`choose(key, kernel, reference)` the first time it meets a shape class (dtype, weight
shape, rows or sequence length bucket); `choose` times the kernel and the reference
computation it replaces, interleaved over a few rounds (a few milliseconds), and the kernel
is used only if it is at least `MARGIN` faster by the best round of each and by the median
of the per-round ratios (`kernel_wins`).

Decisions are cached in memory and in `<cache>/kernels/<machine>.json` (the cache folder of
`data.corpora.cache_root`, `$LLMSCRATCH_CACHE_DIR` moves it), one file per CPU model + CPU
flags + torch version, so a model loaded again on the same machine measures nothing (a
decision measured while the machine was `busy` is kept for the process only). Each
new measurement prints one line on stderr (`kernels: ...`); `decisions()` lists them.

Modes, set per kernel module by `apply_kernels(model, force=...)`:
- measured (the default): the kernel where `choose` measured it faster;
- forced (`force=True`, the CLI's explicit `--kernels`): every applicable kernel, no
  measurement;
- off: `apply_kernels` not called (`--no-kernels`): the reference model.
A training run records the decisions it takes in its run folder (`record_run`,
`kernels.json`) and a resume adopts them, whatever the cache holds by then.
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
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

MARGIN = 0.05  # the kernel must be at least 5% faster than the reference to be chosen
ROUNDS = 7  # interleaved timing rounds per decision
SAMPLE_SECONDS = 1e-3  # each timed sample repeats the call until it lasts about this long
MEASURE_SECONDS = 3.0  # a slow pair (a training step's loss at its real size) gets fewer rounds
MIN_ROUNDS = 3
ENV_MEASURE = "LLMSCRATCH_KERNELS_MEASURE"
KERNELS_FILE = "kernels.json"  # a run folder's record of the decisions its training took

_lock = threading.Lock()
_memory: dict[str, dict] = {}  # key -> decision, for this process
_loaded_from: Path | None = None
_pinned: dict[str, dict] = {}  # key -> decision a run folder holds: wins over cache and measuring
_record: Path | None = None  # where the decisions taken in this process are written


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


@functools.lru_cache(maxsize=1)
def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache (L3 usually), from sysfs; 32 MiB where unknown."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip().upper()
            units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
            best = max(best, int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size))
        except (OSError, ValueError):
            continue
    return best or 32 << 20


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
    _memory.update(_read_decisions(path))  # none (no file yet, or a damaged one): measure again


def _read_decisions(path: Path) -> dict[str, dict]:
    """The well-formed decisions in the JSON file `path` (a cache file or a run's
    `kernels.json`): entries that are not an object with a boolean `use` and numeric
    `speedup` / `speedup_median` are dropped (measured again), as is a missing, unreadable
    or damaged file (an empty dict)."""
    try:
        held = json.loads(path.read_text(encoding="utf-8"))["decisions"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return {}
    if not isinstance(held, dict):
        return {}

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    return {k: v for k, v in held.items()
            if isinstance(v, dict) and isinstance(v.get("use"), bool)
            and number(v.get("speedup")) and number(v.get("speedup_median"))}


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
              rounds: int = ROUNDS) -> tuple[list[float], list[float]]:
    """Seconds per call of `kernel` and of `reference`, one sample per round: one warm-up call
    each, then `rounds` interleaved samples (kernel, reference, kernel, ...), each repeating
    the call until it lasts about `SAMPLE_SECONDS`; pairs whose single calls are slow get
    fewer rounds (at least `MIN_ROUNDS`), so that a decision costs about `MEASURE_SECONDS`.

    Returns:
        `(kernel samples, reference samples)`, in round order.
    """
    kernel()
    t0 = time.perf_counter()
    reference()
    once = max(time.perf_counter() - t0, 1e-7)
    number = max(1, min(1000, math.ceil(SAMPLE_SECONDS / once)))
    # a pair whose calls take long (the fused loss measured at a training step's real size)
    # gets fewer rounds, so one decision costs at most about MEASURE_SECONDS
    rounds = max(min(rounds, MIN_ROUNDS), min(rounds, int(MEASURE_SECONDS / (2 * once * number))))
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for fn, out in ((kernel, samples[0]), (reference, samples[1])):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            out.append((time.perf_counter() - t0) / number)
    return samples


def kernel_wins(kernel_s: list[float], reference_s: list[float]) -> dict:
    """The decision from interleaved samples: the kernel is used only if it is at least
    `MARGIN` faster both by the fastest sample of each side (noise only adds time) and by
    the median of the per-round ratios (a burst of load that hit one side's fastest sample
    does not decide alone)."""
    best = min(reference_s) / min(kernel_s)
    paired = statistics.median(r / k for k, r in zip(kernel_s, reference_s))
    need = 1 / (1 - MARGIN)
    return {"use": best >= need and paired >= need, "kernel_s": min(kernel_s), "reference_s": min(reference_s),
            "speedup": best, "speedup_median": paired, "load": round(os.getloadavg()[0], 2)
            if hasattr(os, "getloadavg") else None}


def busy(load: float | None) -> bool:
    """Whether the machine was too busy for a measurement to stand for it: a 1-minute load
    average above its core count. Such a decision holds for this process only (it is not
    written to the cache file), and the next process measures again."""
    return load is not None and load > (os.cpu_count() or 1)


def isolated_rng(device: torch.device):
    """A block whose use of the global random generators is undone when it ends.

    The inputs a measurement times a kernel on are random, and a measurement happens at the
    first forward pass of a shape class: in a fresh run at step 0, in a resumed one at the
    resume step. Drawing them from the training RNG would shift every later dropout mask,
    and a resumed run would no longer end where an uninterrupted one ends.
    """
    if device.type == "cpu":  # the CPU generator is always forked
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device.index or 0], device_type=device.type)


def choose(key: str, kernel: Callable[[], object], reference: Callable[[], object]) -> bool:
    """Whether the kernel for shape class `key` is faster here than the reference.

    The first call for a key on a machine measures (`time_pair`, `kernel_wins`), prints one
    line on stderr and caches the decision; later calls, in this process or another, read it
    (unless the machine was `busy` while measuring: then in this process only).

    Args:
        key: names the kernel and the shape class, e.g. `"split_linear float32 768x3072 rows=1"`.
        kernel / reference: the two computations on representative inputs (no arguments).

    Returns:
        True when the kernel measured at least `MARGIN` faster.
    """
    with _lock:
        _load()
        if key in _pinned:
            _memory[key] = _pinned[key]
        if key in _memory:
            _write_record(key)
            return bool(_memory[key]["use"])
        if os.environ.get(ENV_MEASURE, "1") == "0":
            return False
        with torch.no_grad():
            decision = kernel_wins(*time_pair(kernel, reference))
        _memory[key] = decision
        if not busy(decision["load"]):
            _save()
        _write_record(key)
    print(f"kernels: {key}: {describe(key)}", file=sys.stderr)
    return decision["use"]


def record_run(path: Path | None, pin: bool = False, write: bool = True) -> None:
    """Write every decision this process takes from now on into the JSON file `path` (a
    run folder's `kernels.json`; not with `write=False`: the other ranks of a distributed
    run); with `pin`, first adopt the decisions already in it, so a
    resumed run takes the very paths the interrupted one took (a decision measured on a
    busy machine is not cached, and measuring again could choose otherwise: the float
    rounding, and so the resumed losses, would differ). None stops recording."""
    global _record
    with _lock:
        _record = path if write else None
        _pinned.clear()
        if path is not None and pin:
            _pinned.update(_read_decisions(path))  # none: a run from before kernels.json, or damaged


def _write_record(key: str) -> None:
    if _record is None:
        return
    held = _read_decisions(_record)
    if held.get(key) == _memory[key]:
        return
    held[key] = _memory[key]
    try:
        tmp = _record.with_name(f"{_record.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"machine": machine(), "decisions": held}, indent=1, sort_keys=True),
                       encoding="utf-8")
        os.replace(tmp, _record)
    except OSError:
        pass


def describe(key: str) -> str:
    """One line on the decision for `key`: which path, and the measured speed-up."""
    d = _memory.get(key)
    if d is None:
        return "not measured"
    busy_note = ", busy: not cached" if busy(d.get("load")) else ""
    return (f"{'kernel' if d['use'] else 'reference'} ({d['speedup']:.2f}x the reference's speed, "
            f"median {d['speedup_median']:.2f}x; measured on this machine at load {d.get('load')}{busy_note})")


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
    global _loaded_from, _record
    with _lock:
        _memory.clear()
        _pinned.clear()
        _record = None
        _loaded_from = None
        if cache:
            try:
                cache_file().unlink()
            except OSError:
                pass
