"""The loss plot every training run writes beside its metrics (`loss.png`)."""

from __future__ import annotations

from pathlib import Path

from ..utils import atomic_write


def plot_losses(records: list[dict], path: str | Path, title: str = "", x: str = "tokens") -> None:
    """Training loss (every step) and validation loss (every evaluation) against the tokens
    or examples seen (`x`), written atomically as a PNG."""
    # A bare Figure, not pyplot: no GUI backend needed, and a notebook's inline backend
    # is left alone.
    from matplotlib.figure import Figure

    train = [(r[x], r["train_loss"]) for r in records if "train_loss" in r and x in r]
    val = [(r[x], r["val_loss"]) for r in records if "val_loss" in r and x in r]
    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.subplots()
    if train:
        # a short run has few points (one, for a one-step epoch): mark them, a lone point
        # drawn as a line is invisible
        ax.plot(*zip(*train), marker="o" if len(train) <= 30 else None, markersize=4, label="train",
                alpha=0.8, linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=2)
    ax.set_xlabel(f"{x} seen")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
