"""Spike forensics in a DeepSpeed ZeRO-1/2 engine: at every clipped, spike or non-finite step, the
parameters (the user's names; ZeRO pieces and TP shards summed per parameter) and the data-parallel
replicas that carried the squared gradient norm (:mod:`zclip_dist.forensics`).

* **Parameters.** Every DP rank holds disjoint pieces of every tensor at DeepSpeed's partition offsets
  (:class:`~zclip_dist.deepspeed.zero_layouts.PieceSquares`): one SUM of the per-parameter vector over the
  tensor group (DP, or TP x DP with an mpu) gives every whole tensor's squared norm.

  - ZClip (the ``clip_grad`` property): the host already reads ZClip's ceiling once per step (DeepSpeed
    branches on it), and a finite ceiling is a clipped step, so only event steps measure: the
    squares of the still-unclipped pieces (the first ``clip_grad`` read happens inside the first group's
    unscale-and-clip, before its multiply; later groups are still in ``averaged_gradients``) and one
    all-reduce. An ordinary step adds no kernel, no collective and no host read.
  - AdaGC measures the same squares every step anyway: they are the forensics squares, the per-replica
    vector rides in AdaGC's own all-reduce, and the row is written on the device (``torch.where``).
  - Non-finite steps: DeepSpeed skips them before ZClip's decision, but first hands the overflow flag
    (already a host bool) to ``_update_scale`` while the gradients are still there: the squares are taken
    then (one all-reduce) and recorded once the clipper has counted the step. AdaGC, when it has already
    measured beside DeepSpeed's norm (the NaN found there), only reads the row written then.

* **Replicas** (``replicas: true``): a :class:`~zclip_dist.replicas.ReplicaMeter` adds the squared norm of
  each IPG bucket (``average_tensor``, ``buffered_reduce_fallback``) *before* DeepSpeed reduces it: this
  rank's own gradient, one more read of each gradient during backward. ZeRO-2 reduces every micro-batch,
  so a replica's value is the sum over its micro-batches of their squared norms; ZeRO-1 reduces the
  accumulated gradient once. The per-replica vector (one fp32 per DP rank: 8 KB at 2,048 ranks) is
  appended to the per-tensor vector's all-reduce, so every rank learns every replica's value with no
  further collective, and only on event steps for ZClip.

* **Reading.** ZClip's and every non-finite step's rows are read at the step, on every rank (the host
  knows it is an event: one transfer) and handed to ``on_event``. AdaGC decides on the device, so its
  newest row rides in rank 0's non-blocking metrics copy (:mod:`~zclip_dist.deepspeed.events`) and is
  decoded when that copy lands, without a read; other ranks read theirs every ``read_every`` steps and
  at :meth:`~zclip_dist.deepspeed.attachment.Attachment.events`. Rank 0 writes them to the JSON-lines
  file (the line's ``events`` field) and to the monitor (``Train/zclip/event/...``).

Supported: ZeRO stage 1 or 2 in fp32 or bf16, without offload, MoE layers or a pipeline; replica
attribution also without an mpu (TP duplicates would be counted twice in a bucket). Elsewhere the default
forensics is off; an explicit ``"forensics"`` entry is refused by name (:func:`unsupported_reason`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from ..config import ForensicsConfig
from ..events import Forensics
from ..forensics import Event
from ..topology import Topology
from .zero_layouts import PieceSquares, Zero12Layout

__all__ = ["ZeroForensics", "unsupported_reason", "replica_namespace"]


def unsupported_reason(engine: Any, config: ForensicsConfig) -> str | None:
    """Why forensics cannot run on this engine's path (``None``: it can)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    stage = engine.zero_optimization_stage()
    if stage not in (1, 2) or not isinstance(opt, DeepSpeedZeroOptimizer):
        return f"ZeRO stage {stage} ({type(opt).__name__}) is not covered; use ZeRO stage 1 or 2"
    if getattr(opt, "dtype", None) == torch.float16:
        return "fp16 (loss scaling) is not covered; use bf16 or fp32"
    if getattr(opt, "cpu_offload", False):
        return "ZeRO optimizer offload is not covered"
    if getattr(engine, "has_moe_layers", False):
        return "MoE layers are not covered"
    if getattr(engine, "grid", None) is not None:
        return "a PipelineEngine is not covered"
    if config.replicas and engine.mpu is not None:
        return "replica attribution with an mpu (tensor parallelism) is not covered; set \"replicas\": false"
    return None


def _meter_of(opt: Any):
    return opt.__dict__["_zclip"].forensics.meter


def _average_tensor(self: Any, tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
    _meter_of(self).add_flat(tensor)  # this rank's bucket, before DeepSpeed reduces it
    return super(type(self), self).average_tensor(tensor, *args, **kwargs)


def _buffered_reduce_fallback(self: Any, rank: Any, grads: list[Tensor], *args: Any, **kwargs: Any) -> Any:
    _meter_of(self).add_tensors(grads)
    return super(type(self), self).buffered_reduce_fallback(rank, grads, *args, **kwargs)


def _preserving_fp32_fallback(self: Any, grads: list[Tensor], *args: Any, **kwargs: Any) -> Any:
    _meter_of(self).add_tensors(grads)
    return super(type(self), self)._buffered_reduce_fallback_preserving_fp32(grads, *args, **kwargs)


def _update_scale(self: Any, has_overflow: bool = False) -> Any:
    # DeepSpeed's overflow decision, already on the host; the gradients are released right after.
    hook = self.__dict__["_zclip"]
    if has_overflow and hook.open:
        hook.forensics.capture_nonfinite(self, decided=hook.clipper.last is not None)
    return super(type(self), self)._update_scale(has_overflow)


def replica_namespace(opt: Any, replicas: bool) -> dict[str, Any]:
    """Methods for the optimizer wrapper's one-off subclass: the non-finite capture, and with replica
    attribution the meters in front of DeepSpeed's reductions."""
    out: dict[str, Any] = {"_update_scale": _update_scale}
    if replicas:
        out.update(average_tensor=_average_tensor, buffered_reduce_fallback=_buffered_reduce_fallback)
        if hasattr(opt, "_buffered_reduce_fallback_preserving_fp32"):
            out["_buffered_reduce_fallback_preserving_fp32"] = _preserving_fp32_fallback
    return out


class ZeroForensics:
    """What the clipper sees as its ``recorder``, for one ZeRO-1/2 engine.

    The clipper hands :meth:`record` each step's decision row. ``every_step=True`` (AdaGC, whose squares
    come with the row): written on the device at once. ``every_step=False`` (ZClip): kept until the host
    learns, in the transfer it makes anyway (:meth:`ceiling_and_flag`), that the step is an event, then
    measured and written (:meth:`measure_event`). The JSON-lines writer's reads go through :meth:`read`,
    which never transfers: the attachment decides when (:meth:`for_log`).
    """

    def __init__(self, engine: Any, config: ForensicsConfig, *, method: str, layout: Zero12Layout,
                 topology: Topology, names: dict[int, str], every_step: bool,
                 on_event: Callable[[Event], None] | None = None) -> None:
        self.fx = Forensics(config, topology=topology, device=engine.device, method=method, on_event=on_event)
        self.recorder = self.fx.recorder
        self.meter = self.fx.meter
        self.topology = topology
        self.every_step = every_step
        self.squares = PieceSquares(layout, topology, engine.device)
        self.fx.bind([names.get(id(p), f"param.{k}") for k, p in enumerate(layout.params)])
        self._n = len(layout.params)
        self._row: dict[str, Tensor] | None = None  # this step's decision row (ZClip), until it is known
        self._captured: tuple[Tensor, Tensor | None] | None = None  # a non-finite step's squares, replicas
        self.recorder.keep_for_log = engine.global_rank == 0  # rank 0 writes the JSONL line and monitor

    # ---- what the clipper calls -----------------------------------------------------------------
    keep_for_log = False  # set by the JSON-lines writer; rank 0 keeps events through the recorder's flag

    def record(self, *, squares: Tensor | None = None, replicas: Tensor | None = None, **row: Tensor) -> None:
        if self._captured is not None:  # a non-finite step, measured in _update_scale: read at once
            squares, replicas = self._captured
            self._captured = None
            self.recorder.record(**row, squares=squares, replicas=replicas)
            self.recorder.read()
        elif self.every_step:
            self.recorder.record(**row, squares=squares, replicas=replicas)
        else:
            self._row = row

    def read(self) -> list[Event]:
        return []  # the JSON-lines writer's read: never a transfer here (see for_log)

    def take_unlogged(self) -> list[Event]:
        return []  # events reach the line through for_log

    # ---- communication ----------------------------------------------------------------------------
    def exchange(self, local: Tensor) -> tuple[Tensor, Tensor | None]:
        """One SUM over the tensor group of this rank's per-tensor squares, with the per-replica vector
        appended when replicas are measured: (whole-tensor squares, per-replica squares or None)."""
        slots = self.fx.slots()
        vector = local if slots is None else torch.cat([local, slots.to(local.dtype)])
        self.topology.all_reduce_tensor_sum(vector)
        return vector[:self._n], (vector[self._n:] if slots is not None else None)

    # ---- ZClip: the host knows ---------------------------------------------------------------------
    def ceiling_and_flag(self, clip_to: Tensor) -> tuple[float, bool]:
        """ZClip's ceiling and whether this step is an event, from the one device->host transfer the
        clip_grad property makes anyway. The norm is finite here (DeepSpeed skipped non-finite steps
        earlier) and a spike is always clipped, so "clipped" is the ceiling being finite: no extra kernel.
        Only ``events: ["spike"]`` without "clipped" reads the spike flag, in the same transfer."""
        kinds = self.fx.config.events
        if "clipped" not in kinds and "spike" in kinds:
            clip, spike = torch.stack([clip_to.to(torch.float64), self._row["spike"].to(torch.float64)]).tolist()
            return clip, spike > 0
        clip = clip_to.item()
        return clip, "clipped" in kinds and math.isfinite(clip)

    def measure_event(self, opt: Any) -> None:
        """An event step (every rank takes this branch: the decision is identical everywhere): the
        pre-clip squares, one all-reduce, the row written and read."""
        squares, replicas = self.exchange(self.squares.local(opt))
        self.recorder.record(**self._row, squares=squares, replicas=replicas)
        self.recorder.read()

    def capture_nonfinite(self, opt: Any, *, decided: bool) -> None:
        """DeepSpeed found a NaN/Inf and will skip the step: measure while the gradients exist, or, when
        the clipper has already decided on this step's squares (AdaGC measures next to DeepSpeed's norm,
        which runs before its non-finite check unless ``check_grad_overflow``), read the row written then."""
        if "nonfinite" not in self.fx.config.events:
            return
        if decided:
            self.recorder.read()
        else:
            self._captured = self.exchange(self.squares.local(opt))

    def end_step(self) -> None:
        """After the optimizer step: the next step's replica measurement starts from zero."""
        self._row, self._captured = None, None
        if self.meter is not None:
            self.meter.local.zero_()

    # ---- reading ------------------------------------------------------------------------------------
    def latest(self) -> Tensor | None:
        """AdaGC (rows written on the device every step): ``[count, newest row]`` to copy to the host with
        the step's metrics (rank 0); ``None`` for ZClip, whose rows are read at the step."""
        return self.recorder.latest() if self.every_step else None

    def for_log(self, latest: list[float]) -> list[Event]:
        """Rank 0, when an event step's metrics have reached the host: the events to write with them
        (AdaGC: decoded from the copy of :meth:`latest` that came along, no transfer)."""
        if latest:
            self.recorder.take_latest(latest)
        return self.recorder.take_unlogged()

    def events(self) -> list[Event]:
        """Events since the last read on this rank (one transfer), each handed to ``on_event``."""
        return self.recorder.read()
