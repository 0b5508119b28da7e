"""Plots of ``lora-fast train`` and ``sweep`` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

from lora_fast.train_io import write_atomic

MISSING = ("matplotlib is not installed: lora-fast train and sweep draw their loss plots with it (pip install "
           "'lora-fast[train]', or pip install matplotlib)")


def check_plotting() -> None:
    """Refuse a run that could not draw its plots, before anything is loaded: without matplotlib a run trained to
    the end and lost every output at the plot (the base install has no matplotlib; ``[train]`` brings it)."""
    from lora_fast.train_args import ConfigError

    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(MISSING)


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(MISSING) from e

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int = 120, tight: bool = True) -> None:
    """The figure as PNG bytes rendered in memory, then written atomically: a failed render (a full disk) keeps the
    previous file whole. ``tight``: crop to the drawn content (``bbox_inches="tight"``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    write_atomic(path, buf.getvalue())


def loss_curve(path: Path, train_loss: list[float], eval_steps: list[int], eval_loss: list[float],
               title: str = "LoRA fine-tuning") -> None:
    """Train loss per optimizer step and eval loss at each evaluation, in one PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    # a one-step run (or one stopped after step 1) has one point: a line alone would draw nothing
    ax.plot(range(1, len(train_loss) + 1), train_loss, label="train loss", lw=1, marker="." if len(train_loss) < 2
            else None)
    if eval_loss:
        ax.plot(eval_steps, eval_loss, "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, path)
    plt.close(fig)


def sweep_plot(path: Path, rows: list[dict]) -> None:
    """Final eval loss of each sweep run against its trainable parameters (log scale), labelled by run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        marker = "s" if r["target_modules"] == "all-linear" else "o"
        ax.scatter(r["trainable_params"], r["final_eval_loss"], marker=marker)
        ax.annotate(r["run"], (r["trainable_params"], r["final_eval_loss"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("final eval loss")
    ax.set_title("LoRA sweep (o: named target modules, s: all-linear)")
    ax.grid(alpha=0.3)
    save_png(fig, path)
    plt.close(fig)
