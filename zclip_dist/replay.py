"""Offline replay: what ZClip (any settings) and AdaGC-global would have done on a logged norm trace.

A trace is the sequence of pre-clip global gradient norms of a run, read from our JSONL metrics, a CSV
column, or TensorBoard event files (DeepSpeed's monitor with ZClip attached, ``Train/zclip/grad_norm``;
Megatron's ``grad-norm``). The simulation feeds it to the same :class:`~zclip_dist.clipper.Clipper` and
:class:`~zclip_dist.clipper.AdaGCClipper` that training uses, so a trace recorded at every step replays
the run's own decisions exactly. Everything runs on the CPU; no GPU, no process group.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from .clipper import AdaGCClipper, Clipper
from .config import AdaGCConfig, ZClipConfig
from .metrics import METRIC_NAMES

__all__ = ["TraceError", "Trace", "Replay", "read_trace", "read_jsonl", "read_csv", "read_tensorboard",
           "simulate_zclip", "simulate_adagc", "replay", "report", "plot"]

#: Names a gradient-norm field goes by, most specific first (ours, Megatron, common loggers).
NORM_KEYS = ("grad_norm", "grad-norm", "Train/zclip/grad_norm", "gradient_norm", "grad_norm_pre_clip", "norm")
STEP_KEYS = ("step", "iteration", "global_step", "steps")
PROGRESS_MIN = 5_000  # traces at least this long get a progress bar


class TraceError(ValueError):
    """A trace cannot be read; the message is one line naming the file and what is wrong."""


@dataclass
class Trace:
    steps: list[int]
    norms: list[float]
    source: str  # file it came from
    field: str  # key, column or tag the norms were read from

    def gaps(self) -> int:
        """Steps missing between the first and last logged one (a log interval > 1 leaves gaps)."""
        return (self.steps[-1] - self.steps[0] + 1 - len(self.steps)) if self.steps else 0


# ---- readers ------------------------------------------------------------------------------------
def _pick(available: Iterable[str], wanted: str | None, what: str, path: str) -> str:
    available = list(available)
    if wanted is not None:
        if wanted not in available:
            raise TraceError(f"{path}: no {what} {wanted!r}; found: {', '.join(available[:12]) or 'none'}")
        return wanted
    for key in NORM_KEYS:
        if key in available:
            return key
    candidates = [k for k in available if "norm" in k.lower() and "grad" in k.lower()]
    if len(candidates) == 1:
        return candidates[0]
    hint = f"candidates: {', '.join(candidates)}" if candidates else f"found: {', '.join(available[:12]) or 'none'}"
    raise TraceError(f"{path}: cannot tell which {what} holds the gradient norm ({hint}); name it with --field")


def _finish(path: str, field: str, rows: list[tuple[int, float]]) -> Trace:
    if not rows:
        raise TraceError(f"{path}: no gradient-norm values in {field!r}")
    rows.sort(key=lambda r: r[0])
    steps = [s for s, _ in rows]
    if len(set(steps)) != len(steps):
        raise TraceError(f"{path}: step numbers repeat in {field!r} (several runs in one file? pick one with --run)")
    return Trace(steps=steps, norms=[n for _, n in rows], source=path, field=field)


def _number(value: Any, path: str, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TraceError(f"{path}: {where}: {value!r} is not a number") from None


def read_jsonl(path: str, field: str | None = None, run: str | None = None) -> Trace:
    """One JSON object per line (``zclip-dist demo`` metrics, ``JsonlSink``); ``run`` filters a "run" key."""
    records: list[dict[str, Any]] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise TraceError(f"{path}:{lineno}: expected a JSON object per line")
            if run is None or record.get("run") == run:
                records.append(record)
    if not records:
        raise TraceError(f"{path}: no records" + (f" with run {run!r}" if run is not None else ""))
    key = _pick(dict.fromkeys(k for r in records for k in r), field, "key", path)
    step_key = next((k for k in STEP_KEYS if all(k in r for r in records)), None)
    rows = [(int(r[step_key]) if step_key else i, _number(r[key], path, f"record {i + 1}"))
            for i, r in enumerate(records) if key in r]
    return _finish(path, key, rows)


def read_csv(path: str, field: str | None = None) -> Trace:
    """A CSV (or TSV) with a header row; the step column is used when there is one, else the row number."""
    with open(path, newline="") as f:
        sample = f.read(4096)
        f.seek(0)
        try:
            dialect = csv.Sniffer().sniff(sample, delimiters=",\t;")
        except csv.Error:
            dialect = csv.excel
        reader = csv.DictReader(f, dialect=dialect)
        if not reader.fieldnames:
            raise TraceError(f"{path}: empty CSV")
        column = _pick(reader.fieldnames, field, "column", path)
        step_col = next((k for k in STEP_KEYS if k in reader.fieldnames), None)
        rows = []
        for i, row in enumerate(reader):
            if row.get(column) in (None, ""):
                continue
            step = int(_number(row[step_col], path, f"row {i + 2}")) if step_col else i
            rows.append((step, _number(row[column], path, f"row {i + 2}")))
    return _finish(path, column, rows)


def read_tensorboard(path: str, field: str | None = None) -> Trace:
    """TensorBoard event files (a file or a directory of them): scalars by tag, steps as logged."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise TraceError("reading TensorBoard files needs the tensorboard package: pip install tensorboard") from None
    acc = EventAccumulator(path, size_guidance={"scalars": 0})  # 0 = keep every value
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    if not tags:
        raise TraceError(f"{path}: no TensorBoard scalars found")
    tag = _pick(tags, field, "tag", path)
    return _finish(path, tag, [(e.step, e.value) for e in acc.Scalars(tag)])


def detect_format(path: str) -> str:
    name = os.path.basename(path).lower()
    if os.path.isdir(path) or "tfevents" in name:
        return "tensorboard"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith((".csv", ".tsv", ".txt")):
        return "csv"
    raise TraceError(f"{path}: cannot tell the format from the name; pass --format jsonl, csv or tensorboard")


def read_trace(path: str, fmt: str = "auto", field: str | None = None, run: str | None = None) -> Trace:
    """Read a trace; every problem is a :class:`TraceError` with a one-line message."""
    if not os.path.exists(path):
        raise TraceError(f"{path}: no such file or directory")
    fmt = detect_format(path) if fmt == "auto" else fmt
    try:
        if fmt == "jsonl":
            return read_jsonl(path, field, run)
        if fmt == "csv":
            return read_csv(path, field)
        if fmt == "tensorboard":
            return read_tensorboard(path, field)
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not a text file (is it a TensorBoard file? pass --format tensorboard)") from None
    except OSError as e:
        raise TraceError(f"{path}: {e.strerror or e}") from None
    raise TraceError(f"unknown format {fmt!r}: use jsonl, csv, tensorboard or auto")


# ---- simulation ---------------------------------------------------------------------------------
def _progress(total: int, desc: str, enabled: bool):
    if not enabled or total < PROGRESS_MIN:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def simulate_zclip(norms: Sequence[float], config: ZClipConfig, progress: bool = True) -> dict[str, list]:
    """ZClip's decision at every step of ``norms``: lists keyed by :data:`~zclip_dist.metrics.METRIC_NAMES`."""
    clipper = Clipper(config, device="cpu", cuda_graph=False)
    values = torch.tensor(list(norms), dtype=torch.float64)
    rows = []
    bar = _progress(len(values), "zclip", progress)
    for i in range(len(values)):
        clipper.step(values[i])
        rows.append(clipper.metrics_tensor())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    table = torch.stack(rows).T.tolist() if rows else [[] for _ in METRIC_NAMES]
    out = dict(zip(METRIC_NAMES, table))
    for name in ("clipped", "spike", "warmup", "skipped", "nonfinite", "regime_shift"):
        out[name] = [bool(v) for v in out[name]]
    return out


def simulate_adagc(norms: Sequence[float], config: AdaGCConfig, progress: bool = True) -> dict[str, list]:
    """AdaGC-global on ``norms``: coefficient, threshold (clip_ratio x gamma; the cap in warmup), clipped."""
    if config.mode != "adagc-global":
        raise ValueError("a norm trace holds only the global norm: replay simulates AdaGC in mode 'adagc-global'")
    clipper = AdaGCClipper(config, cuda_graph=False)
    clipper.bind(("global",), torch.device("cpu"))
    values = torch.tensor(list(norms), dtype=torch.float32)
    coef, threshold, clipped = [], [], []
    bar = _progress(len(values), "adagc", progress)
    for i in range(len(values)):
        warm = bool(clipper.state.count < config.warmup_steps)
        limit = config.max_grad_norm if warm else config.clip_ratio * float(clipper.state.gamma[0])
        g = values[i]
        d = clipper.step((g * g).reshape(1), g)
        coef.append(float(d.coefs[0]))
        clipped.append(bool(d.clipped[0]))
        threshold.append(limit)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {"coef": coef, "threshold": threshold, "clipped": clipped}


@dataclass
class Replay:
    trace: Trace
    zclip_config: ZClipConfig
    zclip: dict[str, list]
    adagc_config: AdaGCConfig | None
    adagc: dict[str, list] | None


def replay(trace: Trace, zclip_config: ZClipConfig, adagc_config: AdaGCConfig | None = None,
           progress: bool = True) -> Replay:
    """Simulate both methods on a trace (AdaGC skipped when ``adagc_config`` is None)."""
    z = simulate_zclip(trace.norms, zclip_config, progress)
    a = simulate_adagc(trace.norms, adagc_config, progress) if adagc_config is not None else None
    return Replay(trace, zclip_config, z, adagc_config, a)


# ---- output -------------------------------------------------------------------------------------
def _clipped_lines(steps: list[int], norms: list[float], coefs: list[float], clipped: list[bool],
                   limit: int) -> list[str]:
    hits = [i for i, c in enumerate(clipped) if c]
    lines = [f"    step {steps[i]:>8}: norm {norms[i]:.6g} -> {norms[i] * coefs[i]:.6g} (x{coefs[i]:.6g})"
             for i in hits[:limit]]
    if len(hits) > limit:
        lines.append(f"    ... {len(hits) - limit} more (--show to list more, --csv-out for all)")
    return lines


def report(result: Replay, limit: int = 20) -> str:
    """Human-readable summary: which steps each method clips and by how much."""
    t = result.trace
    n = len(t.norms)
    nonfinite = sum(not math.isfinite(v) for v in t.norms)
    lines = [f"trace: {t.source} [{t.field}], {n} steps ({t.steps[0]}..{t.steps[-1]})"
             + (f", {nonfinite} non-finite" if nonfinite else "")]
    if t.gaps():
        lines.append(f"  note: {t.gaps()} steps are missing (logged every few steps?); the simulation sees only "
                     "the logged ones, so its statistics differ from the run's")
    z, cfg = result.zclip, result.zclip_config
    settings = ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items() if k not in ("nonfinite", "verify_every"))
    lines.append(f"ZClip ({settings}): {sum(z['clipped'])} steps clipped, {sum(z['spike'])} spikes")
    lines += _clipped_lines(t.steps, t.norms, z["coef"], z["clipped"], limit)
    if result.adagc is not None:
        a, acfg = result.adagc, result.adagc_config
        lines.append(f"AdaGC-global (clip_ratio={acfg.clip_ratio}, beta={acfg.beta}, warmup_steps={acfg.warmup_steps}, "
                     f"max_grad_norm={acfg.max_grad_norm}): {sum(a['clipped'])} steps clipped")
        lines += _clipped_lines(t.steps, t.norms, a["coef"], a["clipped"], limit)
    return "\n".join(lines)


def write_csv(result: Replay, path: str) -> None:
    """Every step: norm, ZClip threshold/coef/clipped, AdaGC threshold/coef/clipped."""
    t, z, a = result.trace, result.zclip, result.adagc
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "grad_norm", "zclip_threshold", "zclip_coef", "zclip_clipped", "zclip_spike"]
                   + (["adagc_threshold", "adagc_coef", "adagc_clipped"] if a else []))
        for i, step in enumerate(t.steps):
            row = [step, repr(t.norms[i]), repr(z["threshold"][i]), repr(z["coef"][i]), int(z["clipped"][i]),
                   int(z["spike"][i])]
            if a:
                row += [repr(a["threshold"][i]), repr(a["coef"][i]), int(a["clipped"][i])]
            w.writerow(row)


def plot(result: Replay, path: str) -> str:
    """PNG: the norm trace, both thresholds, and the steps each method clips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, z, a = result.trace, result.zclip, result.adagc
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.plot(t.steps, t.norms, color="0.45", lw=0.8, label="grad norm (trace)")
    live = [i for i, w in enumerate(z["warmup"]) if not w]
    ax.plot([t.steps[i] for i in live], [z["threshold"][i] for i in live], color="tab:blue", lw=1,
            label="ZClip threshold")
    zc = [i for i, c in enumerate(z["clipped"]) if c]
    ax.scatter([t.steps[i] for i in zc], [t.norms[i] for i in zc], s=14, color="tab:blue", marker="o",
               label=f"clipped by ZClip ({len(zc)})", zorder=3)
    if a is not None:
        ax.plot(t.steps, a["threshold"], color="tab:orange", lw=1, ls="--", label="AdaGC-global threshold")
        ac = [i for i, c in enumerate(a["clipped"]) if c]
        ax.scatter([t.steps[i] for i in ac], [t.norms[i] for i in ac], s=30, facecolors="none",
                   edgecolors="tab:orange", marker="s", label=f"clipped by AdaGC-global ({len(ac)})", zorder=2)
    finite = [v for v in t.norms if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("global grad norm")
    ax.set_title(f"replay of {os.path.basename(t.source)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
