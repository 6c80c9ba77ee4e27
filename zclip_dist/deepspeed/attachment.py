"""What ZClip and AdaGC do alike inside a DeepSpeed engine: bracket the optimizer step, carry the state
in ``engine.save_checkpoint`` / ``load_checkpoint``, write metrics to the engine's monitor and the JSON-lines
file, and the few instance-level patches both use (a one-off subclass of the optimizer wrapper, the clip
gate, a skippable raw optimizer). Refusals of configurations where clipping would be silently wrong live
here too.

* Checkpoints: ``save_checkpoint`` / ``load_checkpoint`` are wrapped on the instance to carry the clipper
  state in ``client_state`` under :data:`~zclip_dist.deepspeed.config.CLIENT_STATE_KEY` (removed again
  on load). :func:`record_loads` notes that state on engines zclip_dist built without a clipping entry, so
  an :func:`~zclip_dist.deepspeed.attach` after ``load_checkpoint`` restores it.
* Metrics: on rank 0, into ``engine.monitor`` as ``Train/zclip/<name>`` / ``Train/adagc/<name>`` every
  ``steps_per_print`` steps, and into ``log_jsonl`` every ``log_interval`` steps; a clipped, spike or
  non-finite step is written to both whatever the cadence (:mod:`~zclip_dist.deepspeed.events`: no device
  sync to find out).
* Spike forensics (ZeRO-1/2, :mod:`~zclip_dist.deepspeed.forensics`): the clipper's ``recorder``; event
  rows reach ``on_event``, the JSON-lines line (``events``) and the monitor
  (``Train/zclip/event/grad_norm``, ``.../param/<name>``, ``.../replica/<i>``) at the event's sample count.
* A non-finite norm: the wrappers skip the step (overflow) before the clip; the clipper then records the
  step as non-finite without touching its statistics. Under fp16 dynamic loss scaling that is a routine
  loss-scale overflow: recorded as ``inf``, never raised by ``nonfinite="raise"``. Without a wrapper the
  raw optimizer gets an ``overflow`` flag, which DeepSpeed's engine reads to count a skipped step, and its
  ``step`` is skipped.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import math
import warnings
import weakref
from typing import Any, Callable, Mapping

import torch

from ..config import AdaGCConfig, ForensicsConfig
from ..forensics import Event, event_scalars
from .config import (
    ADAGC_CONFIG_KEY,
    CLIENT_STATE_KEY,
    CONFIG_KEY,
    FORENSICS_KEY,
    METRIC_PREFIX,
    UnsupportedConfiguration,
)
from .events import StepRecords
from .forensics import ZeroForensics, replica_namespace, unsupported_reason

__all__ = ["Attachment", "swap_class", "keep_engine_clip_gate_open", "make_skippable", "refuse_unsupported",
           "record_loads"]

_LOADED = "_zclip_dist_loaded"  # engine attribute: (path, our state or None) of its last load_checkpoint


def swap_class(optimizer: Any, hook: "Attachment", namespace: dict[str, Any]) -> None:
    """Give this one instance a subclass with ``namespace`` overriding its methods (class name kept), so
    other engines and ``isinstance`` checks are unaffected. The hook is reachable as ``_zclip``."""
    cls = type(optimizer)
    namespace = {**namespace, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    optimizer.__dict__["_zclip"] = hook
    optimizer.__class__ = type(cls.__name__, (cls,), namespace)


def record_loads(engine: Any) -> None:
    """Wrap ``engine.load_checkpoint`` to note the clipping state the checkpoint carries (client_state left
    as it is), for an attachment made after the load."""
    load = engine.load_checkpoint

    @functools.wraps(load)
    def load_checkpoint(*args, **kwargs):
        path, client_state = load(*args, **kwargs)
        if path is not None:
            setattr(engine, _LOADED, (path, (client_state or {}).get(CLIENT_STATE_KEY)))
        return path, client_state

    engine.load_checkpoint = load_checkpoint


def _uses_dynamic_loss_scaling(engine: Any) -> bool:
    """fp16 with DeepSpeed's dynamic loss scale, or torch_autocast fp16 (a GradScaler): overflows are routine."""
    return bool((engine.fp16_enabled() and engine.dynamic_loss_scale())
                or getattr(engine, "torch_autocast_z0_gradscaler", None) is not None)


class Attachment:
    """One clipping method attached to one engine: brackets the optimizer step, carries the state in
    checkpoints and writes metrics. Subclasses install their hooks, say what a step without a decision
    means (:meth:`_skipped_by_engine`) and which metrics make a step an event (:meth:`_is_event`)."""

    metric_prefix = METRIC_PREFIX

    def __init__(self, engine: Any, config: Any, forensics: ForensicsConfig | None = None, *,
                 forensics_explicit: bool = False, on_event: Callable[[Event], None] | None = None) -> None:
        self.engine = engine
        self.config = config
        self.forensics_config = forensics if forensics is not None else ForensicsConfig(top_k=0)
        self._forensics_explicit = forensics_explicit
        self._on_event = on_event
        self.forensics: ZeroForensics | None = None
        self.open = False  # inside the engine's optimizer step
        self.loss_scaling = _uses_dynamic_loss_scaling(engine)
        self._calls = 0  # optimizer steps seen: the JSONL record's "call"
        self._records = StepRecords() if engine.global_rank == 0 else None
        if self._records is not None:
            ref = weakref.ref(self)
            atexit.register(lambda: ref() is not None and ref().flush())

    def _install_step_and_checkpoints(self) -> None:
        engine = self.engine
        self.clipper.jsonl_every_interval = False  # written by _record: the cadence plus every event step
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
            self._record()
            return result

        return step

    def _begin_step(self) -> None:
        self.clipper.last = None
        if self.wrapper:
            self.engine.optimizer._global_grad_norm = None  # never decide on last step's norm

    def _finish_step(self) -> None:
        if self.clipper.last is None:
            self._require_overflow()
            # DeepSpeed skipped the step on a non-finite norm before we saw it: record it (counters only;
            # the statistics never see a non-finite norm). A loss-scale overflow is inf, and routine.
            self._skipped_by_engine(math.inf if self.loss_scaling else math.nan, overflow=self.loss_scaling)
        else:
            self.engine._global_grad_norm = self.clipper.last.norm  # pre-clip and exact on every path
        if self.forensics is not None:
            self.forensics.end_step()

    def _skipped_by_engine(self, norm: float, overflow: bool) -> None:
        raise NotImplementedError

    def _require_overflow(self) -> None:
        """A step that ended without a decision is only legitimate when DeepSpeed skipped it (overflow)."""
        opt = self.engine.optimizer
        if not getattr(opt, "overflow", False):
            raise RuntimeError(f"zclip_dist: the optimizer step ended without a decision; this DeepSpeed "
                               f"optimizer path ({type(opt).__name__}) is not hooked")

    # ---- metrics ----------------------------------------------------------------------------------
    def _to_host(self, values: list[float]) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def _is_event(metrics: Mapping[str, Any]) -> bool:
        raise NotImplementedError

    def _record(self) -> None:
        """Queue this step's metrics (rank 0), then write the steps whose metrics have reached the host."""
        self._calls += 1
        if self._records is None:
            return
        engine = self.engine
        every = engine.steps_per_print() or 1
        vector = self.clipper.metrics_tensor()
        tail = self.forensics.latest() if self.forensics is not None else None
        if tail is not None:  # AdaGC's newest event row travels with the metrics: no read of its own
            vector = torch.cat([vector.to(torch.float64), tail])
        self._records.push(vector, (self._calls, engine.global_samples, engine.global_steps % every == 0,
                                    0 if tail is None else tail.numel()))
        self._write(self._records.landed())

    def flush(self) -> None:
        """Write every queued step now (waits for the device); checkpoints and exit call it."""
        if self._records is not None:
            self._write(self._records.drain())

    def _write(self, landed) -> None:
        monitor = getattr(self.engine, "monitor", None)
        to_monitor = monitor is not None and monitor.enabled
        interval = self.config.log_interval
        for values, (call, samples, on_print_step, tail) in landed:
            metrics = self._to_host(values[:len(values) - tail])
            event = self._is_event(metrics)
            events = self.forensics.for_log(values[len(values) - tail:]) if self.forensics is not None and event else []
            if to_monitor and (on_print_step or event):
                rows = [(self.metric_prefix + k, float(v), samples) for k, v in metrics.items()]
                for e in events:  # at the sample count of the step whose metrics carry them
                    rows += [(k, v, samples) for k, v in event_scalars(e, self.metric_prefix + "event/").items()]
                monitor.write_events(rows)
            if event or call % interval == 0:
                self.clipper.write_jsonl(call, {**metrics, "events": [e.to_json() for e in events]} if events
                                         else metrics)

    # ---- spike forensics ----------------------------------------------------------------------------
    def _forensics_namespace(self, method: str) -> dict[str, Any]:
        """Start spike forensics where this engine's path is covered; returns the methods to add to the
        optimizer wrapper's one-off subclass. Elsewhere the default is off, said once in DeepSpeed's log
        (rank 0), and an explicit ``"forensics"`` entry is refused by name."""
        cfg = self.forensics_config
        if not cfg.enabled:
            return {}
        engine = self.engine
        reason = unsupported_reason(engine, cfg)
        if reason is not None:
            if self._forensics_explicit:
                key = ADAGC_CONFIG_KEY if method == "adagc" else CONFIG_KEY
                raise UnsupportedConfiguration(f"{key}.{FORENSICS_KEY}: {reason} (spike forensics covers ZeRO-1/2 in "
                                               f"fp32 or bf16); remove the entry or set it to false")
            import logging

            from deepspeed.utils import log_dist

            log_dist(f"zclip_dist: spike forensics is off on this engine: {reason}; clipped steps are recorded "
                     "without the parameters and replicas that carried them", ranks=[0], level=logging.WARNING)
            return {}
        from .groups import sharded_topology
        from .zero_layouts import Zero12Layout

        opt = engine.optimizer
        self.forensics = ZeroForensics(
            engine, cfg, method=method, layout=Zero12Layout(opt),
            topology=sharded_topology(engine, opt.dp_process_group),
            names={id(p): n for n, p in engine.module.named_parameters()}, every_step=method == "adagc",
            on_event=self._on_event)
        self.clipper.recorder = self.forensics
        return replica_namespace(opt, cfg.replicas)

    def events(self) -> list[Event]:
        """Spike-forensics events not yet read on this rank (one host transfer), each handed to ``on_event``
        once; ``[]`` without forensics."""
        return self.forensics.events() if self.forensics is not None else []

    def metrics(self) -> dict[str, Any]:
        """The last step's metrics as Python numbers (one host transfer)."""
        return self.clipper.metrics()

    # ---- checkpoints ------------------------------------------------------------------------------
    def _wrap_save(self, save):
        signature = inspect.signature(save)

        @functools.wraps(save)
        def save_checkpoint(*args, **kwargs):
            self.flush()
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
            if path is not None:
                self.restore(path, (client_state or {}).pop(CLIENT_STATE_KEY, None))
            return path, client_state

        return load_checkpoint

    def restore(self, path: Any, state: Mapping[str, Any] | None) -> None:
        """Load the state a checkpoint carried; without one, warn and start from warmup."""
        self.flush()
        if state is not None:
            self.clipper.load_state_dict(state)
            return
        method = "AdaGC" if isinstance(self.config, AdaGCConfig) else "ZClip"
        warnings.warn(f"zclip_dist: the checkpoint {path} has no {method} state; the statistics start "
                      "from warmup", stacklevel=3)

    def state_dict(self) -> dict[str, Any]:
        return self.clipper.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.clipper.load_state_dict(state_dict)


def keep_engine_clip_gate_open(engine: Any) -> None:
    """The engine calls ``clip_fp32_gradients`` only when ``gradient_clipping() > 0``: keep it so."""
    if engine.gradient_clipping() <= 0.0:
        engine.gradient_clipping = lambda: math.inf


def make_skippable(opt: Any) -> None:
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


def refuse_unsupported(engine: Any, method: str = "zclip") -> None:
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
        _refuse_unsupported_moe(engine, method)
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


def _refuse_unsupported_moe(engine: Any, method: str) -> None:
    """DeepSpeed MoE: ZClip where the norm counts every expert once (checked against a single-process
    oracle): ZeRO-0 (own norm), ZeRO-1/2 without offload (DeepSpeed's norm sums the expert partitions over
    the whole DP group). Everything else is refused by name."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if method != "zclip":
        raise UnsupportedConfiguration(f"{method}: DeepSpeed MoE layers are not supported: experts differ between "
                                       "expert-parallel ranks, and AdaGC keeps one state per tensor; use \"zclip\"")
    if engine.mpu is not None or getattr(engine, "grid", None) is not None:
        raise UnsupportedConfiguration(f"{method}: DeepSpeed MoE together with an mpu (tensor parallelism) or a "
                                       "PipelineEngine is not supported")
    stage = engine.zero_optimization_stage()
    wrapper = "clip_grad" in vars(opt)
    zero12 = isinstance(opt, DeepSpeedZeroOptimizer) and not getattr(opt, "cpu_offload", False)
    if wrapper and not (isinstance(opt, FP16_UnfusedOptimizer) or zero12):
        raise UnsupportedConfiguration(f"{method}: DeepSpeed MoE with {type(opt).__name__} (ZeRO stage {stage}) is "
                                       "not supported: use ZeRO stage 0, 1 or 2 without offload_optimizer")
