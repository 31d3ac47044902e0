"""`llmscratch bench`: the benchmark harness of a source checkout (`benchmarks/harness.py`)."""

from __future__ import annotations

import sys

from ..errors import UserError


def cmd_bench(args) -> None:
    """Measure the machine's matmul peak and memory bandwidth, training throughput (with
    MFU), generation speed, tokenizers and peak memory, against the peers that are installed
    (transformers; the book's llms-from-scratch package, installed with `pip install --no-deps`).
    Runs `benchmarks/harness.py` of a source checkout: the harness imports the peers, so it
    is not part of the installed package."""
    from pathlib import Path

    from ..utils import pick_device

    pick_device(args.device)  # a wrong --device is one line, before any measuring
    folder = Path(__file__).resolve().parents[3] / "benchmarks"
    if not (folder / "harness.py").is_file():
        raise UserError("llmscratch bench runs benchmarks/harness.py from a source checkout of llmscratch "
                        "(git clone, then pip install -e \".[bench]\"); this installation has no benchmarks/ folder")
    sys.path.insert(0, str(folder))  # the harness and its sibling modules, as when run as scripts
    import harness

    harness.run(args)
