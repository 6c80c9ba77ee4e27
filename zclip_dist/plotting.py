"""The replay PNG, readable at any trace length.

A million steps do not fit in 1,400 pixels: past :data:`MAX_POINTS` steps the norm and both thresholds
are drawn as min/max envelopes over equal bins of steps (so a one-step spike still reaches its height),
while every event -- each clipped step, each non-finite step, each regime shift -- is drawn at its own
step; past :data:`MANY_EVENTS` of a kind they are dots, and the largest (furthest over the threshold)
keep the full marker, so a band of routine clips does not bury the spikes.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

__all__ = ["plot_replay", "figure", "save", "envelope", "MAX_POINTS", "BINS", "MANY_EVENTS"]

MAX_POINTS = 4000  # up to this many steps: every step drawn as a line
BINS = 1400  # beyond: this many min/max bins (about one per pixel column at the saved size)
MANY_EVENTS = 500  # beyond this many events of a kind, all are dots and the largest this many keep a marker


def envelope(xs: Sequence[float], ys: Sequence[float], bins: int) -> tuple[Any, Any, Any]:
    """Bin starts, and the min and max of the finite ``ys`` in each of ``bins`` equal runs of points
    (NaN for a bin with none)."""
    import numpy as np

    x = np.asarray(xs, dtype=np.float64)
    y = np.asarray(ys, dtype=np.float64)
    y = np.where(np.isfinite(y), y, np.nan)
    starts = np.linspace(0, len(y), num=min(bins, len(y)), endpoint=False).astype(np.int64)
    with np.errstate(invalid="ignore"):
        lo = np.fmin.reduceat(y, starts)  # fmin/fmax skip NaN; an all-NaN bin stays NaN
        hi = np.fmax.reduceat(y, starts)
    return x[starts], lo, hi


def _draw(ax: Any, xs: Any, ys: Any, decimate: bool, **style: Any) -> None:
    import numpy as np

    y = np.asarray(ys, dtype=np.float64)
    if not decimate:
        ax.plot(xs, np.where(np.isfinite(y), y, np.nan), **style)
        return
    x, lo, hi = envelope(xs, y, BINS)
    label = style.pop("label", None)
    ax.fill_between(x, lo, hi, step="post", color=style.get("color"), alpha=0.35, lw=0, label=label,
                    zorder=style.get("zorder", 1))
    edge = {**style, "lw": 0.75 * style.get("lw", 1.0)}
    ax.plot(x, hi, drawstyle="steps-post", **edge)
    ax.plot(x, lo, drawstyle="steps-post", **edge)


def _events(ax: Any, x: Any, y: Any, flags: Any, label: str, many: int, weight: Any = None, **style: Any) -> None:
    """One marker per flagged step. Past ``many`` events every one is a small dot, and the ``many``
    heaviest (``weight``: how far over the threshold) keep the full marker."""
    import numpy as np

    at = np.flatnonzero(np.asarray(flags, dtype=bool))
    text = f"{label} ({len(at):,})"
    if len(at) > many:
        dots = {"s": 3, "marker": ".", "lw": 0, "alpha": 0.3, "zorder": style.get("zorder"),
                "color": style.get("edgecolors", style.get("color"))}
        ax.scatter(x[at], y[at], rasterized=True, gid=label, **dots)
        w = y[at] if weight is None else np.asarray(weight, dtype=np.float64)[at]
        at = at[np.argsort(-np.nan_to_num(w, nan=-np.inf), kind="stable")[:many]]
        text += f", the {many:,} largest marked"
        label = f"{label}: largest"
    ax.scatter(x[at], y[at], label=text, rasterized=True, gid=label, **style)


def plot_replay(result: Any, path: str) -> str:
    """PNG: the norm trace, both thresholds, and the steps each method clips (``replay.Replay``)."""
    return save(figure(result), path)


def save(fig: Any, path: str) -> str:
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure(result: Any) -> Any:
    """The matplotlib figure of :func:`plot_replay`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    import numpy as np

    t, z, a = result.trace, result.zclip, result.adagc
    steps, norms = np.asarray(t.steps, dtype=np.float64), np.asarray(t.norms, dtype=np.float64)
    n = len(steps)
    decimate = n > MAX_POINTS
    many = MANY_EVENTS
    fig, ax = plt.subplots(figsize=(14, 4.8))
    _draw(ax, steps, norms, decimate, color="0.45", lw=0.8,
          label="grad norm" + (f" (min/max of every {n // BINS} steps)" if decimate else ""))
    live = ~np.asarray(z["warmup"], dtype=bool)
    if live.any():  # thresholds drawn over the markers: they stay visible where every step is clipped
        _draw(ax, steps[live], np.asarray(z["threshold"])[live], decimate and live.sum() > MAX_POINTS,
              color="navy", lw=1.4, label="ZClip threshold", zorder=4)
    with np.errstate(divide="ignore", invalid="ignore"):
        over = norms / np.asarray(z["threshold"], dtype=np.float64)
    _events(ax, steps, norms, z["clipped"], "clipped by ZClip", many, over, s=12, color="tab:blue", marker="o",
            lw=0, zorder=3)
    if any(z["regime_shift"]):
        _events(ax, steps, norms, z["regime_shift"], "regime shift, accepted by ZClip", many, s=30,
                color="tab:green", marker="^", zorder=5)
    if a is not None:
        _draw(ax, steps, a["threshold"], decimate, color="saddlebrown", lw=1.4, ls="--",
              label="AdaGC-global threshold", zorder=4)
        with np.errstate(divide="ignore", invalid="ignore"):
            over = norms / np.asarray(a["threshold"], dtype=np.float64)
        _events(ax, steps, norms, a["clipped"], "clipped by AdaGC-global", many, over, s=28, facecolors="none",
                edgecolors="tab:orange", marker="s", lw=0.8, zorder=2)
    bad = ~np.isfinite(norms)
    if bad.any():  # no height to draw: a tick on the top edge
        top = blended_transform_factory(ax.transData, ax.transAxes)
        ax.scatter(steps[bad], np.full(int(bad.sum()), 0.98), transform=top, marker="v", color="tab:red", s=24,
                   label=f"non-finite norm ({int(bad.sum()):,})", zorder=6, clip_on=False)
    positive = norms[np.isfinite(norms) & (norms > 0)]
    if len(positive) and positive.max() / positive.min() > 20:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("global grad norm")
    ax.set_title(f"replay of {os.path.basename(os.path.normpath(t.source))}: {n:,} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig
