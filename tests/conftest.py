"""Shared fixtures: the read-only data folder, tiny configs, and an offline environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("LLMSCRATCH_DATA_DIR") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "the-verdict.txt").is_file():
        pytest.skip(f"shared data folder not found at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    """Point every cache at a temp folder and the datasets at the shared copy: no network,
    nothing written to the user's home."""
    cache = tmp_path_factory.getbasetemp() / "llmscratch-cache"
    monkeypatch.setenv("LLMSCRATCH_CACHE_DIR", str(cache))
    monkeypatch.setenv("LLMSCRATCH_DATA_DIR", str(DATA_DIR))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch.manual_seed(0)
