"""Per-step metrics: tensors on the device until someone asks, then one host transfer for all of them.

Names follow the engines' logs: ``grad_norm`` is the pre-clip norm (what DeepSpeed and Megatron log as
the grad norm), ``clipped_norm`` the norm after scaling.

The JSON-lines file (``log_jsonl``) is strict JSON, readable by any parser: a NaN or infinite value is
written as ``null`` and named, with its value, in the record's ``"nonfinite_values"`` (``{"grad_norm":
"NaN"}``). Its first line is a header, ``{"zclip_dist_metrics": 1, "method": ..., "settings": {...}}``,
so that ``zclip-dist replay`` and ``zclip-dist report`` know the settings the run used.
"""

from __future__ import annotations

import json
import math
import os
from typing import IO, Any, Mapping, Sequence

import torch
from torch import Tensor

from ._version import __version__
from .stats import ZClipDecision, ZClipState

__all__ = ["METRIC_NAMES", "HEADER_KEY", "NONFINITE_KEY", "metrics_tensors", "to_host", "header",
           "config_header", "strict_record", "JsonlSink"]

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


#: Marks the header line; its value is the version of the file layout.
HEADER_KEY = "zclip_dist_metrics"
HEADER_VERSION = 1
#: Per record: the non-finite values written as null, by key (dotted for nested keys).
NONFINITE_KEY = "nonfinite_values"
#: Settings that say where metrics go, not how the run clipped: left out of the header.
_LOCAL_SETTINGS = ("log_jsonl",)


def header(method: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The first line of a metrics file: the clipping method ("zclip", "adagc", "fixed") and its settings."""
    kept = {k: v for k, v in settings.items() if k not in _LOCAL_SETTINGS}
    return {HEADER_KEY: HEADER_VERSION, "method": method, "settings": kept, "zclip_dist": __version__}


def config_header(config: Any) -> dict[str, Any]:
    """The header for a :class:`~zclip_dist.config.ZClipConfig` or :class:`~zclip_dist.config.AdaGCConfig`."""
    method = {"ZClipConfig": "zclip", "AdaGCConfig": "adagc"}[type(config).__name__]
    return header(method, config.to_dict())


def _spell(value: float) -> str:
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def strict_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with every NaN/Inf float replaced by None and listed under :data:`NONFINITE_KEY`."""
    flagged: dict[str, str] = {}

    def clean(value: Any, path: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            flagged[path] = _spell(value)
            return None
        if isinstance(value, Mapping):
            return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{path}.{i}") for i, v in enumerate(value)]
        return value

    out = clean(dict(record), "")
    if flagged:
        out[NONFINITE_KEY] = flagged
    return out


class JsonlSink:
    """Append one strict-JSON object per logged step to a file (created with its directory).

    ``header`` (see :func:`header`) is written when the file is opened: first in a new file; a run resumed
    into the same file appends its own, so every record follows the header of the settings it ran with.
    """

    def __init__(self, path: str | os.PathLike, *, rank: int = 0, header: Mapping[str, Any] | None = None) -> None:
        self.path = os.fspath(path)
        self._file: IO[str] | None = None
        self.rank = rank
        self.header = dict(header) if header is not None else None

    def _open(self) -> IO[str]:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        f = open(self.path, "a", buffering=1)
        if self.header is not None:
            f.write(json.dumps(self.header, allow_nan=False) + "\n")
        return f

    def write(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            self._file = self._open()
        self._file.write(json.dumps(strict_record(record), allow_nan=False) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
