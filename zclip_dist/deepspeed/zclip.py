"""ZClip in a DeepSpeed engine: one global threshold, applied in the multiply DeepSpeed already makes.

* Optimizer wrappers (ZeRO-1/2/3, BF16_Optimizer, FP16_Optimizer, FP16_UnfusedOptimizer) compute one
  global norm per step, store it in ``_global_grad_norm`` and only then read ``self.clip_grad``. The
  wrapper instance's class is swapped for a one-off subclass in which ``clip_grad`` is a property: on its
  first read inside a step it feeds the stored norm to the :class:`~zclip_dist.clipper.Clipper` and
  returns the ZClip ceiling (``clip_to``); later reads in the same step (ZeRO-1/2 per param group,
  ZeRO-3 per sub-group) return the cached value. DeepSpeed's coefficient ``clip_grad / (norm + 1e-6)``
  then equals ZClip's exactly, applied in the pass DeepSpeed already makes.
* No wrapper (fp32 ZeRO-0, fp32 PipelineEngine, torch_autocast ZeRO-0): DeepSpeed's own norm is wrong
  or absent, so ``engine.clip_fp32_gradients`` is replaced by one that computes the exact norm with
  :class:`~zclip_dist.norms.NormCalculator` (TP duplicates, tied pipeline copies and DP replicas counted
  once) and scales the gradients with one ``_foreach_mul_``.
* FP16_UnfusedOptimizer under tensor parallelism drops TP shards from its norm; there the norm is
  computed the same way and handed to DeepSpeed's ``unscale_and_clip_grads``.

Host synchronisation: exactly one per optimizer step, reading the decision as a Python float (wrapper
paths: DeepSpeed branches in Python on ``clip_grad > 0.``; it has just synced on the same norm in
``is_invalid_grad_norm``) or the skip flag (no-wrapper path, ``nonfinite="skip"``: skipping an optimizer
step is a host decision). Plus one transfer of all metrics on log steps, on rank 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..clipper import Clipper
from ..config import ZClipConfig
from ..norms import NormCalculator
from .attachment import (
    Attachment,
    keep_engine_clip_gate_open,
    make_skippable,
    refuse_unsupported,
    swap_class,
)
from .groups import engine_topology

__all__ = ["DeepSpeedZClip"]


def _clip_grad_get(self: Any) -> float:
    return self.__dict__["_zclip"].clip_value(self)


def _clip_grad_set(self: Any, value: float) -> None:
    # load_state_dict writes clip_grad; it stays the value used outside a step (and in checkpoints).
    self.__dict__["_zclip_static_clip"] = value


def _unfused_unscale_and_clip(self: Any, total_norm: Any, apply_scale: bool = True) -> Any:
    # FP16_UnfusedOptimizer under TP: DeepSpeed's norm misses TP shards; substitute the exact (scaled) one.
    hook = self.__dict__["_zclip"]
    if hook.open:
        total_norm = hook.own_scaled_norm(self)
    return super(type(self), self).unscale_and_clip_grads(total_norm, apply_scale)


def _swap_clip_grad(optimizer: Any, hook: "DeepSpeedZClip", own_norm: bool) -> None:
    """ZClip: ``clip_grad`` becomes a property returning ZClip's per-step ceiling."""
    namespace: dict[str, Any] = {"clip_grad": property(_clip_grad_get, _clip_grad_set)}
    if own_norm:
        namespace["unscale_and_clip_grads"] = _unfused_unscale_and_clip
    optimizer.__dict__["_zclip_static_clip"] = optimizer.__dict__.pop("clip_grad")
    swap_class(optimizer, hook, namespace)


class DeepSpeedZClip(Attachment):
    """ZClip attached to one DeepSpeed engine. Build with :func:`attach`."""

    def __init__(self, engine: Any, config: ZClipConfig) -> None:
        super().__init__(engine, config)
        self.clipper = Clipper(config, device=engine.device)
        self._value: float | None = None  # this step's clip_grad, once decided
        self._own_norm: Tensor | None = None
        self._norms: NormCalculator | None = None
        refuse_unsupported(engine)
        opt = engine.optimizer
        self.wrapper = "clip_grad" in vars(opt)  # BF16_Optimizer creates _global_grad_norm lazily: test this
        self.unfused_tp = False
        if self.wrapper:
            from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

            mpu = getattr(opt, "mpu", None)
            self.scaled_norm = isinstance(opt, FP16_UnfusedOptimizer)  # it stores norm * loss scale
            self.unfused_tp = (self.scaled_norm and mpu is not None and mpu.get_model_parallel_world_size() > 1)
            if self.unfused_tp:
                self._norms = NormCalculator(engine_topology(engine), device=engine.device)
            _swap_clip_grad(opt, self, own_norm=self.unfused_tp)
        else:
            self._norms = NormCalculator(engine_topology(engine), device=engine.device)
            engine.clip_fp32_gradients = self._clip_fp32_gradients
            keep_engine_clip_gate_open(engine)
            make_skippable(opt)
        self._install_step_and_checkpoints()

    # ---- one optimizer step ----------------------------------------------------------------------
    def _begin_step(self) -> None:
        super()._begin_step()
        self._value, self._own_norm = None, None

    def _finish_step(self) -> None:
        if self.clipper.last is None:
            self._require_overflow()
            # DeepSpeed skipped the step on a non-finite norm before reading clip_grad: record it
            # (counters only; the statistics never see a non-finite norm).
            self.clipper.step(torch.full((), math.nan, device=self.engine.device))
        else:
            self.engine._global_grad_norm = self.clipper.last.norm  # pre-clip and exact on every path

    def clip_value(self, opt: Any) -> float:
        """``clip_grad`` as the wrapper sees it: static outside a step, ZClip's ceiling inside."""
        if not self.open:
            return opt.__dict__["_zclip_static_clip"]
        if self._value is None:
            if self.unfused_tp:
                norm = self._unfused_norm(opt)
            else:
                norm = opt._global_grad_norm
                if norm is None:
                    raise RuntimeError("zclip: clip_grad read before the gradient norm was computed")
                if self.scaled_norm:
                    norm = norm / opt.loss_scale_config.cur_scale
            decision = self.clipper.step(norm)
            clip_to = decision.clip_to.item()  # the one host read per step (see module docstring)
            # 0.0 means "no clip" to every wrapper; a ceiling of exactly 0 must still clip (to zero).
            self._value = 0.0 if math.isinf(clip_to) else max(clip_to, 5e-324)
        return self._value

    def _unfused_norm(self, opt: Any) -> Tensor:
        if self._own_norm is None:
            params = [p for group in opt.fp16_groups for p in group]
            grads = [p.grad for group in opt.fp32_groups for p in group]
            self._own_norm, _ = self._norms(params, grads)
        return self._own_norm

    def own_scaled_norm(self, opt: Any) -> Tensor:
        return self._unfused_norm(opt) * opt.loss_scale_config.cur_scale

    def _clip_fp32_gradients(self) -> None:
        """Replaces ``engine.clip_fp32_gradients``: exact norm, one decision, one multiply."""
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        norm, _ = self._norms(params, grads)
        decision = self.clipper.step(norm)
        for ix in self._norms.plan.groups:
            group = [grads[i] for i in ix]
            torch._foreach_mul_(group, decision.coef.to(device=group[0].device, dtype=group[0].dtype))
        if self.config.nonfinite == "skip":
            self.engine.optimizer.overflow = bool(decision.skipped)  # the one host read per step
