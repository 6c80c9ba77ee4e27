"""Which steps reach the DeepSpeed monitor and the JSON-lines file: every ``steps_per_print``-th (monitor) or
``log_interval``-th (JSONL) step, and every *event* step (clipped, spike or non-finite) whatever the cadence.

Knowing on the host whether a step was an event must not cost a device sync on ordinary steps. So each
step's metrics vector (a few dozen bytes) is copied to pinned host memory with ``non_blocking=True`` and
an event is recorded behind the copy; :meth:`StepRecords.landed` hands back, in order, the steps whose copy
has finished (``Event.query()`` never blocks), usually one step later since DeepSpeed syncs every step.
On a CPU device the vector is host memory already and comes back at once. :meth:`StepRecords.drain`
waits for the rest (checkpoints, exit). Only rank 0 records anything.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterator

import torch
from torch import Tensor

from ..clipper import host_value

__all__ = ["StepRecords"]


def _values(host: Tensor) -> list[float]:
    """The values of a CPU tensor: host memory, so no device sync (``host_value`` refuses anything else)."""
    return [host_value(v) for v in host.unbind()]


class StepRecords:
    """Metrics vectors in flight to the host, each with what the caller needs to write it later."""

    def __init__(self) -> None:
        self._pending: deque[tuple[Tensor, Any, Any]] = deque()  # (host copy, event or None, tag)

    def push(self, vector: Tensor, tag: Any) -> None:
        vector = vector.detach()
        if vector.device.type == "cpu":
            self._pending.append((vector.clone(), None, tag))
            return
        host = torch.empty(vector.shape, dtype=vector.dtype, pin_memory=True)
        host.copy_(vector, non_blocking=True)
        event = torch.Event(device=vector.device)
        event.record()
        self._pending.append((host, event, tag))

    def landed(self, *, wait: bool = False) -> Iterator[tuple[list[float], Any]]:
        """``(values, tag)`` of every step whose copy has finished, oldest first (all of them if ``wait``)."""
        while self._pending:
            host, event, tag = self._pending[0]
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()
            self._pending.popleft()
            yield _values(host), tag

    def drain(self) -> Iterator[tuple[list[float], Any]]:
        return self.landed(wait=True)
