"""What the runs did: spike analysis, the side-by-side table, the PNG and results.json."""

from __future__ import annotations

import json
import os
from statistics import fmean, median, quantiles
from typing import Any, Sequence

from .settings import DemoSettings, fixed_clip

__all__ = ["WINDOW", "SPIKE_RATIO", "spike_events", "summarize", "pilot_summary", "pilot_text", "table", "plot", "write_results"]

WINDOW = 10  # steps of loss history a step is compared with
SPIKE_RATIO = 1.4  # a loss spike: loss > 1.4 x the mean of the previous WINDOW steps (or fewer, at the start)
RECOVERED_RATIO = 1.05  # recovered: loss back within 5% of its mean over the WINDOW steps before the injection


def spike_events(losses: Sequence[float]) -> list[int]:
    """First step of every loss spike (consecutive spike steps are one event). The first steps compare
    with the fewer steps before them: warmup-free training can blow up at step 1."""
    events, inside = [], False
    for t in range(1, len(losses)):
        spike = losses[t] > SPIKE_RATIO * fmean(losses[max(0, t - WINDOW):t])
        if spike and not inside:
            events.append(t)
        inside = spike
    return events


def summarize(history: list[dict[str, Any]], settings: DemoSettings, wall_s: float) -> dict[str, Any]:
    """Numbers for the table, from one run's per-step records."""
    losses = [r["loss"] for r in history]
    s = settings.spike_step
    before = fmean(losses[max(0, s - WINDOW):s]) if s > 0 else losses[0]
    after = losses[s + 1:s + 1 + WINDOW]
    recover = next((k for k, v in enumerate(losses[s + 1:], start=1) if v <= RECOVERED_RATIO * before), None)
    smooth = [fmean(losses[t - WINDOW:t]) for t in range(WINDOW, len(losses) + 1)] or [fmean(losses)]
    at = history[s]
    return {
        "loss_spikes": len(spike_events(losses)),
        "spike_steps": spike_events(losses),
        "jump": (max(after) / before) if after else None,
        "steps_to_recover": recover,
        "injected": {"step": s, "grad_norm": at["grad_norm"], "clipped": bool(at["clipped"]), "coef": at["coef"],
                     # AdaGC scales each tensor by its own coefficient: no single post-clip norm
                     "clipped_norm": None if "clipped_tensors" in at else at["grad_norm"] * at["coef"],
                     "clipped_tensors": at.get("clipped_tensors")},
        "steps_clipped": sum(bool(r["clipped"]) for r in history),
        "final_loss": fmean(losses[-WINDOW:]),
        "best_loss": min(smooth),
        "wall_s": wall_s,
        "steps": len(history),
    }


def pilot_summary(history: list[dict[str, Any]], skip: int = 25) -> dict[str, float]:
    """The typical pre-clip norm of the pilot (no clipping, nothing injected), after its first ``skip`` steps."""
    norms = [r["grad_norm"] for r in history[skip:]]
    return {"median": median(norms), "p90": quantiles(norms, n=10)[-1], "max": max(norms), "from_step": skip,
            "steps": len(norms)}


def pilot_text(p: dict[str, float]) -> str:
    return (f"pilot without clipping, nothing injected: pre-clip global norm over steps {p['from_step']}.."
            f"{p['from_step'] + p['steps'] - 1}: median {p['median']:.2f}, p90 {p['p90']:.2f}, max {p['max']:.2f}")


def _fmt_injected(inj: dict[str, Any]) -> str:
    if not inj["clipped"]:
        return f"no (norm {inj['grad_norm']:.1f})"
    if inj["clipped_norm"] is None:
        return f"yes: {inj['grad_norm']:.1f}, {inj['clipped_tensors']} tensors, min x{inj['coef']:.1g}"
    return f"yes: {inj['grad_norm']:.1f} -> {inj['clipped_norm']:.2f}"


def run_label(run: str, settings: DemoSettings) -> str:
    if run == "zclip":
        return f"ZClip (cap {settings.clip:g})"
    if run == "adagc":
        return f"AdaGC (warmup clip {settings.clip:g})"
    return f"fixed clip {fixed_clip(run):g}" if run != "none" else "no clipping"


def table(summaries: dict[str, dict[str, Any]], settings: DemoSettings) -> str:
    """A Markdown table, one column per run."""
    rows = [
        ("loss spikes (> 1.4x last-10 mean)", lambda m: str(m["loss_spikes"])),
        (f"loss jump after step {settings.spike_step}", lambda m: f"x{m['jump']:.2f}" if m["jump"] else "-"),
        ("steps to recover (within 5%)", lambda m: str(m["steps_to_recover"]) if m["steps_to_recover"] is not None
         else "never"),
        ("injected step clipped", lambda m: _fmt_injected(m["injected"])),
        ("steps clipped", lambda m: f"{m['steps_clipped']} / {m['steps']}"),
        ("final loss (last 10 steps)", lambda m: f"{m['final_loss']:.3f}"),
        ("best loss (10-step mean)", lambda m: f"{m['best_loss']:.3f}"),
        ("wall time", lambda m: f"{m['wall_s']:.0f} s"),
    ]
    runs = list(summaries)
    cols = [run_label(r, settings) for r in runs]
    lines = [[""] + cols, ["---"] * (len(cols) + 1)]
    lines += [[name] + [fn(summaries[r]) for r in runs] for name, fn in rows]
    width = [max(len(line[i]) for line in lines) for i in range(len(cols) + 1)]
    out = []
    for line in lines:
        if line[0] == "---":
            line = ["-" * w for w in width]
        out.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, width)) + " |")
    return "\n".join(out)


_COLORS = {"zclip": "tab:blue", "adagc": "tab:green", "none": "black"}
_FIXED_COLORS = ("tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink")


def plot(histories: dict[str, list[dict[str, Any]]], settings: DemoSettings, path: str) -> str:
    """Loss (whole run and around the injected step), pre-clip norm and the clipping thresholds per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = [r for r in histories if r.startswith("fixed-")]
    colors = {**_COLORS, **{r: _FIXED_COLORS[i % len(_FIXED_COLORS)] for i, r in enumerate(fixed)}}
    fig = plt.figure(figsize=(12, 8))
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 2])
    ax_loss, ax_zoom, ax_norm = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    s = settings.spike_step
    for run, h in histories.items():
        label = run_label(run, settings)
        steps, losses = [r["step"] for r in h], [r["loss"] for r in h]
        ax_loss.plot(steps, losses, color=colors[run], lw=0.8, label=label)
        near = [i for i in steps if s - 20 <= i <= s + 60]
        ax_zoom.plot(near, [losses[i] for i in near], color=colors[run], lw=1.2, label=label)
        ax_norm.plot(steps, [r["grad_norm"] for r in h], color=colors[run], lw=0.6, alpha=0.6)
        if run in fixed:
            ax_norm.axhline(fixed_clip(run), color=colors[run], lw=1, ls=":", label=label)
    if "zclip" in histories:
        z = [r for r in histories["zclip"] if not r.get("warmup", False)]
        ax_norm.plot([r["step"] for r in z], [r["threshold"] for r in z], color=colors["zclip"], lw=1, ls="--",
                     label="ZClip threshold")
    for ax in (ax_loss, ax_zoom, ax_norm):
        if not settings.pilot:
            ax.axvline(s, color="gray", lw=0.8, alpha=0.6)
        ax.grid(alpha=0.3)
    if not settings.pilot:
        ax_zoom.annotate(f"corrupted batch (rank {settings.spike_rank})", (s, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(4, -12), textcoords="offset points", fontsize=8, color="gray")
    ax_loss.set_ylabel("training loss (clean batches)")
    ax_zoom.set_title(f"steps {s - 20}..{s + 60}", fontsize=9)
    ax_zoom.legend(loc="upper right", fontsize=8)
    ax_norm.set_yscale("log")
    ax_norm.set_ylabel("pre-clip global grad norm")
    ax_norm.set_xlabel("optimizer step")
    ax_norm.legend(loc="upper right", fontsize=8, ncol=2)
    fig.suptitle(f"GPT ({settings.n_layer} layers, d={settings.d_model}) on {settings.world} ranks, "
                 f"DeepSpeed ZeRO-{settings.zero_stage}: fixed clips vs ZClip vs AdaGC")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(path: str, settings: DemoSettings, summaries: dict[str, dict[str, Any]],
                  outputs: dict[str, str], **extra: Any) -> None:
    with open(path, "w") as f:
        json.dump({"settings": settings.to_dict(), "runs": summaries, "outputs": outputs, **extra}, f, indent=2)
