"""Offline replay: what ZClip (any settings) and AdaGC-global would have done on a logged norm trace.

The trace (``traces.read_trace``) is the sequence of pre-clip global norms of a run. The simulation is
the training recurrence itself on Python floats (:mod:`~zclip_dist.host_stats`, bit-identical to the
CPU device path), so a trace logged at every step, replayed with the run's settings, gives the run's own
decisions. The settings come, in this order of precedence, from the command line, a DeepSpeed config,
the header of our JSONL (written by every front end), and the defaults.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

from .config import AdaGCConfig, ZClipConfig
from .forensics import Event, attribution, summarize_events
from .host_stats import adagc_global_host, zclip_host
from .traces import Trace, TraceError, read_trace

__all__ = ["TraceError", "Trace", "Replay", "Settings", "read_trace", "resolve_settings", "simulate_zclip",
           "simulate_adagc", "replay", "report", "write_csv", "plot"]

#: Settings that mean nothing offline (where metrics go, cross-rank checks): never taken from a header.
_OFFLINE_SKIP = ("log_jsonl", "log_interval", "verify_every")


def simulate_zclip(norms: Sequence[float], config: ZClipConfig) -> dict[str, list]:
    """ZClip's decision at every step of ``norms``: lists keyed by :data:`~zclip_dist.metrics.METRIC_NAMES`."""
    return zclip_host(config, norms)


def simulate_adagc(norms: Sequence[float], config: AdaGCConfig) -> dict[str, list]:
    """AdaGC-global on ``norms``: coefficient, threshold (the cap in warmup, then clip_ratio x gamma), clipped."""
    return adagc_global_host(config, norms)


def _known(cls: type, settings: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls) if not f.name.startswith("_")}
    return {k: v for k, v in settings.items() if k in names and k not in _OFFLINE_SKIP}


@dataclass
class Settings:
    zclip: ZClipConfig
    adagc: AdaGCConfig
    origin: str  # where the settings came from, for the report
    notes: list[str]
    reproduces: str | None  # "zclip" / "adagc": the method the run itself clipped with, with these settings


def _from_header(header: Mapping[str, Any]) -> tuple[str | None, dict[str, Any], dict[str, Any], list[str]]:
    method, settings = header.get("method"), dict(header.get("settings") or {})
    z = _known(ZClipConfig, settings) if method == "zclip" else {}
    a = _known(AdaGCConfig, settings) if method == "adagc" else {}
    notes = []
    if method == "adagc" and a.get("mode", "adagc") != "adagc-global":
        notes.append("the run clipped per tensor (mode 'adagc'); a norm trace holds only the global norm, "
                     "so the simulation is AdaGC-global, not the run's own decisions")
        method = None
    if "max_grad_norm" in settings:  # the run's cap (an engine's fixed clip) is both methods' cap
        z.setdefault("max_grad_norm", settings["max_grad_norm"])
        a.setdefault("max_grad_norm", settings["max_grad_norm"])
    return (method if method in ("zclip", "adagc") else None), z, a, notes


def _from_ds_config(ds_config: Mapping[str, Any]) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    from .deepspeed.config import resolve_config  # reads the entries exactly as training does

    resolved, method = resolve_config(ds_config), None
    if resolved is None:  # a fixed-clip run: gradient_clipping is the cap
        resolved = resolve_config({**ds_config, "zclip": {}})
    elif isinstance(resolved, AdaGCConfig):
        method = "adagc" if resolved.mode == "adagc-global" else None
    else:
        method = "zclip"
    if isinstance(resolved, AdaGCConfig):
        return method, {"max_grad_norm": resolved.max_grad_norm}, _known(AdaGCConfig, resolved.to_dict())
    return method, _known(ZClipConfig, resolved.to_dict()), {"max_grad_norm": resolved.max_grad_norm}


def resolve_settings(trace: Trace, *, ds_config: Mapping[str, Any] | None = None,
                     zclip: Mapping[str, Any] | None = None, adagc: Mapping[str, Any] | None = None,
                     use_header: bool = True) -> Settings:
    """ZClip and AdaGC-global settings for a replay: ``zclip`` / ``adagc`` (the command line) over
    ``ds_config`` (its "zclip" or "adagc" entry, read as training reads it) over the trace's header over
    the defaults. The run's cap (``max_grad_norm``, DeepSpeed's gradient_clipping) is both methods' cap."""
    method, z, a, notes, origin = None, {}, {}, [], "defaults"
    if ds_config is not None:
        method, z, a = _from_ds_config(ds_config)
        origin = "--ds-config"
    elif use_header and trace.header is not None:
        method, z, a, notes = _from_header(trace.header)
        origin = f"the trace's header ({trace.header.get('method')} run)"
    run_z = ZClipConfig.from_dict(z, source="zclip")
    run_a = AdaGCConfig.from_dict({**a, "mode": "adagc-global"}, source="adagc")
    final_z = ZClipConfig.from_dict({**z, **(zclip or {})}, source="zclip")
    final_a = AdaGCConfig.from_dict({**a, **(adagc or {}), "mode": "adagc-global"}, source="adagc")
    if zclip or adagc:
        origin = "the command line" + ("" if origin == "defaults" else f" over {origin}")
    if (method == "zclip" and final_z != run_z) or (method == "adagc" and final_a != run_a):
        method = None  # not the run's settings: its recorded decisions are no reference
    return Settings(zclip=final_z, adagc=final_a, origin=origin, notes=notes, reproduces=method)


@dataclass
class Replay:
    trace: Trace
    zclip_config: ZClipConfig
    zclip: dict[str, list]
    adagc_config: AdaGCConfig | None
    adagc: dict[str, list] | None
    settings: Settings | None = None


def replay(trace: Trace, zclip_config: ZClipConfig, adagc_config: AdaGCConfig | None = None,
           settings: Settings | None = None) -> Replay:
    """Simulate both methods on a trace (AdaGC skipped when ``adagc_config`` is None)."""
    z = simulate_zclip(trace.norms, zclip_config)
    a = simulate_adagc(trace.norms, adagc_config) if adagc_config is not None else None
    return Replay(trace, zclip_config, z, adagc_config, a, settings)


# ---- output -------------------------------------------------------------------------------------
def _clipped_lines(steps: list[int], norms: list[float], coefs: list[float], clipped: list[bool],
                   limit: int, events: Mapping[int, Event]) -> list[str]:
    """One line per clipped step; where the run recorded an event at that step, who carried the norm."""
    hits = [i for i, c in enumerate(clipped) if c]
    lines = [f"    step {steps[i]:>8}: norm {norms[i]:.6g} -> {norms[i] * coefs[i]:.6g} (x{coefs[i]:.6g})"
             + (f"; in the run: {attribution(events[steps[i]])}" if steps[i] in events else "")
             for i in hits[:limit]]
    if len(hits) > limit:
        lines.append(f"    ... {len(hits) - limit} more (--show to list more, --csv-out for all)")
    return lines


def _agreement(result: Replay) -> str | None:
    """Compare the simulation with the decisions the trace recorded, when it ran with the run's settings."""
    s, t = result.settings, result.trace
    if s is None or s.reproduces is None:
        return None
    if s.reproduces == "zclip" and "clipped" in t.columns:
        recorded, simulated, what = t.columns["clipped"], result.zclip["clipped"], "ZClip"
    elif s.reproduces == "adagc" and "num_clipped_tensors" in t.columns and result.adagc is not None:
        recorded = [None if v is None else v > 0 for v in t.columns["num_clipped_tensors"]]
        simulated, what = result.adagc["clipped"], "AdaGC-global"
    else:
        return None
    if t.gaps():
        return f"  the run's own {what} decisions: not comparable (the trace skips steps)"
    differ = [t.steps[i] for i, (r, c) in enumerate(zip(recorded, simulated)) if r is not None and bool(r) != c]
    if differ:
        return (f"  the run's own {what} decisions differ at {len(differ)} steps (first: step {differ[0]}): "
                "the trace is not the run's every step, or the settings are not the run's")
    return f"  the run's own {what} decisions: the same at every step ({sum(bool(r) for r in recorded if r)} clipped)"


def _settings_text(config: ZClipConfig | AdaGCConfig, skip: Sequence[str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.to_dict().items() if k not in skip)


def report(result: Replay, limit: int = 20) -> str:
    """Human-readable summary: which steps each method clips and by how much."""
    t = result.trace
    n = len(t.norms)
    nonfinite = sum(not math.isfinite(v) for v in t.norms)
    lines = [f"trace: {t.source} [{t.field}], {n} steps ({t.steps[0]}..{t.steps[-1]})"
             + (f", {nonfinite} non-finite" if nonfinite else "")]
    lines += [f"  note: {note}" for note in t.notes]
    if t.gaps():
        lines.append(f"  note: logged every {t.interval()} steps ({t.gaps()} steps not in the trace); the simulation "
                     "sees only the logged ones, so its statistics differ from the run's")
    if result.settings is not None:
        lines.append(f"settings from {result.settings.origin}")
        lines += [f"  note: {note}" for note in result.settings.notes]
    z = result.zclip
    skip = ("nonfinite",) + _OFFLINE_SKIP
    lines.append(f"ZClip ({_settings_text(result.zclip_config, skip)}): {sum(z['clipped'])} steps clipped, "
                 f"{sum(z['spike'])} spikes" + (f", {sum(z['regime_shift'])} regime-shift steps"
                                                if any(z["regime_shift"]) else ""))
    events = t.event_at()
    lines += _clipped_lines(t.steps, t.norms, z["coef"], z["clipped"], limit, events)
    if result.adagc is not None:
        a = result.adagc
        lines.append(f"AdaGC-global ({_settings_text(result.adagc_config, skip + ('mode',))}): "
                     f"{sum(a['clipped'])} steps clipped")
        lines += _clipped_lines(t.steps, t.norms, a["coef"], a["clipped"], limit, events)
    agreement = _agreement(result)
    if agreement:
        lines.append(agreement)
    if t.events:
        index = {step: i for i, step in enumerate(t.steps)}
        unclipped = sum(e.step in index and not z["clipped"][index[e.step]] for e in t.events)
        missing = sum(e.step not in index for e in t.events)
        lines.append("  " + summarize_events(t.events)
                     + (f"; {unclipped} of them not clipped by this ZClip" if unclipped else "")
                     + (f"; {missing} at steps the trace does not hold" if missing else ""))
    return "\n".join(lines)


def write_csv(result: Replay, path: str) -> None:
    """Every step: norm, ZClip threshold/coef/clipped, AdaGC threshold/coef/clipped."""
    t, z, a = result.trace, result.zclip, result.adagc
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        events = t.event_at()
        w.writerow(["step", "grad_norm", "zclip_threshold", "zclip_coef", "zclip_clipped", "zclip_spike"]
                   + (["adagc_threshold", "adagc_coef", "adagc_clipped"] if a else [])
                   + (["run_top_param", "run_top_param_share", "run_top_replica", "run_top_replica_share"]
                      if events else []))
        for i, step in enumerate(t.steps):
            row = [step, repr(t.norms[i]), repr(z["threshold"][i]), repr(z["coef"][i]), int(z["clipped"][i]),
                   int(z["spike"][i])]
            if a:
                row += [repr(a["threshold"][i]), repr(a["coef"][i]), int(a["clipped"][i])]
            if events:
                row += _top_columns(events.get(step))
            w.writerow(row)


def _top_columns(event: Event | None) -> list[Any]:
    """The recorded top parameter and replica with their shares (empty where no event; NaN/Inf as 'nonfinite')."""
    def cell(entry: Any) -> list[Any]:
        if entry is None:
            return ["", ""]
        return [entry[0], "nonfinite" if entry.nonfinite else ("" if entry.share is None else repr(entry.share))]

    if event is None:
        return ["", "", "", ""]
    return cell(event.params[0] if event.params else None) + cell(event.replicas[0] if event.replicas else None)


def plot(result: Replay, path: str) -> str:
    """PNG of the trace, both thresholds and every clipped step (see :mod:`~zclip_dist.plotting`)."""
    from .plotting import plot_replay

    return plot_replay(result, path)

