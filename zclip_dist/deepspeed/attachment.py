"""What ZClip and AdaGC do alike inside a DeepSpeed engine: bracket the optimizer step, carry the state
in ``engine.save_checkpoint`` / ``load_checkpoint``, write metrics to the engine's monitor, and the few
instance-level patches both use (a one-off subclass of the optimizer wrapper, the clip gate, a skippable
raw optimizer). Refusals of configurations where clipping would be silently wrong live here too.

* Checkpoints: ``save_checkpoint`` / ``load_checkpoint`` are wrapped on the instance to carry the clipper
  state in ``client_state`` under :data:`~zclip_dist.deepspeed.config.CLIENT_STATE_KEY` (removed again
  on load).
* Metrics: on rank 0, at ``steps_per_print`` cadence, into ``engine.monitor`` as ``Train/zclip/<name>``
  or ``Train/adagc/<name>``.
* A non-finite norm: the wrappers skip the step (overflow) before the clip; the clipper then records the
  step as non-finite without touching its statistics. Without a wrapper the raw optimizer gets an
  ``overflow`` flag, which DeepSpeed's engine reads to count a skipped step, and its ``step`` is skipped.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from typing import Any, Mapping

import torch

from ..config import AdaGCConfig
from .config import CLIENT_STATE_KEY, METRIC_PREFIX, UnsupportedConfiguration

__all__ = ["Attachment", "swap_class", "keep_engine_clip_gate_open", "make_skippable", "refuse_unsupported"]


def swap_class(optimizer: Any, hook: "Attachment", namespace: dict[str, Any]) -> None:
    """Give this one instance a subclass with ``namespace`` overriding its methods (class name kept), so
    other engines and ``isinstance`` checks are unaffected. The hook is reachable as ``_zclip``."""
    cls = type(optimizer)
    namespace = {**namespace, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    optimizer.__dict__["_zclip"] = hook
    optimizer.__class__ = type(cls.__name__, (cls,), namespace)


class Attachment:
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
