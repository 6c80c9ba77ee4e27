"""DeepSpeed adapter: ZClip or AdaGC inside a DeepSpeed engine. The only module that touches DeepSpeed
private names.

The method comes from the DeepSpeed config: a ``"zclip"`` entry (:class:`~zclip_dist.config.ZClipConfig`
keys) or an ``"adagc"`` entry (:class:`~zclip_dist.config.AdaGCConfig` keys); ``gradient_clipping`` is
ZClip's cap / AdaGC's lambda_abs unless the entry sets ``max_grad_norm``. Both entries at once are refused.

ZClip (one global threshold; ``shared/notes/deepspeed.md`` maps every optimizer path of deepspeed 0.19.8):

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

AdaGC (one threshold per parameter tensor, on the norm of the *whole* tensor):

* ZeRO-1/2: each rank holds pieces of some tensors in a flat fp32 partition. Next to DeepSpeed's own
  norm (``scaled_global_norm``, all groups' gradients present, overflow already checked) the squared
  norms of this rank's pieces go into a vector over *all* parameters (every DP rank lists the same
  parameters in the same order); one all-reduce of that vector over the DP group gives every whole
  tensor's squared norm on every rank. DeepSpeed's ``unscale_and_clip_grads`` is replaced by one
  ``_foreach_mul_`` of the pieces (views of the flat partition at DeepSpeed's own offsets) by their
  tensors' coefficients, 1/loss-scale folded in: DeepSpeed's fixed clip never applies.
* ZeRO-3: the same with each parameter's partition (``grad_position`` in its sub-group's flat fp32
  partition), measured next to ``_get_norm_groups``, applied per sub-group.
* ZeRO-0 (no wrapper, or FP16_UnfusedOptimizer for bf16): whole tensors; the norms come from
  :meth:`NormCalculator.per_tensor <zclip_dist.norms.NormCalculator.per_tensor>` (one bucketed
  all-reduce), the multiply replaces ``clip_fp32_gradients`` / ``unscale_and_clip_grads``.
* Refused for now, by name: BF16_Optimizer, FP16_Optimizer (FusedAdam), ZeRO offload, pipelines, MoE.
* The state (gamma by parameter name) survives a change of DP size.

Both methods:

* A non-finite norm: the wrappers skip the step (overflow) before the clip; the clipper then records the
  step as non-finite without touching its statistics. Without a wrapper the raw optimizer gets an
  ``overflow`` flag, which DeepSpeed's engine reads to count a skipped step, and its ``step`` is skipped.
* Checkpoints: ``engine.save_checkpoint`` / ``load_checkpoint`` are wrapped on the instance to carry the
  clipper state in ``client_state`` under :data:`CLIENT_STATE_KEY` (removed again on load).
* Metrics: on rank 0, at ``steps_per_print`` cadence, into ``engine.monitor`` as ``Train/zclip/<name>``
  or ``Train/adagc/<name>``.

Host synchronisation. ZClip: exactly one per optimizer step, reading the decision as a Python float
(wrapper paths: DeepSpeed branches in Python on ``clip_grad > 0.``; it has just synced on the same norm
in ``is_invalid_grad_norm``) or the skip flag (no-wrapper path, ``nonfinite="skip"``: skipping an
optimizer step is a host decision). AdaGC: none on the wrapper paths (the coefficients stay on the
device); the skip flag on the no-wrapper path. Plus one transfer of all metrics on log steps, on rank 0.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from ..clipper import AdaGCClipper, Clipper
from ..config import AdaGCConfig, ConfigError, ZClipConfig
from ..norms import NormCalculator
from ..topology import Topology

__all__ = ["CONFIG_KEY", "ADAGC_CONFIG_KEY", "CLIENT_STATE_KEY", "METRIC_PREFIX", "ADAGC_METRIC_PREFIX",
           "resolve_config", "attach", "DeepSpeedZClip", "DeepSpeedAdaGC", "MegatronMPU", "UnsupportedConfiguration"]

CONFIG_KEY = "zclip"
ADAGC_CONFIG_KEY = "adagc"
CLIENT_STATE_KEY = "zclip_dist"  # ZClip's or AdaGC's state; each carries its own format tag
METRIC_PREFIX = "Train/zclip/"
ADAGC_METRIC_PREFIX = "Train/adagc/"
_METHOD_NAMES = {CONFIG_KEY: "ZClip", ADAGC_CONFIG_KEY: "AdaGC"}


class UnsupportedConfiguration(ValueError):
    """ZClip cannot be applied correctly to this DeepSpeed configuration; the message says why."""


# ---- configuration -------------------------------------------------------------------------------
def _entry(param_dict: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    """The enabled ``key`` entry of a DeepSpeed config dict, or ``None`` (absent or ``"enabled": false``)."""
    entry = param_dict.get(key)
    if entry is None:
        return None
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{key} = {entry!r} is invalid: allowed an object of {_METHOD_NAMES[key]} settings")
    enabled = entry.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{key}.enabled = {enabled!r} is invalid: allowed true or false")
    return entry if enabled else None


def _engine_clip(param_dict: Mapping[str, Any]) -> dict[str, float]:
    """``gradient_clipping`` as the ``max_grad_norm`` default when it is a positive number."""
    engine_clip = param_dict.get("gradient_clipping", 0.0)
    if isinstance(engine_clip, (int, float)) and not isinstance(engine_clip, bool) and engine_clip > 0:
        return {"max_grad_norm": float(engine_clip)}
    return {}


def resolve_config(param_dict: Mapping[str, Any]) -> ZClipConfig | AdaGCConfig | None:
    """The clipping entry of a DeepSpeed config dict: a :class:`ZClipConfig` for ``"zclip"``, an
    :class:`AdaGCConfig` for ``"adagc"``, or ``None`` if neither is present (or enabled).

    ``gradient_clipping`` (when > 0) is ``max_grad_norm`` unless the entry sets it: ZClip's cap, AdaGC's
    lambda_abs (the warmup's global clip); with no engine clip the methods' default (1.0) applies.
    ``"enabled": false`` turns an entry off. Both entries enabled at once is an error.
    """
    zclip, adagc = _entry(param_dict, CONFIG_KEY), _entry(param_dict, ADAGC_CONFIG_KEY)
    if zclip is not None and adagc is not None:
        raise ConfigError(f"the DeepSpeed config has both a {CONFIG_KEY!r} and an {ADAGC_CONFIG_KEY!r} entry: "
                          "they are two clipping methods for the same gradients; keep one (or set "
                          '"enabled": false in the other)')
    if adagc is not None:
        return AdaGCConfig.from_dict(adagc, source=ADAGC_CONFIG_KEY, **_engine_clip(param_dict))
    if zclip is not None:
        return ZClipConfig.from_dict(zclip, source=CONFIG_KEY, **_engine_clip(param_dict))
    return None


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


def _swap_class(optimizer: Any, hook: "_Attachment", namespace: dict[str, Any]) -> None:
    """Give this one instance a subclass with ``namespace`` overriding its methods (class name kept), so
    other engines and ``isinstance`` checks are unaffected. The hook is reachable as ``_zclip``."""
    cls = type(optimizer)
    namespace = {**namespace, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    optimizer.__dict__["_zclip"] = hook
    optimizer.__class__ = type(cls.__name__, (cls,), namespace)


def _swap_clip_grad(optimizer: Any, hook: "DeepSpeedZClip", own_norm: bool) -> None:
    """ZClip: ``clip_grad`` becomes a property returning ZClip's per-step ceiling."""
    namespace: dict[str, Any] = {"clip_grad": property(_clip_grad_get, _clip_grad_set)}
    if own_norm:
        namespace["unscale_and_clip_grads"] = _unfused_unscale_and_clip
    optimizer.__dict__["_zclip_static_clip"] = optimizer.__dict__.pop("clip_grad")
    _swap_class(optimizer, hook, namespace)


# ---- shared by both methods: step bracket, checkpoints, metrics ---------------------------------------
class _Attachment:
    """One clipping method attached to one engine: brackets the optimizer step, carries the state in
    checkpoints and writes metrics. Subclasses install their hooks and say what a step without a decision
    means (:meth:`_begin_step`, :meth:`_finish_step`)."""

    metric_prefix = METRIC_PREFIX

    def __init__(self, engine: Any, config: Any) -> None:
        self.engine = engine
        self.config = config
        self.open = False  # inside the engine's optimizer step

    def _install_step_and_checkpoints(self) -> None:
        engine = self.engine
        engine._take_model_step = self._wrap_step(engine._take_model_step)
        engine.save_checkpoint = self._wrap_save(engine.save_checkpoint)
        engine.load_checkpoint = self._wrap_load(engine.load_checkpoint)

    def _wrap_step(self, take_model_step):
        @functools.wraps(take_model_step)
        def step(*args, **kwargs):
            self._begin_step()
            self.open = True
            try:
                result = take_model_step(*args, **kwargs)
            finally:
                self.open = False
            self._finish_step()
            self._log()
            return result

        return step

    def _begin_step(self) -> None:
        self.clipper.last = None
        if self.wrapper:
            self.engine.optimizer._global_grad_norm = None  # never decide on last step's norm

    def _require_overflow(self) -> None:
        """A step that ended without a decision is only legitimate when DeepSpeed skipped it (overflow)."""
        opt = self.engine.optimizer
        if not getattr(opt, "overflow", False):
            raise RuntimeError(f"zclip_dist: the optimizer step ended without a decision; this DeepSpeed "
                               f"optimizer path ({type(opt).__name__}) is not hooked")

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
        events = [(self.metric_prefix + name, float(value), step) for name, value in self.clipper.metrics().items()]
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
            elif path is not None:  # a checkpoint written without clipping state: say so, start from warmup
                method = "AdaGC" if isinstance(self.config, AdaGCConfig) else "ZClip"
                warnings.warn(f"zclip_dist: the checkpoint {path} has no {method} state; the statistics start "
                              "from warmup", stacklevel=2)
            return path, client_state

        return load_checkpoint

    def state_dict(self) -> dict[str, Any]:
        return self.clipper.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.clipper.load_state_dict(state_dict)


# ---- ZClip ------------------------------------------------------------------------------------------
class DeepSpeedZClip(_Attachment):
    """ZClip attached to one DeepSpeed engine. Build with :func:`attach`."""

    def __init__(self, engine: Any, config: ZClipConfig) -> None:
        super().__init__(engine, config)
        self.clipper = Clipper(config, device=engine.device)
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
            _swap_clip_grad(opt, self, own_norm=self.unfused_tp)
        else:
            self._norms = NormCalculator(engine_topology(engine), device=engine.device)
            engine.clip_fp32_gradients = self._clip_fp32_gradients
            _keep_engine_clip_gate_open(engine)
            _make_skippable(opt)
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


def _keep_engine_clip_gate_open(engine: Any) -> None:
    """The engine calls ``clip_fp32_gradients`` only when ``gradient_clipping() > 0``: keep it so."""
    if engine.gradient_clipping() <= 0.0:
        engine.gradient_clipping = lambda: math.inf


def _make_skippable(opt: Any) -> None:
    """A raw torch optimizer gets DeepSpeed's ``overflow`` flag: the engine counts a skipped step when it is
    set, and ``step`` then does nothing."""
    opt.overflow = False
    step = opt.step

    @functools.wraps(step)
    def maybe_step(*args, **kwargs):
        if opt.overflow:
            return None
        return step(*args, **kwargs)

    opt.step = maybe_step


# ---- AdaGC ------------------------------------------------------------------------------------------
def _param_names(engine: Any) -> dict[int, str]:
    """Parameter name by ``id``: the names AdaGC's state is keyed by (stable across DP sizes)."""
    return {id(p): n for n, p in engine.module.named_parameters()}


def _sharded_topology(engine: Any, dp_group: dist.ProcessGroup) -> Topology:
    """ZeRO: every DP rank holds a disjoint piece of every tensor it lists, so all pieces count; with an
    ``mpu``, TP-duplicated tensors count on tensor rank 0 only and the SUM runs over WORLD (TP x DP)."""
    mpu = engine.mpu
    if mpu is None:
        return Topology.sharded(dp_group)
    tp_get = getattr(mpu, "get_tensor_model_parallel_group", None) or mpu.get_model_parallel_group
    return Topology.from_groups(tp_group=_group_if_split(tp_get()), dp_group=_group_if_split(dp_group),
                                dp_sharded=True)


class _Zero12Layout:
    """Where each parameter's piece sits in this rank's flat fp32 partition, per param group (ZeRO-1/2).

    Read once from DeepSpeed's own bookkeeping (``grad_start_offset`` / ``grad_partition_insertion_offset``,
    the layout its compact gradient buffer uses); the pieces of one group are contiguous and ordered as
    ``params_in_partition``. ``params`` is every parameter of every group, in an order all DP ranks share.
    """

    def __init__(self, opt: Any) -> None:
        self.params = [p for group in opt.round_robin_bit16_groups for p in group]
        position = {id(p): k for k, p in enumerate(self.params)}
        self.spans: list[list[tuple[int, int]]] = []  # per group: (offset in the flat partition, numel)
        self.positions: list[list[int]] = []  # per group: index into ``params`` of each span
        for i, group in enumerate(opt.params_in_partition):
            part = dist.get_rank(group=opt.real_dp_process_group[i])
            spans, positions = [], []
            for p in group:
                pid = opt.get_param_id(p)
                src = int(opt.grad_start_offset[i][part][pid])
                dst = int(opt.grad_partition_insertion_offset[i][part][pid])
                spans.append((dst, int(min(p.numel() - src, opt.partition_size[i] - dst))))
                positions.append(position[id(p)])
            self.spans.append(spans)
            self.positions.append(positions)

    def pieces(self, opt: Any, group: int) -> list[Tensor]:
        """This step's gradient pieces of ``group`` before the flat partition exists, read as DeepSpeed's
        own norm reads them: the entries of ``averaged_gradients`` not marked ``_zero_padding``, paired in
        order with ``params_in_partition`` (an unmarked tail of zeros pads the last partition)."""
        spans = self.spans[group]
        pieces = [g for g in opt.averaged_gradients[group] if not getattr(g, "_zero_padding", False)]
        pieces = pieces[:len(spans)]
        if [g.numel() for g in pieces] != [numel for _, numel in spans]:
            raise RuntimeError(f"adagc: ZeRO group {group}'s gradient pieces do not match DeepSpeed's partition "
                               "offsets; this DeepSpeed layout is not supported")
        return pieces

    @staticmethod
    def flat_grad(opt: Any, group: int) -> Tensor:
        return opt.single_partition_of_fp32_groups[group].grad


class _Zero3Layout:
    """ZeRO-3: each parameter's partition (``partition_numel`` elements, zero padded on the last rank) sits
    at ``grad_position`` in its sub-group's flat fp32 partition; every rank lists every parameter."""

    def __init__(self, opt: Any) -> None:
        self.params = [p for group in opt.fp16_groups for p in group]
        dp_ranks = dist.get_process_group_ranks(opt.dp_process_group)
        if any(dist.get_process_group_ranks(opt._get_param_partition_group(p)) != dp_ranks for p in self.params):
            raise UnsupportedConfiguration("adagc: ZeRO-3 parameters partitioned over a group other than the "
                                           "data-parallel group (MiCS) are not supported yet")
        position = {id(p): k for k, p in enumerate(self.params)}
        self.spans, self.positions = [], []
        for group in opt.fp16_groups:
            self.spans.append([tuple(opt.grad_position[opt.get_param_id(p)][1:]) for p in group])
            self.positions.append([position[id(p)] for p in group])

    @staticmethod
    def pieces(opt: Any, group: int) -> list[Tensor]:
        return list(opt.averaged_gradients[group])

    @staticmethod
    def flat_grad(opt: Any, group: int) -> Tensor:
        return opt.fp32_partitioned_groups_flat[group].grad


def _is_one(scale: Any) -> bool:
    return isinstance(scale, (int, float)) and scale == 1


class _ShardedPerTensor:
    """AdaGC on ZeRO partitions: whole-tensor norms from this rank's pieces, coefficients onto the pieces.

    ``measure`` runs where DeepSpeed computes its own norm (all groups' gradients present, overflow
    already checked); ``apply`` replaces DeepSpeed's unscale-and-clip multiply of one flat partition.
    """

    def __init__(self, layout: _Zero12Layout | _Zero3Layout, topology: Topology, clipper: AdaGCClipper,
                 device: torch.device) -> None:
        self.layout = layout
        self.topology = topology
        self.clipper = clipper
        n = len(layout.params)
        self.index = [torch.tensor(pos, dtype=torch.long, device=device) for pos in layout.positions]
        self.all_index = torch.cat(self.index) if self.index else torch.zeros(0, dtype=torch.long, device=device)
        counts = [topology.counts_in_tensor_group(p) for p in layout.params]
        self.weights = None if all(counts) else torch.tensor(counts, dtype=torch.float32, device=device)
        self.zeros = torch.zeros(n, dtype=torch.float32, device=device)
        self.factors: Tensor | None = None  # this step's multiplier per tensor (loss scale folded in)

    def local_squares(self, opt: Any) -> Tensor:
        """Squared norms of this rank's pieces, scattered into the all-parameter vector (fp32, no sync)."""
        pieces = [g for i in range(len(self.index)) for g in self.layout.pieces(opt, i)]
        if not pieces:
            return self.zeros.clone()
        norms = torch.stack(torch._foreach_norm(pieces, 2, dtype=torch.float32)).to(self.zeros.device)
        sq = self.zeros.index_copy(0, self.all_index, norms.square_())
        return sq if self.weights is None else sq.mul_(self.weights)  # 0 * NaN stays NaN on purpose

    def whole_tensor_squares(self, opt: Any) -> Tensor:
        """Squared norm of every *whole* tensor, identical on every rank: one bucketed all-reduce of the
        per-parameter vector over the topology's tensor group (the DP group, or TP x DP with an mpu),
        because DP ranks hold disjoint pieces of the same tensors at the same vector positions."""
        return self.topology.all_reduce_tensor_sum(self.local_squares(opt))

    def measure(self, opt: Any, scale: Any) -> None:
        sq = self.whole_tensor_squares(opt)
        if not _is_one(scale):  # fp16: DeepSpeed's gradients still carry the loss scale
            sq = sq / (scale * scale)
        decision = self.clipper.step(sq, sq.sum().sqrt())
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
    # FP16_UnfusedOptimizer (bf16/fp16 ZeRO-0): the fp32 master gradients are whole tensors.
    scale = self.loss_scale_config.cur_scale
    if apply_scale:
        self.__dict__["_zclip"].clip_unfused(self, scale)
    return scale


class DeepSpeedAdaGC(_Attachment):
    """AdaGC attached to one DeepSpeed engine. Build with :func:`attach`.

    Per path (see the module docstring): ZeRO-1/2 and ZeRO-3 measure the pieces of each tensor in this
    rank's partition next to DeepSpeed's own norm and scale them in place of DeepSpeed's unscale-and-clip;
    ZeRO-0 (no wrapper, or FP16_UnfusedOptimizer) measures whole tensors. Either way one bucketed
    all-reduce of the per-tensor vector per step, and no host read beyond DeepSpeed's own on the wrapper
    paths.
    """

    metric_prefix = ADAGC_METRIC_PREFIX

    def __init__(self, engine: Any, config: AdaGCConfig) -> None:
        super().__init__(engine, config)
        _refuse_unsupported(engine, "adagc")
        _refuse_unsupported_adagc(engine)
        self.clipper = AdaGCClipper(config)
        self.names = _param_names(engine)
        self.sharded: _ShardedPerTensor | None = None
        self._norms: NormCalculator | None = None
        opt = engine.optimizer
        self.wrapper = "clip_grad" in vars(opt)
        stage = engine.zero_optimization_stage()
        if stage in (1, 2):
            self._hook_sharded(_Zero12Layout(opt), opt.dp_process_group,
                               {"scaled_global_norm": _measuring("scaled_global_norm"),
                                "unscale_and_clip_grads": _zero12_unscale_and_clip})
        elif stage == 3:
            self._hook_sharded(_Zero3Layout(opt), opt.dp_process_group,
                               {"_get_norm_groups": _measuring("_get_norm_groups"),
                                "unscale_and_clip_grads": _zero3_unscale_and_clip})
        elif self.wrapper:  # FP16_UnfusedOptimizer (checked by _refuse_unsupported_adagc)
            self._norms = NormCalculator(engine_topology(engine), device=engine.device)
            self._bind([p for group in opt.fp16_groups for p in group])
            _swap_class(opt, self, {"unscale_and_clip_grads": _unfused_adagc_unscale})
        else:
            self._norms = NormCalculator(engine_topology(engine), device=engine.device)
            self._bind([p for p in engine.module.parameters() if p.requires_grad])
            engine.clip_fp32_gradients = self._clip_fp32_gradients
            _keep_engine_clip_gate_open(engine)
            _make_skippable(opt)
        self._install_step_and_checkpoints()

    def _bind(self, params: list[Tensor]) -> None:
        self.clipper.bind([self.names.get(id(p), f"param.{k}") for k, p in enumerate(params)], self.engine.device)

    def _hook_sharded(self, layout, dp_group, namespace: dict[str, Any]) -> None:
        self._bind(layout.params)
        topology = _sharded_topology(self.engine, dp_group)
        self.sharded = _ShardedPerTensor(layout, topology, self.clipper, self.engine.device)
        _swap_class(self.engine.optimizer, self, namespace)

    # ---- one optimizer step ----------------------------------------------------------------------
    def _finish_step(self) -> None:
        if self.clipper.last is None:
            self._require_overflow()
            # DeepSpeed skipped the step before AdaGC measured: count it; gamma never sees it.
            n = len(self.clipper.names)
            nan = torch.full((n,), math.nan, device=self.engine.device)
            self.clipper.step(nan, nan.sum())
        else:
            self.engine._global_grad_norm = self.clipper.last.norm

    def _clip_whole_tensors(self, params: list[Tensor], grads: list[Tensor], scale: Any = 1.0):
        """Whole-tensor gradients (ZeRO-0): norms by the NormCalculator (one bucketed all-reduce), one
        decision, one foreach multiply per (device, dtype) group; ``scale`` is a loss scale to remove."""
        norm, sq = self._norms.per_tensor(params, grads)
        if not _is_one(scale):
            norm, sq = norm / scale, sq / (scale * scale)
        plan = self._norms.plan
        self._bind([params[i] for i in plan.order])  # a no-op unless the set of gradients changed
        decision = self.clipper.step(sq, norm)
        factors = decision.coefs if _is_one(scale) else decision.coefs / scale
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
        decision = self._clip_whole_tensors(params, [p.grad for p in params])
        if self.config.nonfinite == "skip":
            # Skipping a raw optimizer's step is a host decision: the one read on this path, where
            # DeepSpeed itself reads nothing (none under nonfinite="propagate").
            self.engine.optimizer.overflow = bool(decision.skipped)

    def clip_unfused(self, opt: Any, scale: Any) -> None:
        """FP16_UnfusedOptimizer: DeepSpeed already skipped non-finite steps before this point."""
        params = [p for group in opt.fp16_groups for p in group]
        grads = [p.grad for group in opt.fp32_groups for p in group]
        self._clip_whole_tensors(params, grads, scale)


def _refuse_unsupported_adagc(engine: Any) -> None:
    """Paths AdaGC does not hook (yet): refused by name rather than clipped wrongly."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    opt = engine.optimizer
    stage = engine.zero_optimization_stage()
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


def _refuse_unsupported(engine: Any, method: str = "zclip") -> None:
    """Raise :class:`UnsupportedConfiguration` for paths where clipping would be silently wrong."""
    opt = engine.optimizer
    if opt is None:
        raise UnsupportedConfiguration(f"{method}: the engine has no optimizer; pass one to deepspeed.initialize")
    stage = engine.zero_optimization_stage()
    if engine.torch_autocast_enabled() and engine.torch_autocast_dtype() == torch.float16 and stage > 0:
        raise UnsupportedConfiguration(
            f"{method}: torch_autocast with fp16 and ZeRO stage >= 1 is refused: DeepSpeed computes the gradient "
            "norm on loss-scaled gradients there (its GradScaler unscales only after clipping), so the norm is "
            "off by the loss scale. Use bf16 autocast, ZeRO stage 0, or the bf16 section.")
    if engine.zenflow or engine.super_offload():
        raise UnsupportedConfiguration(f"{method}: ZenFlow and SuperOffload replace the clipping step; not supported")
    if getattr(engine, "has_moe_layers", False):
        raise UnsupportedConfiguration(f"{method}: MoE layers are not supported yet (DeepSpeed averages expert norms)")
    if getattr(opt, "fused_adam_legacy", False) or getattr(opt, "fused_lamb_legacy", False):
        raise UnsupportedConfiguration(f"{method}: the legacy fused FP16 step computes its clip before the norm; "
                                       "not supported")
    if stage in (1, 2) and "clip_grad" in vars(opt):
        if getattr(opt, "compute_grad_norm", True) is False:
            raise UnsupportedConfiguration(f"{method} needs the gradient norm: set zero_optimization.compute_grad_norm "
                                           "to true")
        # fp32/fp16 treat a non-finite norm as overflow anyway; bf16 only with check_grad_overflow.
        if getattr(opt, "dtype", None) == torch.bfloat16 and getattr(opt, "check_grad_overflow", True) is False:
            raise UnsupportedConfiguration(f"{method} needs DeepSpeed's overflow check to skip non-finite steps: set "
                                           "bf16.check_grad_overflow to true")


def attach(engine: Any, config: ZClipConfig | AdaGCConfig | Mapping[str, Any] | None = None
           ) -> DeepSpeedZClip | DeepSpeedAdaGC | None:
    """Attach ZClip or AdaGC to a built engine; ``None`` (nothing changed) when the config has neither a
    ``"zclip"`` nor an ``"adagc"`` entry.

    ``config``: a :class:`ZClipConfig` or :class:`AdaGCConfig`, a mapping of ZClip settings, or ``None``
    to read the engine's DeepSpeed config. The attachment is ``engine._zclip`` for either method;
    attaching twice returns the first attachment.
    """
    existing = getattr(engine, "_zclip", None)
    if existing is not None:
        return existing
    if config is None:
        config = resolve_config(engine._config._param_dict)
    elif isinstance(config, Mapping):
        others = {k: v for k, v in engine._config._param_dict.items() if k != ADAGC_CONFIG_KEY}
        config = resolve_config({**others, CONFIG_KEY: dict(config)})
    if config is None:
        return None
    hook = DeepSpeedAdaGC(engine, config) if isinstance(config, AdaGCConfig) else DeepSpeedZClip(engine, config)
    engine._zclip = hook
    return hook
