"""The replay PNG, readable at any trace length.

A million steps do not fit in 1,400 pixels: past :data:`MAX_POINTS` steps the norm and both thresholds
are drawn as min/max envelopes over equal bins of steps (so a one-step spike still reaches its height),
while every event -- each clipped step, each non-finite step, each regime shift -- keeps its own marker.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

__all__ = ["plot_replay", "figure", "save", "envelope", "MAX_POINTS", "BINS"]

MAX_POINTS = 4000  # up to this many steps: every step drawn as a line
BINS = 1400  # beyond: this many min/max bins (about one per pixel column at the saved size)


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


def _draw(ax: Any, xs: Sequence[float], ys: Sequence[float], decimate: bool, **style: Any) -> None:
    if not decimate:
        ax.plot(xs, [v if math.isfinite(v) else math.nan for v in ys], **style)
        return
    x, lo, hi = envelope(xs, ys, BINS)
    label = style.pop("label", None)
    color = style.get("color")
    ax.fill_between(x, lo, hi, step="post", color=color, alpha=0.35, lw=0, label=label)
    ax.plot(x, hi, drawstyle="steps-post", **{**style, "lw": 0.6})
    ax.plot(x, lo, drawstyle="steps-post", **{**style, "lw": 0.6})


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

    t, z, a = result.trace, result.zclip, result.adagc
    steps, norms = t.steps, t.norms
    decimate = len(steps) > MAX_POINTS
    fig, ax = plt.subplots(figsize=(12.8, 4.8))
    _draw(ax, steps, norms, decimate, color="0.45", lw=0.8,
          label="grad norm" + (f" (min/max of every {len(steps) // BINS} steps)" if decimate else ""))
    live = [i for i, w in enumerate(z["warmup"]) if not w]
    if live:
        _draw(ax, [steps[i] for i in live], [z["threshold"][i] for i in live], decimate and len(live) > MAX_POINTS,
              color="tab:blue", lw=1, label="ZClip threshold")
    zc = [i for i, c in enumerate(z["clipped"]) if c]
    ax.scatter([steps[i] for i in zc], [norms[i] for i in zc], s=12, color="tab:blue", marker="o", lw=0,
               label=f"clipped by ZClip ({len(zc)})", zorder=3)
    shifts = [i for i, r in enumerate(z["regime_shift"]) if r]
    if shifts:
        ax.scatter([steps[i] for i in shifts], [norms[i] for i in shifts], s=30, color="tab:green", marker="^",
                   label=f"regime shift, accepted by ZClip ({len(shifts)})", zorder=4)
    if a is not None:
        _draw(ax, steps, a["threshold"], decimate, color="tab:orange", lw=1, ls="--", label="AdaGC-global threshold")
        ac = [i for i, c in enumerate(a["clipped"]) if c]
        ax.scatter([steps[i] for i in ac], [norms[i] for i in ac], s=28, facecolors="none",
                   edgecolors="tab:orange", marker="s", lw=0.8, label=f"clipped by AdaGC-global ({len(ac)})", zorder=2)
    bad = [steps[i] for i, v in enumerate(norms) if not math.isfinite(v)]
    if bad:  # no height to draw: a tick on the top edge
        top = blended_transform_factory(ax.transData, ax.transAxes)
        ax.scatter(bad, [0.98] * len(bad), transform=top, marker="v", color="tab:red", s=24,
                   label=f"non-finite norm ({len(bad)})", zorder=5, clip_on=False)
    finite = [v for v in norms if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("global grad norm")
    ax.set_title(f"replay of {os.path.basename(os.path.normpath(t.source))}: {len(steps):,} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig
