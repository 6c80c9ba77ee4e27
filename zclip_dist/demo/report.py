"""What the two runs did: spike analysis, the side-by-side table, the PNG and results.json."""

from __future__ import annotations

import json
import os
from statistics import fmean
from typing import Any, Sequence

from .settings import RUNS, DemoSettings

__all__ = ["WINDOW", "SPIKE_RATIO", "summarize", "table", "plot", "write_results"]

WINDOW = 10  # steps of loss history a step is compared with
SPIKE_RATIO = 1.4  # a loss spike: loss > 1.4 x the mean of the previous WINDOW steps
RECOVERED_RATIO = 1.05  # recovered: loss back within 5% of its mean over the WINDOW steps before the injection


def spike_events(losses: Sequence[float]) -> list[int]:
    """First step of every loss spike (consecutive spike steps are one event)."""
    events, inside = [], False
    for t in range(WINDOW, len(losses)):
        spike = losses[t] > SPIKE_RATIO * fmean(losses[t - WINDOW:t])
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
                     "clipped_norm": at["grad_norm"] * at["coef"]},
        "steps_clipped": sum(bool(r["clipped"]) for r in history),
        "final_loss": fmean(losses[-WINDOW:]),
        "best_loss": min(smooth),
        "wall_s": wall_s,
        "steps": len(history),
    }


def _fmt_injected(inj: dict[str, Any]) -> str:
    if not inj["clipped"]:
        return f"no (norm {inj['grad_norm']:.1f})"
    return f"yes: {inj['grad_norm']:.1f} -> {inj['clipped_norm']:.2f}"


def table(summaries: dict[str, dict[str, Any]], settings: DemoSettings) -> str:
    """A Markdown table, one column per run."""
    z = settings.zclip
    heads = {"fixed": f"fixed clip {settings.clip:g}",
             "zclip": f"ZClip z={z.get('z_thresh', 2.5)} a={z.get('alpha', 0.97)} (cap {settings.clip:g})"}
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
    cols = [heads[r] for r in RUNS]
    lines = [[""] + cols, ["---"] * (len(cols) + 1)]
    lines += [[name] + [fn(summaries[r]) for r in RUNS] for name, fn in rows]
    width = [max(len(line[i]) for line in lines) for i in range(len(cols) + 1)]
    out = []
    for line in lines:
        if line[0] == "---":
            line = ["-" * w for w in width]
        out.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, width)) + " |")
    return "\n".join(out)


def plot(histories: dict[str, list[dict[str, Any]]], settings: DemoSettings, path: str) -> str:
    """Loss, pre-clip norm and the clipping thresholds per step for both runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"fixed": "tab:red", "zclip": "tab:blue"}
    labels = {"fixed": f"fixed clip {settings.clip:g}", "zclip": "ZClip"}
    fig, (ax_loss, ax_norm) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=[3, 2])
    for run in RUNS:
        h = histories[run]
        steps = [r["step"] for r in h]
        ax_loss.plot(steps, [r["loss"] for r in h], color=colors[run], lw=1, label=labels[run])
        ax_norm.plot(steps, [r["grad_norm"] for r in h], color=colors[run], lw=0.8, alpha=0.8,
                     label=f"pre-clip norm ({labels[run]})")
    z = [r for r in histories["zclip"] if not r.get("warmup", False)]
    ax_norm.plot([r["step"] for r in z], [r["threshold"] for r in z], color="black", lw=1, ls="--",
                 label="ZClip threshold")
    ax_norm.axhline(settings.clip, color="tab:red", lw=1, ls=":", label=f"fixed clip {settings.clip:g}")
    for ax in (ax_loss, ax_norm):
        ax.axvline(settings.spike_step, color="gray", lw=0.8, alpha=0.6)
        ax.grid(alpha=0.3)
    ax_loss.annotate(f"corrupted batch (rank {settings.spike_rank})", (settings.spike_step, 1.0),
                     xycoords=("data", "axes fraction"), xytext=(4, -12), textcoords="offset points",
                     fontsize=8, color="gray")
    ax_loss.set_ylabel("training loss (clean batches)")
    ax_loss.legend(loc="upper right")
    ax_norm.set_yscale("log")
    ax_norm.set_ylabel("global grad norm")
    ax_norm.set_xlabel("optimizer step")
    ax_norm.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"GPT ({settings.n_layer} layers, d={settings.d_model}) on {settings.world} ranks, "
                 f"DeepSpeed ZeRO-{settings.zero_stage}: fixed clipping vs ZClip")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(path: str, settings: DemoSettings, summaries: dict[str, dict[str, Any]],
                  outputs: dict[str, str]) -> None:
    with open(path, "w") as f:
        json.dump({"settings": settings.to_dict(), "runs": summaries, "outputs": outputs}, f, indent=2)
