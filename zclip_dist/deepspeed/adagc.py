"""AdaGC in a DeepSpeed engine: one threshold per parameter tensor, on the norm of the *whole* tensor.

* ZeRO-1/2: each rank holds pieces of some tensors in a flat fp32 partition. Next to DeepSpeed's own
  norm (``scaled_global_norm``, all groups' gradients present, overflow already checked) the squared
  norms of this rank's pieces go into a vector over *all* parameters (every DP rank lists the same
  parameters in the same order); one all-reduce of that vector over the DP group gives every whole
  tensor's squared norm on every rank. DeepSpeed's ``unscale_and_clip_grads`` is replaced by one
  ``_foreach_mul_`` of the pieces (views of the flat partition at DeepSpeed's own offsets) by their
  tensors' coefficients, 1/loss-scale folded in: DeepSpeed's fixed clip never applies.
* ZeRO-3: the same with each parameter's partition (``grad_position`` in its sub-group's flat fp32
  partition), measured next to ``_get_norm_groups``, applied per sub-group.
* ZeRO-0 (no wrapper, or FP16_UnfusedOptimizer for bf16/fp16): whole tensors; the norms come from
  :meth:`NormCalculator.per_tensor <zclip_dist.norms.NormCalculator.per_tensor>` (one bucketed
  all-reduce), the multiply replaces ``clip_fp32_gradients`` / ``unscale_and_clip_grads``. The
  FP16_UnfusedOptimizer's gradients carry no loss scale (DeepSpeed 0.19.8 does not scale the loss for it,
  though its own unscale divides by the scale): none is removed.
* Refused for now, by name: BF16_Optimizer, FP16_Optimizer (FusedAdam), ZeRO offload, pipelines, MoE.
* The state (gamma by parameter name) survives a change of DP size.

Host synchronisation: none on the wrapper paths (the coefficients stay on the device); the skip flag on
the no-wrapper path. Metrics reach the host without a sync (:mod:`~zclip_dist.deepspeed.events`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..clipper import AdaGCClipper, adagc_to_host
from ..config import AdaGCConfig, ForensicsConfig
from ..forensics import Event
from ..norms import NormCalculator
from ..topology import Topology
from .attachment import (
    Attachment,
    keep_engine_clip_gate_open,
    make_skippable,
    refuse_unsupported,
    swap_class,
)
from .config import ADAGC_METRIC_PREFIX, UnsupportedConfiguration
from .groups import engine_topology, sharded_topology
from .forensics import ZeroForensics
from .zero_layouts import PieceSquares, Zero3Layout, Zero12Layout

__all__ = ["DeepSpeedAdaGC"]


def _param_names(engine: Any) -> dict[int, str]:
    """Parameter name by ``id``: the names AdaGC's state is keyed by (stable across DP sizes)."""
    return {id(p): n for n, p in engine.module.named_parameters()}


def _is_one(scale: Any) -> bool:
    return isinstance(scale, (int, float)) and scale == 1


class _ShardedPerTensor:
    """AdaGC on ZeRO partitions: whole-tensor norms from this rank's pieces, coefficients onto the pieces.

    ``measure`` runs where DeepSpeed computes its own norm (all groups' gradients present, overflow
    already checked); ``apply`` replaces DeepSpeed's unscale-and-clip multiply of one flat partition.
    """

    def __init__(self, layout: Zero12Layout | Zero3Layout, topology: Topology, clipper: AdaGCClipper,
                 device: torch.device) -> None:
        self.layout = layout
        self.topology = topology
        self.clipper = clipper
        self.squares = PieceSquares(layout, topology, device)
        self.index = self.squares.index
        self.factors: Tensor | None = None  # this step's multiplier per tensor (loss scale folded in)
        self.forensics: ZeroForensics | None = None  # set when spike forensics is on

    def whole_tensor_squares(self, opt: Any) -> tuple[Tensor, Tensor | None]:
        """Squared norm of every *whole* tensor, identical on every rank: one bucketed all-reduce of the
        per-parameter vector over the topology's tensor group (the DP group, or TP x DP with an mpu),
        because DP ranks hold disjoint pieces of the same tensors at the same vector positions. With
        replica attribution the per-replica vector rides in the same all-reduce (second value)."""
        if self.forensics is not None:
            return self.forensics.exchange(self.squares.local(opt))
        return self.topology.all_reduce_tensor_sum(self.squares.local(opt)), None

    def measure(self, opt: Any, scale: Any) -> None:
        sq, replicas = self.whole_tensor_squares(opt)
        if not _is_one(scale):  # fp16: DeepSpeed's gradients still carry the loss scale
            sq = sq / (scale * scale)
        # with forensics on, the clipper hands the squares to its recorder (device work only)
        decision = self.clipper.step(sq, sq.sum().sqrt(), squares=sq, replicas=replicas)
        self.factors = decision.coefs if _is_one(scale) else decision.coefs / scale

    def apply(self, opt: Any, group: int) -> None:
        """Scale each piece of ``group``'s flat fp32 gradient by its tensor's factor (one foreach multiply)."""
        flat = self.layout.flat_grad(opt, group)
        views = [flat.narrow(0, offset, numel) for offset, numel in self.layout.spans[group] if numel > 0]
        factors = self.factors.index_select(0, self.index[group]).to(flat.dtype)
        factors = [f for f, (_, numel) in zip(factors.unbind(), self.layout.spans[group]) if numel > 0]
        if views:
            torch._foreach_mul_(views, factors)


def _measuring(norm_method: str):
    """An override of DeepSpeed's once-per-step norm method (``scaled_global_norm`` for ZeRO-1/2,
    ``_get_norm_groups`` for ZeRO-3) that leaves it unchanged, collectives included, and has AdaGC measure
    the same gradients beside it: all groups' gradients are present, the overflow check has run, and the
    loss scale is still the one the gradients carry. Outside an engine step it only returns the norm."""

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = getattr(super(type(self), self), norm_method)(*args, **kwargs)
        hook = self.__dict__["_zclip"]
        if hook.open:
            hook.sharded.measure(self, self.loss_scale)
        return result

    return method


def _zero12_unscale_and_clip(self: Any, grad_groups_flat: list, total_norm: Any) -> None:
    # Replaces DeepSpeed's unscale-and-clip: the per-tensor factors include 1/loss_scale, so this is the
    # one pass over the partition, and DeepSpeed's fixed clip never applies while AdaGC is attached.
    hook = self.__dict__["_zclip"]
    if not hook.open:
        return super(type(self), self).unscale_and_clip_grads(grad_groups_flat, total_norm)
    flat = grad_groups_flat[0]
    group = next(i for i, fp32 in enumerate(self.single_partition_of_fp32_groups) if fp32.grad is flat)
    hook.sharded.apply(self, group)


def _zero3_unscale_and_clip(self: Any, sub_group_id: int, total_norm: Any) -> None:
    hook = self.__dict__["_zclip"]
    if not hook.open:
        return super(type(self), self).unscale_and_clip_grads(sub_group_id, total_norm)
    hook.sharded.apply(self, sub_group_id)


def _unfused_adagc_unscale(self: Any, total_norm: Any, apply_scale: bool = True) -> Any:
    # FP16_UnfusedOptimizer (bf16/fp16 ZeRO-0): the fp32 master gradients are whole tensors, and never
    # loss-scaled: DeepSpeed 0.19.8's engine.backward scales the loss only for ZeRO optimizers.
    if apply_scale:
        self.__dict__["_zclip"].clip_unfused(self)
    return 1.0


class DeepSpeedAdaGC(Attachment):
    """AdaGC attached to one DeepSpeed engine. Build with :func:`attach`.

    Per path (see the module docstring): ZeRO-1/2 and ZeRO-3 measure the pieces of each tensor in this
    rank's partition next to DeepSpeed's own norm and scale them in place of DeepSpeed's unscale-and-clip;
    ZeRO-0 (no wrapper, or FP16_UnfusedOptimizer) measures whole tensors. Either way one bucketed
    all-reduce of the per-tensor vector per step, and no host read beyond DeepSpeed's own on the wrapper
    paths.
    """

    metric_prefix = ADAGC_METRIC_PREFIX

    def __init__(self, engine: Any, config: AdaGCConfig, forensics: ForensicsConfig | None = None, *,
                 forensics_explicit: bool = False, on_event: Callable[[Event], None] | None = None) -> None:
        super().__init__(engine, config, forensics, forensics_explicit=forensics_explicit, on_event=on_event)
        refuse_unsupported(engine, "adagc")
        _refuse_unsupported_adagc(engine)
        self.clipper = AdaGCClipper(config)
        self.names = _param_names(engine)
        self.sharded: _ShardedPerTensor | None = None
        forensics_methods = self._forensics_namespace("adagc")  # ZeRO-1/2 fp32/bf16 only
        self._norms: NormCalculator | None = None
        opt = engine.optimizer
        self.wrapper = "clip_grad" in vars(opt)
        stage = engine.zero_optimization_stage()
        if stage in (1, 2):
            self._hook_sharded(Zero12Layout(opt), opt.dp_process_group,
                               {"scaled_global_norm": _measuring("scaled_global_norm"),
                                "unscale_and_clip_grads": _zero12_unscale_and_clip, **forensics_methods})
            self.sharded.forensics = self.forensics
        elif stage == 3:
            self._hook_sharded(Zero3Layout(opt), opt.dp_process_group,
                               {"_get_norm_groups": _measuring("_get_norm_groups"),
                                "unscale_and_clip_grads": _zero3_unscale_and_clip})
        elif self.wrapper:  # FP16_UnfusedOptimizer (checked by _refuse_unsupported_adagc)
            self._norms = NormCalculator(engine_topology(engine), device=engine.device)
            self._bind([p for group in opt.fp16_groups for p in group])
            swap_class(opt, self, {"unscale_and_clip_grads": _unfused_adagc_unscale})
        else:
            self._norms = NormCalculator(engine_topology(engine), device=engine.device)
            self._bind([p for p in engine.module.parameters() if p.requires_grad])
            engine.clip_fp32_gradients = self._clip_fp32_gradients
            keep_engine_clip_gate_open(engine)
            make_skippable(opt)
        self._install_step_and_checkpoints()

    def _bind(self, params: list[Tensor]) -> None:
        self.clipper.bind([self.names.get(id(p), f"param.{k}") for k, p in enumerate(params)], self.engine.device)

    def _hook_sharded(self, layout, dp_group, namespace: dict[str, Any]) -> None:
        self._bind(layout.params)
        topology = sharded_topology(self.engine, dp_group)
        self.sharded = _ShardedPerTensor(layout, topology, self.clipper, self.engine.device)
        swap_class(self.engine.optimizer, self, namespace)

    # ---- one optimizer step ----------------------------------------------------------------------
    def _skipped_by_engine(self, norm: float, overflow: bool) -> None:
        # DeepSpeed skipped the step before AdaGC measured: count it; gamma never sees it.
        values = torch.full((len(self.clipper.names),), norm, device=self.engine.device)
        self.clipper.step(values, torch.full((), norm, device=self.engine.device), overflow=overflow)

    @staticmethod
    def _to_host(values: list[float]) -> dict[str, Any]:
        return adagc_to_host(values)

    @staticmethod
    def _is_event(metrics: dict[str, Any]) -> bool:
        return bool(metrics["num_clipped_tensors"] or metrics["nonfinite"])

    def _clip_whole_tensors(self, params: list[Tensor], grads: list[Tensor], overflow: bool = False):
        """Whole-tensor gradients (ZeRO-0): norms by the NormCalculator (one bucketed all-reduce), one
        decision, one foreach multiply per (device, dtype) group."""
        norm, sq = self._norms.per_tensor(params, grads)
        plan = self._norms.plan
        self._bind([params[i] for i in plan.order])  # a no-op unless the set of gradients changed
        decision = self.clipper.step(sq, norm, overflow=overflow)
        factors = decision.coefs
        start = 0
        for ix in plan.groups:
            group = [grads[i] for i in ix]
            part = factors[start:start + len(ix)].to(device=group[0].device, dtype=group[0].dtype)
            torch._foreach_mul_(group, list(part.unbind()))
            start += len(ix)
        return decision

    def _clip_fp32_gradients(self) -> None:
        """Replaces ``engine.clip_fp32_gradients`` (fp32 ZeRO-0, no wrapper)."""
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        decision = self._clip_whole_tensors(params, [p.grad for p in params], overflow=self.loss_scaling)
        if self.config.nonfinite == "skip":
            # Skipping a raw optimizer's step is a host decision: the one read on this path, where
            # DeepSpeed itself reads nothing (none under nonfinite="propagate").
            self.engine.optimizer.overflow = bool(decision.skipped)

    def clip_unfused(self, opt: Any) -> None:
        """FP16_UnfusedOptimizer: DeepSpeed already skipped non-finite steps before this point."""
        params = [p for group in opt.fp16_groups for p in group]
        grads = [p.grad for group in opt.fp32_groups for p in group]
        self._clip_whole_tensors(params, grads)


def _refuse_unsupported_adagc(engine: Any) -> None:
    """Paths AdaGC does not hook (yet): refused by name rather than clipped wrongly."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    opt = engine.optimizer
    stage = engine.zero_optimization_stage()
    if isinstance(opt, BF16_Optimizer):  # DeepSpeed builds it for bf16 ZeRO-0 and, in some configs, ZeRO-1
        raise UnsupportedConfiguration(f"adagc: the BF16_Optimizer path (bf16, ZeRO stage {stage}) is not supported "
                                       "yet; use bf16 with ZeRO-2/3, or ZeRO-0 with a torch optimizer and "
                                       "torch_autocast")
    if getattr(engine, "grid", None) is not None and engine.grid.get_pipe_parallel_world_size() > 1:
        raise UnsupportedConfiguration("adagc: PipelineEngine with more than one stage is not supported yet "
                                       "(use ZeRO-0/1/2/3 without a pipeline, or the Megatron front end)")
    if stage in (1, 2, 3) and (getattr(opt, "cpu_offload", False) or getattr(opt, "offload_optimizer", False)):
        raise UnsupportedConfiguration("adagc: ZeRO optimizer offload is not supported yet; remove "
                                       "zero_optimization.offload_optimizer")
    if stage == 0 and "clip_grad" in vars(opt) and not isinstance(opt, FP16_UnfusedOptimizer):
        raise UnsupportedConfiguration(f"adagc: the {type(opt).__name__} path (FusedAdam FP16_Optimizer or "
                                       "BF16_Optimizer) is not supported yet; use bf16 ZeRO-0 with a torch "
                                       "optimizer, or ZeRO-1/2/3")
    if stage in (1, 2) and "clip_grad" not in vars(opt):
        raise UnsupportedConfiguration(f"adagc: ZeRO-{stage} built {type(opt).__name__}, which is not hooked")
