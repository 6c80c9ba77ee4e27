"""Spike forensics, the math and the record: which parameters and which replicas carried a step's norm.

Pure functions of device tensors (no communication, no host read):

* **parameters** -- the global squared norm is the sum of every tensor's squared norm, so a tensor's share
  of it is ``sq_i / sum(sq)``. The per-tensor squares come out of the norm's own all-reduce
  (:meth:`NormCalculator.with_squares <zclip_dist.norms.NormCalculator.with_squares>`), where the TP and
  ZeRO/FSDP pieces of one tensor have already been added up; pieces that carry the same *logical* name
  (see :func:`logical_name`) are summed once more here, so a parameter is named once however it is split.
* **replicas** -- replica ``r``'s share is ``q_r / sum(q)``, where ``q_r`` is the squared norm of that
  replica's own gradient *before* the data-parallel reduction (its micro-batches' gradient). The shares
  add up to one over the replicas; they are not a decomposition of the reduced gradient's norm (that
  has cross terms), but a replica whose batch spikes carries almost all of the sum.

Non-finite entries rank first and carry no share (``NONFINITE``); the shares of the finite entries are
taken of the finite total, so a NaN step still says which tensor and which replica held the NaN.
:class:`Event` is the host-side record (JSON-safe: no NaN/Inf) and :func:`format_events` the text the
``zclip-dist`` command prints for a run's events.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["logical_name", "NameIndex", "name_index", "by_name", "top_shares", "kind_weights", "event_flags", "Share",
           "ReplicaShare", "Event", "event_scalars", "events_in", "format_events", "attribution", "summarize_events",
           "NONFINITE", "KIND_BITS"]

#: Share value marking a non-finite entry (a real share is in [0, 1]).
NONFINITE = -1.0
#: Event kinds as bits of one float (the device record is a float64 row).
KIND_BITS = {"clipped": 1, "spike": 2, "nonfinite": 4}

# Wrappers that prefix parameter names without changing the parameter: DDP / DataParallel ("module."),
# FSDP1 and activation checkpointing wrappers, torch.compile ("_orig_mod.").
_WRAPPER = re.compile(r"(^|\.)(module|_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def logical_name(name: str) -> str:
    """The parameter's name without wrapper prefixes: ``module._orig_mod.fc.weight`` -> ``fc.weight``."""
    while True:
        stripped = _WRAPPER.sub(r"\1", name, count=1)
        if stripped == name:
            return name
        name = stripped


class NameIndex(NamedTuple):
    """Plan position -> logical parameter: built once per parameter set."""

    names: tuple[str, ...]  # logical names, unique, in first-seen order
    index: Tensor  # int64 [n_tensors] on the device: position -> index into ``names``
    identity: bool  # every position is its own name: no summing pass needed


def name_index(names: Sequence[str], device: torch.device | str, *, rename=logical_name) -> NameIndex:
    """Index tensors by logical name (``rename``: e.g. strip an expert number to sum all experts)."""
    table: dict[str, int] = {}
    ids = [table.setdefault(rename(n), len(table)) for n in names]
    return NameIndex(tuple(table), torch.tensor(ids, dtype=torch.int64, device=device), len(table) == len(ids))


def by_name(squares: Tensor, index: NameIndex) -> Tensor:
    """Per-logical-parameter sums of the per-tensor squares (NaN/Inf kept)."""
    if index.identity:
        return squares
    out = torch.zeros(len(index.names), dtype=squares.dtype, device=squares.device)
    return out.index_add_(0, index.index, squares)


def top_shares(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of ``values`` (``k <= len(values)``): ``(indices, shares)``.

    Non-finite entries rank first with share ``NONFINITE``; finite shares are of the finite total (NaN
    when that total is 0: nothing was measured).
    """
    finite = torch.isfinite(values)
    clean = torch.where(finite, values, torch.zeros_like(values))
    key = torch.where(finite, values, torch.full_like(values, math.inf))
    idx = torch.topk(key, k, sorted=True).indices
    shares = clean.index_select(0, idx) / clean.sum()
    return idx, torch.where(finite.index_select(0, idx), shares, torch.full_like(shares, NONFINITE))


def kind_weights(kinds: Sequence[str], device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Constants for :func:`event_flags`, made once: (which kinds are events, the kinds' bits)."""
    wanted = [float(k in kinds) for k in KIND_BITS]
    return (torch.tensor(wanted, dtype=torch.float64, device=device),
            torch.tensor([float(b) for b in KIND_BITS.values()], dtype=torch.float64, device=device))


def event_flags(weights: tuple[Tensor, Tensor], *, clipped: Tensor, spike: Tensor, nonfinite: Tensor
                ) -> tuple[Tensor, Tensor]:
    """``(is_event, bits)`` as device tensors: is this step an event, and which kinds it is."""
    flags = torch.stack([clipped, spike, nonfinite]).to(torch.float64)  # in KIND_BITS order
    wanted, bits = weights
    return torch.dot(flags, wanted) > 0, torch.dot(flags, bits)


# ---- the host-side record ------------------------------------------------------------------------
class Share(NamedTuple):
    """A parameter's share of the squared global norm; ``share`` is None when its norm is NaN/Inf."""

    name: str
    share: float | None
    nonfinite: bool = False


class ReplicaShare(NamedTuple):
    """A data-parallel replica (its index, its global ranks) and its share of the replicas' squared norms."""

    replica: int
    ranks: tuple[int, ...]
    share: float | None
    nonfinite: bool = False


@dataclass(frozen=True)
class Event:
    """One clipped, spike or non-finite step: what happened, and who carried the norm."""

    step: int  # the clipper's step count (the ``step`` of the metrics record of that step)
    method: str  # "zclip" or "adagc"
    kinds: tuple[str, ...]  # of "clipped", "spike", "nonfinite"
    grad_norm: float | None  # pre-clip global norm; None when non-finite
    threshold: float | None  # largest norm that passed unclipped (ZClip); None for AdaGC
    params: tuple[Share, ...]  # largest shares first
    replicas: tuple[ReplicaShare, ...]  # largest shares first; empty when not measured

    def to_json(self) -> dict[str, Any]:
        """Strict JSON (no NaN/Inf): the ``events`` entries of the JSON-lines sink."""
        return {"step": self.step, "method": self.method, "kinds": list(self.kinds), "grad_norm": self.grad_norm,
                "threshold": self.threshold,
                "params": [{"name": p.name, "share": p.share, **({"nonfinite": True} if p.nonfinite else {})}
                           for p in self.params],
                "replicas": [{"replica": r.replica, "ranks": list(r.ranks), "share": r.share,
                              **({"nonfinite": True} if r.nonfinite else {})} for r in self.replicas]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Event":
        return cls(step=int(d["step"]), method=d.get("method", "zclip"), kinds=tuple(d.get("kinds", ())),
                   grad_norm=d.get("grad_norm"), threshold=d.get("threshold"),
                   params=tuple(Share(p["name"], p.get("share"), bool(p.get("nonfinite", False)))
                                for p in d.get("params", ())),
                   replicas=tuple(ReplicaShare(int(r["replica"]), tuple(r.get("ranks", ())), r.get("share"),
                                               bool(r.get("nonfinite", False))) for r in d.get("replicas", ())))


def event_scalars(event: Event, prefix: str = "zclip/event/") -> dict[str, float]:
    """An event as scalars for loggers that take numbers only (TensorBoard, W&B, Lightning, DeepSpeed's
    monitor, Megatron's writer): ``grad_norm``, ``param/<name>`` and ``replica/<index>`` shares (NaN for
    a non-finite entry), logged at the event's step."""
    out = {f"{prefix}grad_norm": math.nan if event.grad_norm is None else event.grad_norm}
    for p in event.params:
        out[f"{prefix}param/{p.name}"] = math.nan if p.share is None else p.share
    for r in event.replicas:
        out[f"{prefix}replica/{r.replica}"] = math.nan if r.share is None else r.share
    return out


def events_in(records: Iterable[Mapping[str, Any] | Event]) -> list[Event]:
    """The events of a run: from JSON-lines metric records (their ``events`` field), event dicts or Events."""
    out: list[Event] = []
    for rec in records:
        if isinstance(rec, Event):
            out.append(rec)
        elif "events" in rec:
            out.extend(Event.from_json(e) for e in rec["events"] or ())
        elif "kinds" in rec and "params" in rec:
            out.append(Event.from_json(rec))
    return out


def _pct(share: float | None, nonfinite: bool) -> str:
    return "NaN/Inf" if nonfinite else "?" if share is None else f"{100 * share:.3g}%"


def _num(value: float | None) -> str:
    return "NaN/Inf" if value is None else f"{value:.4g}"


def _replica_text(r: ReplicaShare) -> str:
    ranks = f" (rank{'s' if len(r.ranks) != 1 else ''} {','.join(map(str, r.ranks))})" if r.ranks else ""
    return f"{r.replica}{ranks}"


def attribution(event: Event) -> str:
    """The top parameter and the top replica of an event, in a few words (report and replay lines)."""
    parts = []
    if event.params:
        p = event.params[0]
        parts.append(f"{p.name} {_pct(p.share, p.nonfinite)}")
    if event.replicas:
        r = event.replicas[0]
        parts.append(f"replica {_replica_text(r)} {_pct(r.share, r.nonfinite)}")
    return ", ".join(parts) or "no attribution recorded"


def summarize_events(events: Sequence[Event]) -> str:
    """One line over a run's events: how many, and which parameter and replica came first most often."""
    if not events:
        return "forensics: no events recorded (forensics off, or no clipped, spike or non-finite step)"

    def most(keys: list) -> str:
        counts: dict[Any, int] = {}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
        return ", ".join(f"{k} ({n} of {len(events)})" for k, n in ranked)

    line = f"forensics: {len(events)} event(s); top parameter: " + (
        most([e.params[0].name for e in events if e.params]) or "-")
    replicas = [_replica_text(e.replicas[0]) for e in events if e.replicas]
    return line + (f"; top replica: {most(replicas)}" if replicas else "; replicas not measured")


def format_events(records: Iterable[Mapping[str, Any] | Event], *, limit: int | None = None) -> str:
    """A table of a run's events, one line each: step, kinds, norm -> threshold, top parameters, top replicas.

    ``records``: the parsed lines of a JSON-lines metrics file (or Events). ``limit``: the last N only.
    """
    events = events_in(records)
    if not events:
        return "no clipped, spike or non-finite steps recorded"
    shown = events[-limit:] if limit else events
    rows = [("step", "kind", "norm", "threshold", "top parameters", "top replicas")]
    for e in shown:
        params = ", ".join(f"{p.name} {_pct(p.share, p.nonfinite)}" for p in e.params) or "-"
        reps = ", ".join(f"{_replica_text(r)} {_pct(r.share, r.nonfinite)}" for r in e.replicas) or "-"
        threshold = "-" if e.method == "adagc" else _num(e.threshold)  # AdaGC's thresholds are per tensor
        rows.append((str(e.step), "+".join(e.kinds), _num(e.grad_norm), threshold, params, reps))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows]
    head = f"{len(events)} event(s)" + (f", last {len(shown)} shown" if len(shown) < len(events) else "")
    return "\n".join([head, *lines])
