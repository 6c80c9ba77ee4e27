"""``zclip-dist report``: what a run's clipping did, in a dozen lines, from its metrics file.

It reads the decisions and spike-forensics events the run recorded (every front end's JSONL,
DeepSpeed's ``Train/zclip/*`` or Megatron's ``zclip/*`` TensorBoard scalars). A trace of norms alone (a CSV, Megatron's ``grad-norm``)
gets ZClip simulated on it with the run's settings (the JSONL header) or the defaults, and says so.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

from .forensics import attribution, summarize_events
from .traces import Trace, TraceError, read_trace

__all__ = ["read_for_report", "run_report"]

#: TensorBoard tags whose neighbours hold the recorded decisions, tried first when no --field is given.
DECISION_TAGS = ("Train/zclip/grad_norm", "zclip/grad_norm", "Train/adagc/grad_norm", "adagc/grad_norm")


def read_for_report(path: str, fmt: str = "auto", field_name: str | None = None, run: str | None = None,
                    samples_per_step: int | None = None) -> Trace:
    """Like ``read_trace``, but for TensorBoard prefer a norm tag logged next to the decisions."""
    trace = read_trace(path, fmt, field_name, run, samples_per_step)
    if field_name is None and "clipped" not in trace.columns and "num_clipped_tensors" not in trace.columns:
        for tag in DECISION_TAGS:
            if tag != trace.field:
                try:
                    return read_trace(path, "tensorboard", tag, run, samples_per_step)
                except TraceError:
                    continue
    return trace


def _flags(values: Sequence[Any] | None, n: int) -> list[bool]:
    return [bool(v) for v in values] if values is not None else [False] * n


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _decisions(trace: Trace) -> tuple[dict[str, list[Any]], str]:
    """The recorded decisions, or simulated ones (with what they came from)."""
    c, n = trace.columns, len(trace.norms)
    head = trace.header or {}
    if "clipped" in c:
        return {"clipped": _flags(c["clipped"], n), "spike": _flags(c.get("spike"), n),
                "warmup": _flags(c.get("warmup"), n), "regime_shift": _flags(c.get("regime_shift"), n),
                "threshold": c.get("threshold"), "coef": c.get("coef"), "z": c.get("z")}, "recorded"
    if "num_clipped_tensors" in c:  # AdaGC: per-tensor thresholds, no single threshold to show
        return {"clipped": [bool(v) for v in c["num_clipped_tensors"]], "spike": None,
                "warmup": _flags(c.get("warmup"), n), "regime_shift": [False] * n, "threshold": None,
                "coef": c.get("min_coef"), "z": None}, "recorded (AdaGC: clipped = at least one tensor clipped)"
    from .replay import resolve_settings, simulate_zclip

    settings = resolve_settings(trace)
    sim = simulate_zclip(trace.norms, settings.zclip)
    origin = "the run's settings" if head.get("method") == "zclip" else settings.origin
    return sim, f"simulated: the trace records no decisions; ZClip with {origin}"


def _runs(flags: Sequence[bool], steps: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first step, last step, length) of each run of consecutive flagged entries."""
    out, start = [], None
    for i, f in enumerate(list(flags) + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((steps[start], steps[i - 1], i - start))
            start = None
    return out


def run_report(trace: Trace, top: int = 10) -> str:
    """The report as text (see the module docstring)."""
    steps, norms = trace.steps, trace.norms
    n = len(norms)
    d, how = _decisions(trace)
    head = trace.header or {}
    lines = [f"run: {trace.source} [{trace.field}]"]
    if head:
        settings = ", ".join(f"{k}={v}" for k, v in (head.get("settings") or {}).items()
                             if k not in ("log_interval", "verify_every", "nonfinite"))
        lines.append(f"  method: {head.get('method')} ({settings})")
    lines += [f"  note: {note}" for note in trace.notes]
    interval = trace.interval()
    lines.append(f"steps: {n} logged, {steps[0]}..{steps[-1]}"
                 + (" (every step)" if not trace.gaps() else
                    f" (every {interval} steps: counts below are of logged steps)" if interval > 1 else
                    f" ({trace.gaps()} steps not logged: counts below are of logged steps)"))

    finite = [v for v in norms if math.isfinite(v)]
    bad = [steps[i] for i, v in enumerate(norms) if not math.isfinite(v)]
    if finite:
        median = statistics.median(finite)
        peak = max(range(n), key=lambda i: norms[i] if math.isfinite(norms[i]) else -math.inf)
        ordered = sorted(finite)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        lines.append(f"grad norm: median {_fmt(median)}, p99 {_fmt(p99)}, max {_fmt(norms[peak])} at step {steps[peak]}")
    else:
        median = math.nan
    lines.append(f"non-finite norms: {len(bad)}" + (f" (steps {', '.join(map(str, bad[:8]))}"
                                                   + (", ..." if len(bad) > 8 else "") + ")" if bad else ""))

    clipped, warm = d["clipped"], d["warmup"]
    spike = d["spike"]
    n_clip = sum(clipped)
    n_warm = sum(c and w for c, w in zip(clipped, warm))
    parts = [f"{n_warm} in warmup"]
    if spike is not None:
        n_spike = sum(c and s for c, s in zip(clipped, spike))
        parts += [_count(n_spike, "spike"), f"{n_clip - n_spike - n_warm} by the cap"]
    lines.append(f"clipped: {n_clip} of {n} steps ({100.0 * n_clip / max(n, 1):.1f}%; {', '.join(parts)}) [{how}]")

    flagged = [i for i in range(n) if (spike[i] if spike is not None else clipped[i] and not warm[i])]
    if flagged:
        biggest = sorted(flagged, key=lambda i: -norms[i])[:top]
        coef, events = d["coef"], trace.event_at()
        lines.append(f"largest {'spikes' if spike is not None else 'clipped steps'} (of {len(flagged)}):")
        for i in sorted(biggest, key=lambda i: steps[i]):
            to = f" -> {_fmt(norms[i] * coef[i])}" if coef is not None and coef[i] is not None else ""
            ratio = f", x{norms[i] / median:.3g} the median" if median and math.isfinite(median) else ""
            zv = d["z"][i] if d.get("z") is not None else None
            zs = f", z {zv:.3g}" if isinstance(zv, float) and math.isfinite(zv) else ""
            who = f"; {attribution(events[steps[i]])}" if steps[i] in events else ""
            lines.append(f"  step {steps[i]:>8}: {_fmt(norms[i])}{to}{zs}{ratio}{who}")
    else:
        lines.append("spikes: none")

    shifts = _runs(d["regime_shift"], steps)
    if shifts:
        shown = ", ".join(f"{a}..{b} ({k} steps)" for a, b, k in shifts[:5])
        lines.append(f"regime shifts accepted: {len(shifts)} ({shown}{', ...' if len(shifts) > 5 else ''})")
    else:
        lines.append("regime shifts accepted: none")

    thr = d["threshold"]
    if thr is not None:
        live = [i for i in range(n) if not warm[i] and thr[i] is not None and math.isfinite(thr[i])]
        if live:
            marks = sorted({live[round(q * (len(live) - 1))] for q in (0, 0.2, 0.4, 0.6, 0.8, 1.0)})
            values = [thr[i] for i in live]
            lines.append(f"threshold after warmup: min {_fmt(min(values))}, max {_fmt(max(values))}; "
                         + ", ".join(f"step {steps[i]}: {_fmt(thr[i])}" for i in marks))
        else:
            lines.append("threshold: the run never left warmup (or had no cap)")
    else:
        lines.append("threshold: not in AdaGC's metrics (gamma is per tensor, or global in adagc-global)")
    if trace.events or head:  # our own metrics: say whether forensics recorded anything
        listed = " (zclip-dist events METRICS lists them)" if trace.events else ""
        lines.append(summarize_events(trace.events) + listed)
    return "\n".join(lines)
