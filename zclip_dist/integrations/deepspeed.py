"""DeepSpeed adapter: ZClip inside a DeepSpeed engine. The only module that touches DeepSpeed private names.

How it hooks in (``shared/notes/deepspeed.md`` maps every optimizer path of deepspeed 0.19.8):

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
* A non-finite norm: the wrappers already skip the step (overflow) before reading ``clip_grad``; the
  clipper then records the step as non-finite without touching its statistics. Without a wrapper the
  raw optimizer gets an ``overflow`` flag, which DeepSpeed's engine reads to count a skipped step, and
  its ``step`` is skipped.
* Checkpoints: ``engine.save_checkpoint`` / ``load_checkpoint`` are wrapped on the instance to carry the
  clipper state in ``client_state`` under :data:`CLIENT_STATE_KEY` (removed again on load).
* Metrics: on rank 0, at ``steps_per_print`` cadence, into ``engine.monitor`` as ``Train/zclip/<name>``.

Host synchronisation: exactly one per optimizer step, reading the decision as a Python float (wrapper
paths: DeepSpeed branches in Python on ``clip_grad > 0.``; it has just synced on the same norm in
``is_invalid_grad_norm``) or the skip flag (no-wrapper path, ``nonfinite="skip"``: skipping an optimizer
step is a host decision). Plus one transfer of all metrics on log steps, on rank 0.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from ..clipper import Clipper
from ..config import ConfigError, ZClipConfig
from ..norms import NormCalculator
from ..topology import Topology

__all__ = ["CONFIG_KEY", "CLIENT_STATE_KEY", "METRIC_PREFIX", "resolve_config", "attach", "DeepSpeedZClip",
           "MegatronMPU", "UnsupportedConfiguration"]

CONFIG_KEY = "zclip"
CLIENT_STATE_KEY = "zclip_dist"
METRIC_PREFIX = "Train/zclip/"


class UnsupportedConfiguration(ValueError):
    """ZClip cannot be applied correctly to this DeepSpeed configuration; the message says why."""


# ---- configuration -------------------------------------------------------------------------------
def resolve_config(param_dict: Mapping[str, Any]) -> ZClipConfig | None:
    """The ``"zclip"`` entry of a DeepSpeed config dict as a :class:`ZClipConfig`, or ``None`` if absent.

    ``gradient_clipping`` (when > 0) is ZClip's cap unless the entry sets ``max_grad_norm``; with no
    engine clip the reference default (1.0) applies. ``"enabled": false`` turns the entry off.
    """
    entry = param_dict.get(CONFIG_KEY)
    if entry is None:
        return None
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{CONFIG_KEY} = {entry!r} is invalid: allowed an object of ZClip settings")
    enabled = entry.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{CONFIG_KEY}.enabled = {enabled!r} is invalid: allowed true or false")
    if not enabled:
        return None
    defaults: dict[str, Any] = {}
    engine_clip = param_dict.get("gradient_clipping", 0.0)
    if isinstance(engine_clip, (int, float)) and not isinstance(engine_clip, bool) and engine_clip > 0:
        defaults["max_grad_norm"] = float(engine_clip)
    return ZClipConfig.from_dict(entry, source=CONFIG_KEY, **defaults)


# ---- tensor parallelism --------------------------------------------------------------------------
class MegatronMPU:
    """megatron-core ``parallel_state`` presented through DeepSpeed's ``mpu`` interface.

    DeepSpeed calls ``get_model_parallel_rank/world_size/group``, which parallel_state lacks. The model
    parallel rank is the tensor rank (DeepSpeed uses it to skip TP duplicates) and the model parallel
    group is the TP x PP group (DeepSpeed sums partial norms over it). Everything else is forwarded.
    """

    def __init__(self, parallel_state: Any = None) -> None:
        if parallel_state is None:
            from megatron.core import parallel_state
        self._ps = parallel_state

    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._ps.get_model_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._ps.get_data_parallel_group()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ps, name)


def _group_if_split(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    return group if group is not None and dist.get_world_size(group) > 1 else None


def engine_topology(engine: Any) -> Topology:
    """Where every gradient element of ``engine``'s module is counted once (no-wrapper and TP paths).

    Pipeline engines: the grid's slice (tensor) group, pipe group and data group. An ``mpu``: its tensor
    group (``get_tensor_model_parallel_group`` if it has one, else ``get_model_parallel_group``) and its
    data group. Otherwise data parallel over WORLD. The one SUM runs over WORLD, which contains them all.
    """
    grid = getattr(engine, "grid", None)
    if grid is not None:
        return Topology.from_groups(tp_group=_group_if_split(grid.get_slice_parallel_group()),
                                    pp_group=_group_if_split(grid.get_pipe_parallel_group()),
                                    dp_group=_group_if_split(grid.get_data_parallel_group()))
    mpu = engine.mpu
    if mpu is not None:
        tp_get = getattr(mpu, "get_tensor_model_parallel_group", None) or mpu.get_model_parallel_group
        pp_get = getattr(mpu, "get_pipeline_model_parallel_group", None)
        return Topology.from_groups(tp_group=_group_if_split(tp_get()),
                                    pp_group=_group_if_split(pp_get()) if pp_get else None,
                                    dp_group=_group_if_split(mpu.get_data_parallel_group()))
    return Topology.data_parallel(dist.group.WORLD)


# ---- the optimizer-wrapper hook ------------------------------------------------------------------
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


def _swap_class(optimizer: Any, hook: "DeepSpeedZClip", own_norm: bool) -> None:
    """Give this one instance a subclass whose ``clip_grad`` is ZClip's per-step value (name kept)."""
    cls = type(optimizer)
    namespace: dict[str, Any] = {"clip_grad": property(_clip_grad_get, _clip_grad_set),
                                 "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    if own_norm:
        namespace["unscale_and_clip_grads"] = _unfused_unscale_and_clip
    static = optimizer.__dict__.pop("clip_grad")
    optimizer.__dict__["_zclip"] = hook
    optimizer.__dict__["_zclip_static_clip"] = static
    optimizer.__class__ = type(cls.__name__, (cls,), namespace)


# ---- the attachment -------------------------------------------------------------------------------
class DeepSpeedZClip:
    """ZClip attached to one DeepSpeed engine. Build with :func:`attach`."""

    def __init__(self, engine: Any, config: ZClipConfig) -> None:
        self.engine = engine
        self.config = config
        self.clipper = Clipper(config, device=engine.device)
        self.open = False  # inside the engine's optimizer step
        self._value: float | None = None  # this step's clip_grad, once decided
        self._own_norm: Tensor | None = None
        self._norms: NormCalculator | None = None
        _refuse_unsupported(engine)
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
            _swap_class(opt, self, own_norm=self.unfused_tp)
        else:
            self._norms = NormCalculator(engine_topology(engine), device=engine.device)
            engine.clip_fp32_gradients = self._clip_fp32_gradients
            if engine.gradient_clipping() <= 0.0:  # DeepSpeed only clips (calls us) when it is > 0
                engine.gradient_clipping = lambda: math.inf
            opt.overflow = False  # the engine counts a skipped step when the raw optimizer says so
            opt.step = self._skippable(opt.step)
        engine._take_model_step = self._wrap_step(engine._take_model_step)
        engine.save_checkpoint = self._wrap_save(engine.save_checkpoint)
        engine.load_checkpoint = self._wrap_load(engine.load_checkpoint)

    # ---- one optimizer step ----------------------------------------------------------------------
    def _wrap_step(self, take_model_step):
        @functools.wraps(take_model_step)
        def step(*args, **kwargs):
            opt = self.engine.optimizer
            self.open, self._value, self._own_norm = True, None, None
            self.clipper.last = None
            if self.wrapper:
                opt._global_grad_norm = None  # never decide on last step's norm
            try:
                result = take_model_step(*args, **kwargs)
            finally:
                self.open = False
            if self.clipper.last is None:
                if not (self.wrapper and getattr(opt, "overflow", False)):
                    raise RuntimeError("zclip: the optimizer step ended without a ZClip decision; this "
                                       f"DeepSpeed optimizer path ({type(opt).__name__}) is not hooked")
                # DeepSpeed skipped the step on a non-finite norm before reading clip_grad: record it
                # (counters only; the statistics never see a non-finite norm).
                self.clipper.step(torch.full((), math.nan, device=self.engine.device))
            else:
                self.engine._global_grad_norm = self.clipper.last.norm  # pre-clip and exact on every path
            self._log()
            return result

        return step

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

    def _skippable(self, step):
        opt = self.engine.optimizer

        @functools.wraps(step)
        def maybe_step(*args, **kwargs):
            if opt.overflow:
                return None
            return step(*args, **kwargs)

        return maybe_step

    # ---- metrics ----------------------------------------------------------------------------------
    def _log(self) -> None:
        engine = self.engine
        monitor = getattr(engine, "monitor", None)
        if monitor is None or not monitor.enabled or engine.global_rank != 0:
            return
        every = engine.steps_per_print() or 1
        if engine.global_steps % every:
            return
        step = engine.global_samples
        events = [(METRIC_PREFIX + name, float(value), step) for name, value in self.clipper.metrics().items()]
        monitor.write_events(events)

    def metrics(self) -> dict[str, Any]:
        """The last step's metrics as Python numbers (one host transfer)."""
        return self.clipper.metrics()

    # ---- checkpoints ------------------------------------------------------------------------------
    def _wrap_save(self, save):
        signature = inspect.signature(save)

        @functools.wraps(save)
        def save_checkpoint(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            client_state = dict(bound.arguments.get("client_state") or {})
            client_state[CLIENT_STATE_KEY] = self.clipper.state_dict()
            bound.arguments["client_state"] = client_state
            return save(*bound.args, **bound.kwargs)

        return save_checkpoint

    def _wrap_load(self, load):
        @functools.wraps(load)
        def load_checkpoint(*args, **kwargs):
            path, client_state = load(*args, **kwargs)
            if client_state and CLIENT_STATE_KEY in client_state:
                self.clipper.load_state_dict(client_state.pop(CLIENT_STATE_KEY))
            return path, client_state

        return load_checkpoint

    def state_dict(self) -> dict[str, Any]:
        return self.clipper.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.clipper.load_state_dict(state_dict)


def _refuse_unsupported(engine: Any) -> None:
    """Raise :class:`UnsupportedConfiguration` for paths where ZClip would be silently wrong."""
    opt = engine.optimizer
    if opt is None:
        raise UnsupportedConfiguration("zclip: the engine has no optimizer; pass one to deepspeed.initialize")
    stage = engine.zero_optimization_stage()
    if engine.torch_autocast_enabled() and engine.torch_autocast_dtype() == torch.float16 and stage > 0:
        raise UnsupportedConfiguration(
            "zclip: torch_autocast with fp16 and ZeRO stage >= 1 is refused: DeepSpeed computes the gradient "
            "norm on loss-scaled gradients there (its GradScaler unscales only after clipping), so the norm is "
            "off by the loss scale. Use bf16 autocast, ZeRO stage 0, or the bf16 section.")
    if engine.zenflow or engine.super_offload():
        raise UnsupportedConfiguration("zclip: ZenFlow and SuperOffload replace the clipping step; not supported")
    if getattr(engine, "has_moe_layers", False):
        raise UnsupportedConfiguration("zclip: MoE layers are not supported yet (DeepSpeed averages expert norms)")
    if getattr(opt, "fused_adam_legacy", False) or getattr(opt, "fused_lamb_legacy", False):
        raise UnsupportedConfiguration("zclip: the legacy fused FP16 step computes its clip before the norm; "
                                       "not supported")
    if stage in (1, 2) and "clip_grad" in vars(opt):
        if getattr(opt, "compute_grad_norm", True) is False:
            raise UnsupportedConfiguration("zclip needs the gradient norm: set zero_optimization.compute_grad_norm "
                                           "to true")
        # fp32/fp16 treat a non-finite norm as overflow anyway; bf16 only with check_grad_overflow.
        if getattr(opt, "dtype", None) == torch.bfloat16 and getattr(opt, "check_grad_overflow", True) is False:
            raise UnsupportedConfiguration("zclip needs DeepSpeed's overflow check to skip non-finite steps: set "
                                           "bf16.check_grad_overflow to true")


def attach(engine: Any, config: ZClipConfig | Mapping[str, Any] | None = None) -> DeepSpeedZClip | None:
    """Attach ZClip to a built engine; ``None`` (nothing changed) when the config has no ``"zclip"`` entry.

    ``config``: a :class:`ZClipConfig`, a mapping of ZClip settings, or ``None`` to read the engine's
    DeepSpeed config. Attaching twice returns the first attachment.
    """
    existing = getattr(engine, "_zclip", None)
    if existing is not None:
        return existing
    if config is None:
        config = resolve_config(engine._config._param_dict)
    elif isinstance(config, Mapping):
        config = resolve_config({**engine._config._param_dict, CONFIG_KEY: dict(config)})
    if config is None:
        return None
    hook = DeepSpeedZClip(engine, config)
    engine._zclip = hook
    return hook
