"""Reading a run's gradient-norm trace: our JSON-lines metrics, a CSV column, or TensorBoard events.

Where each engine writes, and against what:

* our JSONL (``log_jsonl`` of any front end, ``zclip-dist demo``): one object per logged step after a
  header line with the method and its settings (``metrics.header``); non-finite values are ``null``
  and named in ``"nonfinite_values"``;
* DeepSpeed's TensorBoard monitor: ``output_path/job_name/events.*``, every scalar against the
  *sample* count (``global_samples``): ours as ``Train/zclip/<metric>`` (``Train/zclip/step`` holds the
  optimizer step), DeepSpeed's as ``Train/Samples/lr`` (every optimizer step);
* Megatron's TensorBoard: ``grad-norm`` against the iteration (ours as ``zclip/<metric>``).

Spike-forensics events come along as :attr:`Trace.events`: from the JSONL lines' ``events`` field, or
rebuilt from the ``<prefix>event/*`` scalars a monitor received (grad norm and shares; the kinds and
the threshold from the decisions logged at the same step; the replicas' ranks are not in the scalars).

Every problem is a :class:`TraceError` whose message is one line naming the file.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .forensics import Event, ReplicaShare, Share, events_in
from .metrics import HEADER_KEY, NONFINITE_KEY

__all__ = ["TraceError", "Trace", "read_trace", "read_jsonl", "read_csv", "read_tensorboard", "detect_format",
           "NORM_KEYS"]

#: Names a gradient-norm field goes by, most specific first (ours, Megatron, DeepSpeed with ZClip/AdaGC).
NORM_KEYS = ("grad_norm", "grad-norm", "Train/zclip/grad_norm", "Train/adagc/grad_norm", "zclip/grad_norm",
             "adagc/grad_norm", "gradient_norm", "grad_norm_pre_clip", "norm")
#: Step keys, preferred first; ``call`` (the clipper's call count) when a record has nothing better.
STEP_KEYS = ("step", "iteration", "global_step", "steps", "call")
#: Where a monitor's forensics scalars live under the metrics' prefix (see ``forensics.event_scalars``).
EVENT_TAG = "event/"
#: DeepSpeed's monitor writes these against samples; ``lr`` is written at every optimizer step.
DEEPSPEED_PREFIX = "Train/"
DEEPSPEED_EVERY_STEP_TAG = "Train/Samples/lr"


class TraceError(ValueError):
    """A trace cannot be read; the message is one line naming the file and what is wrong."""


@dataclass
class Trace:
    steps: list[int]
    norms: list[float]
    source: str  # file or folder it came from
    field: str  # key, column or tag the norms were read from
    header: dict[str, Any] | None = None  # our JSONL header: method and settings of the run
    columns: dict[str, list[Any]] = field(default_factory=dict)  # other logged metrics, aligned with steps
    notes: list[str] = field(default_factory=list)  # how the steps were derived, settings changes, ...
    events: list[Event] = field(default_factory=list)  # spike forensics the run recorded, by step

    def event_at(self) -> dict[int, Event]:
        """The recorded events by step."""
        return {e.step: e for e in self.events}

    def gaps(self) -> int:
        """Steps missing between the first and last logged one (a log interval > 1 leaves gaps)."""
        return (self.steps[-1] - self.steps[0] + 1 - len(self.steps)) if self.steps else 0

    def interval(self) -> int:
        """The most common distance between logged steps (1 when every step is logged)."""
        diffs: dict[int, int] = {}
        for a, b in zip(self.steps, self.steps[1:]):
            diffs[b - a] = diffs.get(b - a, 0) + 1
        return max(diffs, key=diffs.__getitem__) if diffs else 1


# ---- helpers ------------------------------------------------------------------------------------
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


def _number(value: Any, path: str, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TraceError(f"{path}: {where}: {value!r} is not a number") from None


def _finish(path: str, field_name: str, steps: list[int], norms: list[float], columns: dict[str, list[Any]], *,
            keep_last: bool = False, notes: list[str] | None = None, header: dict[str, Any] | None = None,
            events: Iterable[Event] = ()) -> Trace:
    """Order by step, check the norms; ``columns`` are the other metrics, aligned with ``steps``."""
    if not steps:
        raise TraceError(f"{path}: no gradient-norm values in {field_name!r}")
    notes = list(notes or [])
    order: list[int] | None = None  # the rows to keep, in step order (None: all, as they are)
    if keep_last:  # a resumed run logs the steps after its checkpoint again: the later lines are the run's
        last = {step: i for i, step in enumerate(steps)}
        if len(last) < len(steps):
            notes.append(f"{len(steps) - len(last)} steps were logged twice (a resumed run); the later ones are used")
            order = sorted(last.values())
    kept = steps if order is None else [steps[i] for i in order]
    if any(a >= b for a, b in zip(kept, kept[1:])):
        order = sorted(order if order is not None else range(len(steps)), key=steps.__getitem__)
        if any(steps[a] == steps[b] for a, b in zip(order, order[1:])):
            raise TraceError(f"{path}: step numbers repeat in {field_name!r} (several runs in one file? pick one with --run)")
    if order is not None:
        steps, norms = [steps[i] for i in order], [norms[i] for i in order]
        columns = {k: [v[i] for i in order] for k, v in columns.items()}
    negative = next((i for i, v in enumerate(norms) if v < 0), None)
    if negative is not None:
        raise TraceError(f"{path}: the norm at step {steps[negative]} is {norms[negative]!r}: "
                         "a gradient norm is never negative")
    by_step = {e.step: e for e in events}  # the later record of a step a resumed run logged twice
    return Trace(steps=steps, norms=norms, source=path, field=field_name, header=header, columns=columns, notes=notes,
                 events=[by_step[k] for k in sorted(by_step)])


# ---- JSONL --------------------------------------------------------------------------------------
def _value(record: Mapping[str, Any], key: str) -> Any:
    """A record's value, with a null flagged in ``nonfinite_values`` restored to NaN/Inf."""
    value = record.get(key)
    if value is None:
        spelled = (record.get(NONFINITE_KEY) or {}).get(key)
        return float(spelled) if isinstance(spelled, str) else None
    return value


def read_jsonl(path: str, field_name: str | None = None, run: str | None = None) -> Trace:
    """One JSON object per line after an optional header (``log_jsonl``, ``zclip-dist demo``);
    ``run`` keeps the records whose "run" key has that value."""
    records: list[dict[str, Any]] = []
    headers: list[tuple[int, dict[str, Any]]] = []
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
            if HEADER_KEY in record:
                headers.append((len(records), record))
            elif run is None or record.get("run") == run:
                records.append(record)
    if not records:
        raise TraceError(f"{path}: no records" + (f" with run {run!r}" if run is not None else ""))
    notes = []
    header = headers[-1][1] if headers else None
    changed = [at for (at, h), (_, before) in zip(headers[1:], headers) if h.get("settings") != before.get("settings")]
    if changed:
        notes.append(f"the settings changed at record {changed[-1] + 1} (a resumed run?); the latest ones are "
                     "used for the whole trace")
    keys = dict.fromkeys(k for r in records for k in r if k not in (NONFINITE_KEY, "run", "events"))
    key = _pick(keys, field_name, "key", path)
    step_key = next((k for k in STEP_KEYS if all(k in r for r in records)), None)
    others = [k for k in keys if k not in (key, step_key)]
    steps, norms, columns = [], [], {k: [] for k in others}
    for i, r in enumerate(records):
        norm = _value(r, key)
        if norm is None:
            continue
        steps.append(int(_number(r[step_key], path, f"record {i + 1}")) if step_key else i)
        norms.append(_number(norm, path, f"record {i + 1}"))
        for k in others:
            columns[k].append(_value(r, k))
    try:
        events = events_in(records)
    except (KeyError, TypeError, ValueError) as e:
        raise TraceError(f"{path}: an \"events\" entry is malformed ({type(e).__name__}: {e})") from None
    return _finish(path, key, steps, norms, columns, keep_last=len(headers) > 1, notes=notes, header=header,
                   events=events)


# ---- CSV ----------------------------------------------------------------------------------------
def read_csv(path: str, field_name: str | None = None) -> Trace:
    """A CSV (or TSV) with a header row; the step column is used when there is one, else the row number."""
    with open(path, newline="") as f:
        sample = f.read(4096)
        f.seek(0)
        try:
            dialect = csv.Sniffer().sniff(sample, delimiters=",\t;")
        except csv.Error:
            dialect = csv.excel
        reader = csv.reader(f, dialect=dialect)
        names = next(reader, None)
        if not names:
            raise TraceError(f"{path}: empty CSV")
        column = _pick(names, field_name, "column", path)
        step_col = next((k for k in STEP_KEYS if k in names), None)
        at, step_at = names.index(column), (names.index(step_col) if step_col else None)
        others = [(k, j) for j, k in enumerate(names) if j not in (at, step_at)]
        steps, norms, columns = [], [], {k: [] for k, _ in others}
        for i, row in enumerate(reader):
            if len(row) <= at or row[at] == "":
                continue
            steps.append(int(_number(row[step_at], path, f"row {i + 2}")) if step_at is not None else i)
            norms.append(_number(row[at], path, f"row {i + 2}"))
            for k, j in others:
                columns[k].append(row[j] if j < len(row) else None)
    return _finish(path, column, steps, norms, columns)


# ---- TensorBoard --------------------------------------------------------------------------------
def _event_dirs(path: str) -> list[str]:
    """``path`` if it is an event file; else every folder under it that holds event files (DeepSpeed
    writes into ``output_path/job_name/``, Megatron into ``--tensorboard-dir``)."""
    if os.path.isfile(path):
        return [path]
    found = []
    for folder, _, files in os.walk(path):
        if any("tfevents" in name for name in files):
            found.append(folder)
    return sorted(found)


def _load(run: str) -> Any:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise TraceError('reading TensorBoard event files needs the tensorboard package: '
                         'pip install "zclip-dist[tensorboard]"') from None
    acc = EventAccumulator(run, size_guidance={"scalars": 0})  # 0 = keep every value
    acc.Reload()
    return acc


def _samples_to_steps(acc: Any, tags: list[str], tag: str, xs: list[int], path: str,
                      samples_per_step: int | None) -> tuple[list[int], str]:
    """Optimizer steps for DeepSpeed's sample-count x-axis, and how they were found."""
    prefix = tag.rsplit("/", 1)[0] + "/"
    if samples_per_step is None and prefix + "step" in tags:  # ours: the clipper's step at the same x
        by_x = {e.step: int(e.value) for e in acc.Scalars(prefix + "step")}
        if all(x in by_x for x in xs):
            return [by_x[x] for x in xs], f"steps from {prefix}step"
    source = "--samples-per-step"
    if samples_per_step is None and DEEPSPEED_EVERY_STEP_TAG in tags:
        every = sorted({e.step for e in acc.Scalars(DEEPSPEED_EVERY_STEP_TAG)})
        diffs = [b - a for a, b in zip(every, every[1:]) if b > a]
        if diffs:
            samples_per_step, source = min(diffs), f"the spacing of {DEEPSPEED_EVERY_STEP_TAG}"
    if samples_per_step is None:
        raise TraceError(f"{path}: DeepSpeed logs {tag!r} against samples and the samples per optimizer step cannot "
                         "be told from the file; pass --samples-per-step (train_batch_size)")
    if any(x % samples_per_step for x in xs):
        raise TraceError(f"{path}: sample counts of {tag!r} are not multiples of {samples_per_step} samples per step "
                         f"(from {source}; a changing batch size?); pass --samples-per-step")
    return [x // samples_per_step for x in xs], f"steps = samples / {samples_per_step} (from {source})"


def read_tensorboard(path: str, field_name: str | None = None, samples_per_step: int | None = None) -> Trace:
    """TensorBoard event files: a file, a run folder, or a folder above one (DeepSpeed's output_path).

    DeepSpeed's ``Train/...`` scalars are logged against samples: they are converted to optimizer steps
    (``Train/zclip/step`` when present, else ``samples_per_step``, else the spacing of DeepSpeed's
    every-step learning-rate scalar).
    """
    runs = _event_dirs(path)
    if not runs:
        raise TraceError(f"{path}: no TensorBoard event files (*tfevents*) found")
    loaded = []
    for run in runs:
        acc = _load(run)
        tags = acc.Tags().get("scalars", [])
        if tags:
            loaded.append((run, acc, tags))
    if not loaded:
        raise TraceError(f"{path}: no TensorBoard scalars found")
    if len(loaded) > 1:
        with_norm = []
        for run, acc, tags in loaded:
            try:
                _pick(tags, field_name, "tag", run)
                with_norm.append((run, acc, tags))
            except TraceError:
                pass
        if len(with_norm) != 1:
            names = ", ".join(os.path.relpath(r, path) for r, _, _ in (with_norm or loaded))
            raise TraceError(f"{path}: {len(with_norm) or len(loaded)} TensorBoard runs here ({names}); "
                             "point at one of them")
        loaded = with_norm
    run, acc, tags = loaded[0]
    tag = _pick(tags, field_name, "tag", run)
    events = acc.Scalars(tag)
    xs = [e.step for e in events]
    notes = []
    steps = xs
    if tag.startswith(DEEPSPEED_PREFIX):
        steps, how = _samples_to_steps(acc, tags, tag, xs, path, samples_per_step)
        notes.append(f"DeepSpeed logs against samples: {how}")
    # the other metrics written with the norm (Train/zclip/*, zclip/*), aligned by the x-axis
    prefix = tag.rsplit("/", 1)[0] + "/" if "/" in tag else None
    others = {t[len(prefix):]: {e.step: e.value for e in acc.Scalars(t)}
              for t in tags if prefix and t.startswith(prefix) and t != tag}
    for name in [n for n in others if n.startswith(EVENT_TAG)]:
        del others[name]  # the events' scalars: read below
    columns = {name: [values.get(x) for x in xs] for name, values in others.items()}
    source = run if run == path else f"{path} ({os.path.relpath(run, path)})"
    return _finish(source, tag, list(steps), [float(e.value) for e in events], columns, notes=notes,
                   events=_tensorboard_events(acc, tags, dict(zip(xs, steps)) if steps is not xs else None))


def _tensorboard_events(acc: Any, tags: list[str], step_of: dict[int, int] | None) -> list[Event]:
    """Events rebuilt from a monitor's ``<prefix>event/grad_norm``, ``.../param/<name>`` and
    ``.../replica/<i>`` scalars, whatever tag the norm was read from (Megatron's ``grad-norm`` included);
    the kinds from the ``<prefix>clipped`` / ``spike`` / ``nonfinite`` (AdaGC: ``num_clipped_tensors``)
    scalars at the same x, ZClip's threshold from ``<prefix>threshold``. ``step_of``: DeepSpeed's sample
    count -> step (completed by ``<prefix>step``, written with every event; an x found in neither is left
    out); None: x is the step (Megatron's iteration)."""
    out = []
    for norm_tag in [t for t in tags if t.endswith(EVENT_TAG + "grad_norm")]:
        base = norm_tag[:-len("grad_norm")]
        prefix = base[:-len(EVENT_TAG)]

        def values(tag: str) -> dict[int, float]:
            return {e.step: e.value for e in acc.Scalars(tag)} if tag in tags else {}

        flags = {k: values(prefix + k) for k in ("clipped", "spike", "nonfinite", "num_clipped_tensors", "threshold")}
        shares = {t[len(base):]: values(t) for t in tags if t.startswith(base) and t != norm_tag}
        method = "adagc" if "adagc" in prefix else "zclip"
        known = None if step_of is None else {**{x: int(v) for x, v in values(prefix + "step").items()}, **step_of}
        for x, norm in sorted(values(norm_tag).items()):
            if known is None or x in known:
                out.append(_event_at(x, x if known is None else known[x], norm, shares, flags, method))
    return out


def _event_at(x: int, step: int, norm: float, shares: Mapping[str, Mapping[int, float]],
              flags: Mapping[str, Mapping[int, float]], method: str) -> Event:
    def entries(kind: str) -> list[tuple[str, float | None, bool]]:
        got = [(name[len(kind):], None if math.isnan(v[x]) else float(v[x]), math.isnan(v[x]))
               for name, v in shares.items() if name.startswith(kind) and x in v]
        return sorted(got, key=lambda e: (not e[2], -(e[1] or 0.0)))  # NaN/Inf first, then by share

    # AdaGC logs no "clipped" flag: a step is clipped when it clipped at least one tensor.
    kinds = tuple(k for k in ("clipped", "spike", "nonfinite")
                  if flags[k].get(x) or (k == "clipped" and flags["num_clipped_tensors"].get(x)))
    threshold = flags["threshold"].get(x)  # ZClip's, logged with the decisions
    return Event(step=step, method=method, kinds=kinds, grad_norm=float(norm) if math.isfinite(norm) else None,
                 threshold=float(threshold) if threshold is not None and math.isfinite(threshold) else None,
                 params=tuple(Share(n, s, bad) for n, s, bad in entries("param/")),
                 replicas=tuple(ReplicaShare(int(i), (), s, bad) for i, s, bad in entries("replica/")))


# ---- any ----------------------------------------------------------------------------------------
def detect_format(path: str) -> str:
    name = os.path.basename(os.path.normpath(path)).lower()
    if os.path.isdir(path) or "tfevents" in name:
        return "tensorboard"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith((".csv", ".tsv", ".txt")):
        return "csv"
    raise TraceError(f"{path}: cannot tell the format from the name; pass --format jsonl, csv or tensorboard")


def read_trace(path: str, fmt: str = "auto", field_name: str | None = None, run: str | None = None,
               samples_per_step: int | None = None) -> Trace:
    """Read a trace; every problem is a :class:`TraceError` with a one-line message."""
    if not os.path.exists(path):
        raise TraceError(f"{path}: no such file or directory")
    fmt = detect_format(path) if fmt == "auto" else fmt
    try:
        if fmt == "jsonl":
            return read_jsonl(path, field_name, run)
        if fmt == "csv":
            return read_csv(path, field_name)
        if fmt == "tensorboard":
            return read_tensorboard(path, field_name, samples_per_step)
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not a text file (is it a TensorBoard file? pass --format tensorboard)") from None
    except OSError as e:
        raise TraceError(f"{path}: {e.strerror or e}") from None
    raise TraceError(f"unknown format {fmt!r}: use jsonl, csv, tensorboard or auto")
