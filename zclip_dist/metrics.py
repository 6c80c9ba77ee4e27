"""Per-step metrics: tensors on the device until someone asks, then one host transfer for all of them.

Names follow the engines' logs: ``grad_norm`` is the pre-clip norm (what DeepSpeed and Megatron log as
the grad norm), ``clipped_norm`` the norm after scaling.
"""

from __future__ import annotations

import json
import os
from typing import IO, Any, Mapping, Sequence

import torch
from torch import Tensor

from .stats import ZClipDecision, ZClipState

__all__ = ["METRIC_NAMES", "metrics_tensors", "to_host", "JsonlSink"]

#: Float metrics, in the order they are stacked for the single host transfer.
METRIC_NAMES = ("grad_norm", "clipped_norm", "mean", "std", "z", "threshold", "coef",
                "clipped", "spike", "skipped", "nonfinite", "warmup", "regime_shift",
                "step", "num_clipped", "num_spikes", "num_nonfinite")
_FLAGS = {"clipped", "spike", "skipped", "nonfinite", "warmup", "regime_shift"}
_COUNTS = {"step", "num_clipped", "num_spikes", "num_nonfinite"}


def metrics_tensors(decision: ZClipDecision, state: ZClipState) -> Tensor:
    """All metrics of one step stacked into one float64 vector (device-side, no sync)."""
    d = decision
    values = [d.norm, d.norm * d.coef, d.mean, d.std, d.z, d.threshold, d.coef,
              d.clipped, d.spike, d.skipped, d.nonfinite, d.warmup, d.regime_shift,
              state.steps, state.num_clipped, state.num_spikes, state.num_nonfinite]
    return torch.stack([v.to(torch.float64) for v in values])


def to_host(vector: Tensor | Sequence[float]) -> dict[str, Any]:
    """One device->host copy (or values already read); flags become bools and counters ints."""
    out: dict[str, Any] = {}
    for name, value in zip(METRIC_NAMES, vector.tolist() if isinstance(vector, Tensor) else vector):
        out[name] = bool(value) if name in _FLAGS else int(value) if name in _COUNTS else value
    return out


class JsonlSink:
    """Append one JSON object per logged step to a file (created with its directory)."""

    def __init__(self, path: str | os.PathLike, *, rank: int = 0) -> None:
        self.path = os.fspath(path)
        self._file: IO[str] | None = None
        self.rank = rank

    def write(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "a", buffering=1)
        self._file.write(json.dumps(dict(record), allow_nan=True) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
