"""What the sweep found: per-run summaries, per-cell aggregates over seeds, Markdown tables, PNGs."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from statistics import fmean, stdev
from typing import Any, Sequence

import torch

from .report import WINDOW, spike_events
from .sweep import SweepSettings

__all__ = ["unigram_entropy", "summarize_run", "aggregate", "tables", "heatmap", "curves", "write_results"]

LABELS = {"none": "no clipping", "fixed-tight": "fixed tight", "fixed-loose": "fixed loose", "zclip": "ZClip",
          "adagc": "AdaGC"}


def unigram_entropy(tokens: torch.Tensor) -> float:
    """Cross-entropy (nats) of predicting every character by its frequency: what a model that has learnt
    nothing about context scores. A run that ends above it has diverged."""
    counts = Counter(tokens.tolist())
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def summarize_run(run: dict[str, Any], collapse: float) -> dict[str, Any]:
    """Final and best loss, loss-spike events, divergence and clipped steps of one run."""
    losses: Sequence[float] = run["loss"]
    finite = all(math.isfinite(v) for v in losses)
    tail = max(WINDOW, len(losses) // 10)
    final = fmean(losses[-tail:]) if finite else math.nan
    best = min(fmean(losses[t - WINDOW:t]) for t in range(WINDOW, len(losses) + 1)) if finite else math.nan
    return {
        "lr": run["lr"], "method": run["method"], "seed": run["seed"],
        "final_loss": final, "best_loss": best,
        "spikes": len(spike_events(losses)) if finite else None,
        "diverged": not finite or final >= collapse,
        "clipped_frac": sum(run["clipped"]) / len(run["clipped"]),
        "median_norm": sorted(run["grad_norm"])[len(run["grad_norm"]) // 2],
        "wall_s": run["wall_s"],
    }


def aggregate(summaries: list[dict[str, Any]], settings: SweepSettings) -> dict[tuple[float, str], dict[str, Any]]:
    """Per (learning rate, method): means over seeds (diverged runs included in the loss; NaN if any is NaN)."""
    cells: dict[tuple[float, str], dict[str, Any]] = {}
    for lr in settings.lrs:
        for m in settings.methods:
            runs = [s for s in summaries if s["lr"] == lr and s["method"] == m]
            finals = [s["final_loss"] for s in runs]
            cells[(lr, m)] = {
                "final_mean": fmean(finals), "final_sd": stdev(finals) if len(finals) > 1 else 0.0,
                "best_mean": fmean(s["best_loss"] for s in runs),
                "spikes_mean": fmean(s["spikes"] for s in runs) if all(s["spikes"] is not None for s in runs) else math.nan,
                "diverged": sum(s["diverged"] for s in runs), "seeds": len(runs),
                "clipped_frac": fmean(s["clipped_frac"] for s in runs),
                "wall_s": sum(s["wall_s"] for s in runs),
            }
    return cells


def _grid(cells: dict[tuple[float, str], dict[str, Any]], settings: SweepSettings, fmt) -> str:
    head = ["method \\ lr"] + [f"{lr:g}" for lr in settings.lrs]
    rows = [[LABELS[m]] + [fmt(cells[(lr, m)]) for lr in settings.lrs] for m in settings.methods]
    lines = [head, ["---"] * len(head)] + rows
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _loss(c: dict[str, Any]) -> str:
    text = "NaN" if math.isnan(c["final_mean"]) else f"{c['final_mean']:.3f} ± {c['final_sd']:.3f}"
    return text + (f" **({c['diverged']}/{c['seeds']} div)**" if c["diverged"] else "")


def tables(cells: dict[tuple[float, str], dict[str, Any]], settings: SweepSettings) -> str:
    """Three Markdown tables: final loss, loss spikes, share of steps clipped."""
    n = len(settings.seeds)
    spikes = lambda c: "-" if math.isnan(c["spikes_mean"]) else f"{c['spikes_mean']:.1f}"  # noqa: E731
    return "\n\n".join([
        f"Final loss (mean of the last 10% of steps; mean ± sd over {n} seed(s); diverged runs in bold):\n\n"
        + _grid(cells, settings, _loss),
        "Loss spikes per run (a step whose loss exceeds 1.4x the mean of the previous 10, or of the fewer before it "
        "at the start; mean over seeds):\n\n"
        + _grid(cells, settings, spikes),
        "Steps clipped (share of all steps, mean over seeds):\n\n"
        + _grid(cells, settings, lambda c: f"{100 * c['clipped_frac']:.0f}%"),
    ])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(cells: dict[tuple[float, str], dict[str, Any]], settings: SweepSettings, path: str) -> str:
    """Final loss and spike count per (method, learning rate), annotated; diverged cells marked."""
    import numpy as np  # matplotlib's dependency

    plt = _pyplot()
    lrs, methods = settings.lrs, settings.methods
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.2 * len(lrs), 1.2 + 0.7 * len(methods)))
    panels = (("final loss", "final_mean", "viridis_r", "{:.2f}"), ("loss spikes per run", "spikes_mean", "magma_r", "{:.1f}"))
    for ax, (title, key, cmap, fmt) in zip(axes, panels):
        data = np.array([[cells[(lr, m)][key] for lr in lrs] for m in methods], dtype=float)
        image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, aspect="auto")
        fig.colorbar(image, ax=ax, shrink=0.8)
        for i, m in enumerate(methods):
            for j, lr in enumerate(lrs):
                c = cells[(lr, m)]
                text = "NaN" if math.isnan(c[key]) else fmt.format(c[key])
                if c["diverged"]:
                    text += f"\n{c['diverged']}/{c['seeds']} div"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white",
                        path_effects=_outline())
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set_yticks(range(len(methods)), [LABELS[m] for m in methods])
        ax.set_xlabel("learning rate (constant, no warmup)")
        ax.set_title(title)
    cfg = settings.model
    fig.suptitle(f"GPT {cfg['n_layer']} layers d={cfg['d_model']}, {settings.n_steps} steps, "
                 f"{len(settings.seeds)} seed(s): fixed clips {settings.tight_clip:g} / {settings.loose_clip:g}, "
                 f"ZClip and AdaGC defaults (cap {settings.loose_clip:g})", fontsize=9)
    return _save(fig, path)


def _outline():
    from matplotlib import patheffects

    return [patheffects.withStroke(linewidth=1.5, foreground="black")]


def curves(runs: list[dict[str, Any]], settings: SweepSettings, path: str, seed: int | None = None) -> str:
    """Loss per step of one seed, one panel per learning rate, one line per method."""
    plt = _pyplot()
    seed = settings.seeds[0] if seed is None else seed
    lrs = settings.lrs
    fig, axes = plt.subplots(1, len(lrs), figsize=(3.6 * len(lrs), 3.4), sharey=True, squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for r in runs:
            if r["lr"] == lr and r["seed"] == seed:
                ax.plot(r["loss"], lw=0.7, label=LABELS[r["method"]])
        ax.set_title(f"lr {lr:g}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"training loss (seed {seed})")
    axes[0][0].set_ylim(0, 7)
    axes[0][-1].legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def write_results(path: str, settings: SweepSettings, summaries: list[dict[str, Any]],
                  cells: dict[tuple[float, str], dict[str, Any]], **extra: Any) -> None:
    with open(path, "w") as f:
        json.dump({"settings": settings.to_dict(), "runs": summaries,
                   "cells": [{"lr": lr, "method": m, **c} for (lr, m), c in cells.items()], **extra}, f, indent=1)
