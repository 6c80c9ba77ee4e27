"""Event recording without a host read: a ring buffer on the device, read only when the host reads anyway.

Every optimizer step the clipper hands :meth:`EventRecorder.record` its decision and the attribution
vectors. Whether the step is an event is a device tensor, so the row is *always* computed and written
with ``torch.where(is_event, row, old)`` at position ``count % capacity``, and ``count`` advances by
``is_event``: a few dozen small kernels, no branch on a value, no transfer. The buffer goes to the host in one
transfer only at a read: on rank 0 at each JSON-lines log step (which reads the metrics anyway), every
``read_every`` steps on every rank, and on ``events()``. A read decodes the new rows into
:class:`~zclip_dist.forensics.Event` objects and hands each to ``on_event``, once. More than ``capacity``
events between two reads: the oldest are dropped, counted and warned about.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor

from .clipper import host_list
from .config import ForensicsConfig
from .forensics import (KIND_BITS, NONFINITE, Event, NameIndex, ReplicaShare, Share, by_name, event_flags,
                        kind_weights, name_index, top_shares)
from .replicas import ReplicaMeter, replica_ranks
from .topology import Topology

__all__ = ["EventRecorder", "Forensics"]

_HEAD = 5  # step, norm, threshold, kind bits, name-table id


class EventRecorder:
    """Device ring buffer of events for one clipper.

    Args:
        config: the forensics settings (``top_k``, ``top_replicas``, ``events``, ``capacity``, ``read_every``).
        method: ``"zclip"`` or ``"adagc"`` (written into each event).
        device: where the buffer lives (the gradients' device).
        on_event: called with each :class:`Event` once, when it is read on this rank.
    """

    def __init__(self, config: ForensicsConfig, *, method: str, device: torch.device | str,
                 on_event: Callable[[Event], None] | None = None) -> None:
        self.config, self.method, self.on_event = config, method, on_event
        self.device = torch.device(device)
        self.kp = config.top_k
        self.kr = config.top_replicas if config.replicas else 0
        self.width = _HEAD + 2 * self.kp + 2 * self.kr
        self.buf = torch.zeros(config.capacity, self.width, dtype=torch.float64, device=self.device)
        self.count = torch.zeros((), dtype=torch.int64, device=self.device)
        self._kinds = kind_weights(config.events, self.device)
        self.replica_ranks: Sequence[tuple[int, ...]] | None = None  # replica -> its global ranks
        self.keep_for_log = False  # the clipper writes JSON lines: keep read events for the next line
        # The buffer lives in host memory by design (an engine that decides on the host): reading it is no sync.
        self.host_resident = False
        self.dropped = 0
        self._tables: list[tuple[tuple[str, ...], NameIndex]] = []  # by table id: (names, index)
        self._table_id: Tensor | None = None
        self._read = 0
        self._records = 0
        self._unlogged: list[Event] = []
        self._pads: dict[int, Tensor] = {}

    # ---- names -----------------------------------------------------------------------------------
    def bind_names(self, names: Sequence[str]) -> None:
        """The logical names of the per-tensor squares' positions. Rows keep the table they were written
        with, so a read after the parameter set changed still names the right tensors."""
        names = tuple(names)
        if self._tables and self._tables[-1][0] == names:
            return
        self._tables.append((names, name_index(names, self.device)))
        self._table_id = torch.full((1,), float(len(self._tables) - 1), dtype=torch.float64, device=self.device)

    @property
    def names(self) -> NameIndex | None:
        return self._tables[-1][1] if self._tables else None

    # ---- recording (device only) -----------------------------------------------------------------
    def _pad(self, n: int) -> Tensor:
        if n not in self._pads:  # index -1 and share NaN: "no entry"
            pad = torch.cat([torch.full((n,), -1.0), torch.full((n,), math.nan)])
            self._pads[n] = pad.to(self.device, torch.float64)
        return self._pads[n]

    def _top(self, values: Tensor | None, k_max: int) -> Tensor:
        if k_max == 0:
            return self._pad(0)
        if values is None or values.numel() == 0:
            return self._pad(k_max)
        k = min(k_max, values.numel())
        idx, shares = top_shares(values, k)
        pad = k_max - k
        parts = [idx.to(torch.float64), self._pad(pad)[:pad], shares.to(torch.float64), self._pad(pad)[pad:]]
        return torch.cat(parts)

    def record(self, *, step: Tensor, norm: Tensor, threshold: Tensor, clipped: Tensor, spike: Tensor,
               nonfinite: Tensor, squares: Tensor | None = None, replicas: Tensor | None = None) -> None:
        """Write this step's row if it is an event (decided on the device); no host read.

        ``squares``: whole-tensor squared norms in the order of :meth:`bind_names` (None: not measured);
        ``replicas``: per-replica squared norms before the data-parallel reduction (None: not measured).
        """
        is_event, bits = event_flags(self._kinds, clipped=clipped, spike=spike, nonfinite=nonfinite)
        params = by_name(squares, self.names) if squares is not None and self.names is not None else None
        table = self._table_id if self._table_id is not None else self._pad(1)[:1]
        head = torch.stack([step, norm, threshold, bits]).to(torch.float64)  # one promotion
        row = torch.cat([head, table, self._top(params, self.kp), self._top(replicas, self.kr)])
        pos = torch.remainder(self.count, self.buf.shape[0]).reshape(1)
        self.buf.index_copy_(0, pos, torch.where(is_event, row, self.buf.index_select(0, pos)[0]).unsqueeze(0))
        self.count += is_event.to(torch.int64)
        self._records += 1
        if self.config.read_every and self._records % self.config.read_every == 0:
            self.read()

    # ---- reading (one host transfer) -------------------------------------------------------------
    def read(self) -> list[Event]:
        """New events since the last read (one device->host transfer); each goes to ``on_event`` once."""
        flat = torch.cat([self.count.to(torch.float64).reshape(1), self.buf.reshape(-1)])
        flat = host_list(flat) if self.host_resident else flat.tolist()
        count, cap = int(flat[0]), self.buf.shape[0]
        new = count - self._read
        if new <= 0:
            return []
        dropped = max(0, new - cap)
        if dropped:
            self.dropped += dropped
            warnings.warn(f"zclip_dist forensics: {dropped} event(s) were dropped: more than capacity={cap} "
                          "events between two reads (raise forensics capacity or read more often)", stacklevel=2)
        events = [self._decode(flat[1 + (i % cap) * self.width: 1 + (i % cap + 1) * self.width])
                  for i in range(count - min(new, cap), count)]
        self._read = count
        if self.keep_for_log:
            self._unlogged.extend(events)
        if self.on_event is not None:
            for event in events:
                self.on_event(event)
        return events

    def latest(self) -> Tensor:
        """``[count, newest row]`` on the device (float64), for a front end that copies values to the host
        anyway (DeepSpeed's metrics, non-blocking) and hands the copy to :meth:`take_latest`."""
        pos = torch.remainder(self.count - 1, self.buf.shape[0]).reshape(1)
        return torch.cat([self.count.to(torch.float64).reshape(1), self.buf.index_select(0, pos)[0]])

    def take_latest(self, values: Sequence[float]) -> list[Event]:
        """Decode a host copy of :meth:`latest` when it holds an event not read yet (to ``on_event`` once,
        as :meth:`read` does) without a transfer; several new events since the last read: :meth:`read`."""
        count = int(values[0])
        if count <= self._read:
            return []
        if count > self._read + 1:
            return self.read()
        events = [self._decode(list(values[1:]))]
        self._read = count
        if self.keep_for_log:
            self._unlogged.extend(events)
        if self.on_event is not None:
            self.on_event(events[0])
        return events

    def take_unlogged(self) -> list[Event]:
        """Events read since the last JSON line (the line's ``events`` field)."""
        out, self._unlogged = self._unlogged, []
        return out

    def _decode(self, row: list[float]) -> Event:
        step, norm, threshold, bits, table = row[:_HEAD]
        kinds = tuple(k for k, b in KIND_BITS.items() if int(bits) & b)
        names = self._tables[int(table)][1].names if table >= 0 and self._tables else ()
        params = [Share(names[int(i)], None if s == NONFINITE else s, s == NONFINITE)
                  for i, s in self._entries(row[_HEAD:_HEAD + 2 * self.kp]) if int(i) < len(names)]
        ranks = self.replica_ranks
        replicas = [ReplicaShare(int(i), tuple(ranks[int(i)]) if ranks else (), None if s == NONFINITE else s,
                                 s == NONFINITE) for i, s in self._entries(row[_HEAD + 2 * self.kp:])]
        finite = math.isfinite
        return Event(step=int(step), method=self.method, kinds=kinds, grad_norm=norm if finite(norm) else None,
                     threshold=threshold if finite(threshold) else None, params=tuple(params),
                     replicas=tuple(replicas))

    @staticmethod
    def _entries(part: list[float]) -> list[tuple[float, float]]:
        """(index, share) pairs that hold data: index >= 0 and a share (NaN: nothing was measured)."""
        k = len(part) // 2
        return [(i, s) for i, s in zip(part[:k], part[k:]) if i >= 0 and not math.isnan(s)]


class Forensics:
    """What a front end holds for spike forensics: the recorder, the replica meter, the tensor names.

    Construct on every rank of the topology's group, before the first norm (it checks that every rank
    has the same settings, since they decide the size of the norm's all-reduce, and learns which ranks
    form each replica: two small host-memory collectives, once). Then, each step::

        norm, squares, replicas = norms.with_squares(params, grads, forensics.slots())
        forensics.bind(names_in_plan_order)            # cheap when unchanged
        clipper.step(norm, squares=squares, replicas=replicas)   # clipper.recorder = forensics.recorder
    """

    def __init__(self, config: ForensicsConfig, *, topology: Topology, device: torch.device | str, method: str,
                 on_event: Callable[[Event], None] | None = None) -> None:
        from .clipper import verify_same_config

        if topology.group is not None:
            verify_same_config(config, topology.group)
        self.config = config
        self.recorder = EventRecorder(config, method=method, device=device, on_event=on_event)
        self.meter: ReplicaMeter | None = None
        if config.replicas and topology.replica[1] > 1:
            self.meter = ReplicaMeter(topology, device)
            self.recorder.replica_ranks = replica_ranks(topology)
        self._names: tuple[str, ...] | None = None

    def bind(self, names: Sequence[str]) -> None:
        """Names of the per-tensor squares' positions (plan order)."""
        names = tuple(names)
        if names != self._names:
            self._names = names
            self.recorder.bind_names(names)

    def slots(self) -> Tensor | None:
        """The per-replica vector to append to the norm's all-reduce (None without replica attribution)."""
        return self.meter.slots() if self.meter is not None else None
