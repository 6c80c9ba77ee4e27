"""ZClip in a DeepSpeed engine: one global threshold, applied in the multiply DeepSpeed already makes.

* Optimizer wrappers without a loss scale (ZeRO-1/2/3 in fp32/bf16, BF16_Optimizer) compute one global norm
  per step, store it in ``_global_grad_norm`` and only then read ``self.clip_grad``. The wrapper
  instance's class is swapped for a one-off subclass in which ``clip_grad`` is a property: on its first
  read inside a step it feeds the stored norm to the :class:`~zclip_dist.clipper.Clipper` and returns the
  ZClip ceiling (``clip_to``); later reads in the same step (ZeRO-1/2 per param group, ZeRO-3 per
  sub-group) return the cached value. DeepSpeed's coefficient ``clip_grad / (norm + 1e-6)`` then equals
  ZClip's exactly, applied in the pass DeepSpeed already makes.
* fp16 wrappers: DeepSpeed's own unscale-and-clip is replaced by one multiply of the gradients by ZClip's
  coefficient divided by the loss scale the gradients actually carry. ZeRO-1/2/3 fp16: the scale in force
  when the norm was taken (DeepSpeed divides by the scale *after* its update, half the right value on
  every step where the dynamic scale grows). FP16_UnfusedOptimizer and FP16_Optimizer (ZeRO-0): 1, since
  DeepSpeed 0.19.8's ``engine.backward`` scales the loss only for ZeRO optimizers while these two divide
  by the loss scale anyway (every update 1/loss-scale of its size, clipping never reached). The same
  replacement serves bf16 ZeRO-0 (FP16_UnfusedOptimizer, scale 1).
* No wrapper (fp32 ZeRO-0, fp32 PipelineEngine, torch_autocast ZeRO-0): DeepSpeed's own norm is wrong
  or absent, so ``engine.clip_fp32_gradients`` is replaced by one that computes the exact norm with
  :class:`~zclip_dist.norms.NormCalculator` (TP duplicates, tied pipeline copies, DP and expert-DP
  replicas counted once) and scales the gradients with one ``_foreach_mul_``.
* FP16_UnfusedOptimizer under tensor parallelism or with MoE experts leaves TP shards / experts out of its
  norm; there the norm is computed the same way.

Host synchronisation: at most one per optimizer step. The clip_grad property returns a Python float
(DeepSpeed branches on ``clip_grad > 0.`` right after its own sync on the same norm in
``is_invalid_grad_norm``); the fp16 replacement reads nothing; the no-wrapper path reads the skip flag
(``nonfinite="skip"``: skipping an optimizer step is a host decision).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from ..clipper import Clipper
from ..config import ForensicsConfig, ZClipConfig
from ..forensics import Event
from ..metrics import to_host
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


def _recording_scale(norm_method: str):
    """ZeRO fp16: DeepSpeed's once-per-step norm method, unchanged, noting the loss scale the gradients
    carry (DeepSpeed updates the scale before it unscales)."""

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        hook = self.__dict__["_zclip"]
        if hook.open:
            hook.grad_scale = self.loss_scale
        return getattr(super(type(self), self), norm_method)(*args, **kwargs)

    return method


def _zero12_fp16_unscale_and_clip(self: Any, grad_groups_flat: list, total_norm: Any) -> None:
    hook = self.__dict__["_zclip"]
    if not hook.open:
        return super(type(self), self).unscale_and_clip_grads(grad_groups_flat, total_norm)
    factor = hook.fp16_factor(total_norm)
    flat = [g for grad in grad_groups_flat for g in (grad if isinstance(grad, list) else [grad])]
    torch._foreach_mul_(flat, factor.to(flat[0].dtype))


def _zero3_fp16_unscale_and_clip(self: Any, sub_group_id: int, total_norm: Any) -> None:
    hook = self.__dict__["_zclip"]
    if not hook.open:
        return super(type(self), self).unscale_and_clip_grads(sub_group_id, total_norm)
    grad = self.fp32_partitioned_groups_flat[sub_group_id].grad
    grad.mul_(hook.fp16_factor(total_norm).to(grad.dtype))


def _unfused_unscale_and_clip(self: Any, total_norm: Any, apply_scale: bool = True) -> Any:
    # FP16_UnfusedOptimizer: the gradients are whole fp32 master tensors, never loss-scaled (see module doc).
    hook = self.__dict__["_zclip"]
    if not hook.open:
        return super(type(self), self).unscale_and_clip_grads(total_norm, apply_scale)
    norm = hook.unfused_norm(self) if hook.own_norm else total_norm
    factor = hook.fp16_factor(norm)
    if apply_scale:
        grads = [p.grad for group in self.fp32_groups for p in group if p.grad is not None]
        torch._foreach_mul_(grads, factor.to(grads[0].dtype))
    return 1.0


def _fused_unscale_and_clip(self: Any, grad_groups_flat: list, total_norm: Any, apply_scale: bool = True) -> Any:
    # FP16_Optimizer (FusedAdam): flat fp32 gradients, never loss-scaled (see module doc).
    hook = self.__dict__["_zclip"]
    if not hook.open:
        return super(type(self), self).unscale_and_clip_grads(grad_groups_flat, total_norm, apply_scale)
    factor = hook.fp16_factor(total_norm)
    if apply_scale:
        torch._foreach_mul_(list(grad_groups_flat), factor.to(grad_groups_flat[0].dtype))
    return 1.0


class DeepSpeedZClip(Attachment):
    """ZClip attached to one DeepSpeed engine. Build with :func:`attach`."""

    def __init__(self, engine: Any, config: ZClipConfig, forensics: ForensicsConfig | None = None, *,
                 forensics_explicit: bool = False, on_event: Callable[[Event], None] | None = None) -> None:
        super().__init__(engine, config, forensics, forensics_explicit=forensics_explicit, on_event=on_event)
        self.clipper = Clipper(config, device=engine.device)
        self._value: float | None = None  # this step's clip_grad, once decided
        self._own_norm: Tensor | None = None
        self._norms: NormCalculator | None = None
        self.grad_scale: Any = 1.0  # the loss scale this step's gradients carry (fp16 ZeRO)
        refuse_unsupported(engine)
        forensics_methods = self._forensics_namespace("zclip")  # ZeRO-1/2 fp32/bf16: the clip_grad branch
        from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

        opt = engine.optimizer
        self.wrapper = "clip_grad" in vars(opt)  # BF16_Optimizer creates _global_grad_norm lazily: test this
        stage = engine.zero_optimization_stage()
        mpu = getattr(opt, "mpu", None)
        self.own_norm = isinstance(opt, FP16_UnfusedOptimizer) and (
            (mpu is not None and mpu.get_model_parallel_world_size() > 1) or getattr(engine, "has_moe_layers", False))
        if not self.wrapper or self.own_norm:
            self._norms = NormCalculator(engine_topology(engine), device=engine.device)
        if not self.wrapper:
            engine.clip_fp32_gradients = self._clip_fp32_gradients
            keep_engine_clip_gate_open(engine)
            make_skippable(opt)
        elif isinstance(opt, FP16_UnfusedOptimizer):
            swap_class(opt, self, {"unscale_and_clip_grads": _unfused_unscale_and_clip})
        elif isinstance(opt, FP16_Optimizer):
            swap_class(opt, self, {"unscale_and_clip_grads": _fused_unscale_and_clip})
        elif getattr(opt, "dtype", None) == torch.float16 and stage in (1, 2):
            swap_class(opt, self, {"scaled_global_norm": _recording_scale("scaled_global_norm"),
                                   "unscale_and_clip_grads": _zero12_fp16_unscale_and_clip})
        elif getattr(opt, "dtype", None) == torch.float16 and stage == 3:
            swap_class(opt, self, {"_get_norm_groups": _recording_scale("_get_norm_groups"),
                                   "unscale_and_clip_grads": _zero3_fp16_unscale_and_clip})
        else:
            opt.__dict__["_zclip_static_clip"] = opt.__dict__.pop("clip_grad")
            swap_class(opt, self, {"clip_grad": property(_clip_grad_get, _clip_grad_set), **forensics_methods})
        self._install_step_and_checkpoints()

    # ---- one optimizer step ----------------------------------------------------------------------
    def _begin_step(self) -> None:
        super()._begin_step()
        self._value, self._own_norm, self.grad_scale = None, None, 1.0

    def _skipped_by_engine(self, norm: float, overflow: bool) -> None:
        self.clipper.step(torch.full((), norm, dtype=torch.float64, device=self.engine.device), overflow=overflow)

    def _decide(self, norm: Any) -> Any:
        """This step's decision, made on the first call (later calls in the step return it)."""
        if self.clipper.last is None:
            self.clipper.step(norm)
        return self.clipper.last

    def clip_value(self, opt: Any) -> float:
        """``clip_grad`` as the wrapper sees it: static outside a step, ZClip's ceiling inside."""
        if not self.open:
            return opt.__dict__["_zclip_static_clip"]
        if self._value is None:
            norm = opt._global_grad_norm
            if norm is None:
                raise RuntimeError("zclip: clip_grad read before the gradient norm was computed")
            decision = self._decide(norm)
            if self.forensics is None:
                clip_to = decision.clip_to.item()  # the one host read per step (see module docstring)
            else:  # the same one read, with the event flag: only event steps measure anything
                clip_to, event = self.forensics.ceiling_and_flag(decision.clip_to)
                if event:
                    self.forensics.measure_event(opt)
            # 0.0 means "no clip" to every wrapper; a ceiling of exactly 0 must still clip (to zero).
            self._value = 0.0 if math.isinf(clip_to) else max(clip_to, 5e-324)
        return self._value

    def fp16_factor(self, scaled_norm: Any) -> Tensor:
        """ZClip's coefficient over the loss scale the gradients carry (a device tensor, no host read)."""
        scale = self.grad_scale
        norm = scaled_norm if isinstance(scaled_norm, Tensor) else torch.tensor(float(scaled_norm))
        norm = norm.to(device=self.engine.device, dtype=torch.float64)
        return self._decide(norm / scale).coef / scale

    def unfused_norm(self, opt: Any) -> Tensor:
        if self._own_norm is None:
            params = [p for group in opt.fp16_groups for p in group]
            grads = [p.grad for group in opt.fp32_groups for p in group]
            self._own_norm, _ = self._norms(params, grads)
        return self._own_norm

    def _clip_fp32_gradients(self) -> None:
        """Replaces ``engine.clip_fp32_gradients``: exact norm, one decision, one multiply."""
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        norm, _ = self._norms(params, grads)
        decision = self.clipper.step(norm, overflow=self.loss_scaling)
        for ix in self._norms.plan.groups:
            group = [grads[i] for i in ix]
            torch._foreach_mul_(group, decision.coef.to(device=group[0].device, dtype=group[0].dtype))
        if self.config.nonfinite == "skip":
            self.engine.optimizer.overflow = bool(decision.skipped)  # the one host read per step

    # ---- metrics ----------------------------------------------------------------------------------
    @staticmethod
    def _to_host(values: list[float]) -> dict[str, Any]:
        return to_host(values)

    @staticmethod
    def _is_event(metrics: dict[str, Any]) -> bool:
        return bool(metrics["clipped"] or metrics["spike"] or metrics["nonfinite"])
