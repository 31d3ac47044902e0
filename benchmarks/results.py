"""Where benchmark figures live: one JSON per run under `benchmarks/results/`, stamped with
the command, the machine, its CPU flags, the torch version and the date.

Every figure the README quotes comes from such a file, so a reader can see what produced it
and on what hardware (machines of one kind still differ: AMX or only AVX512-BF16 changes
bf16 speed by 2x). Compare only figures from one file, measured in one run.

    from results import write_result
    write_result("bench_train", {"rows": rows})   # -> benchmarks/results/bench_train.json
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The flags that decide which kernels a CPU runs (bf16 and int8 matmul paths in oneDNN).
_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                      "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """CPU model, logical cores, and which of the kernel-deciding flags it has (Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {
        "model": model,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "flags": [f for f in _FLAGS_OF_INTEREST if f in flags],
    }


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_info(),
    }
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        info["memory_gib"] = round(kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if torch.cuda.is_available():
        info["cuda"] = {"device": torch.cuda.get_device_name(0), "version": torch.version.cuda}
    return info


def stamp(argv: list[str] | None = None) -> dict:
    """The metadata every result carries: command line, machine, date (UTC)."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0])
    try:
        script = script.resolve().relative_to(Path(__file__).resolve().parents[1])
    except ValueError:
        pass
    return {
        "command": shlex.join(["python", str(script), *argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
    }


def write_result(name: str, payload: dict, path: str | os.PathLike | None = None) -> Path:
    """Write `payload` plus `stamp()` to `benchmarks/results/<name>.json` (or `path`),
    atomically; returns the path written."""
    out = Path(path) if path else RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = stamp()
    record = {"benchmark": name, **meta, **payload}
    if isinstance(payload.get("machine"), dict):  # the payload's own measurements of the machine
        record["machine"] = {**meta["machine"], **payload["machine"]}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return out
