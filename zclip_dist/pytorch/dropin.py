"""Plain-PyTorch drop-in: ``ZClip(...).step(model)`` between ``loss.backward()`` and ``optimizer.step()``.

Same constructor and call as the reference ``zclip`` package, with the norm made exact for DDP, FSDP2 /
DTensor and explicit TP/PP/DP groups (see :class:`~zclip_dist.topology.Topology`), the state on the
device, and no host synchronisation in ``step`` (under the default ``nonfinite="skip"``).

Cost per step: one read of every gradient for the norm (``torch._foreach_norm``), one scalar
all-reduce, a dozen scalar ops, and one ``torch._foreach_mul_`` -- the work of
``torch.nn.utils.clip_grad_norm_(foreach=True)``. Skipping a non-finite step (``nonfinite="skip"``)
needs the optimizer: ``ZClip(..., optimizer=opt)`` makes ``opt.step()`` skip it for real (see
:mod:`~zclip_dist.pytorch.skip`: free for fused optimizers, one host read at ``opt.step()`` for the
others). Without one the gradients can only be zeroed (a ``nan_to_num_`` pass after the scaling, since a
multiply cannot clear NaN), which still lets momentum and weight decay move the weights: a warning says so.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..adagc import AdaGCDecision
from ..clipper import AdaGCClipper, Clipper
from ..config import AdaGCConfig, ForensicsConfig, ZClipConfig
from ..events import Forensics
from ..forensics import Event
from ..norms import NormCalculator, local_tensor
from ..stats import ZClipDecision
from ..topology import Topology
from .skip import StepGate

__all__ = ["ZClip", "AdaGC"]


def _check_layouts(names: list[str], params: list[Tensor]) -> None:
    for name, p in zip(names, params):
        if p.grad.layout != torch.strided:
            raise ValueError(f"zclip_dist: the gradient of {name!r} is {p.grad.layout}: sparse gradients are not "
                             "supported (nor by torch.nn.utils.clip_grad_norm_); use a dense one, e.g. "
                             "nn.Embedding(..., sparse=False)")


class _DropIn:
    """Collects a step's gradients and their norm calculator; subclasses decide and apply."""

    topology: Topology | None
    _norms: NormCalculator | None
    nonfinite: str
    clipper: Clipper | AdaGCClipper
    optimizer: torch.optim.Optimizer | None

    def _setup(self, nonfinite: str, topology: Topology | None, optimizer: torch.optim.Optimizer | None,
               forensics: ForensicsConfig | Mapping[str, Any] | bool | None,
               on_event: Callable[[Event], None] | None) -> None:
        self.topology, self.nonfinite, self.optimizer = topology, nonfinite, optimizer
        self._norms = None
        self._gates: list[StepGate] = []
        self._param_key: tuple[int, ...] | None = None
        self.forensics_config = ForensicsConfig.coerce(forensics)
        self.on_event = on_event
        self._forensics: Forensics | None = None
        self._bound_plan = None
        if optimizer is not None:
            self.attach_optimizer(optimizer)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip ``optimizer.step()`` on a non-finite step (what ``optimizer=`` does); once per optimizer.

        Under ``nonfinite="skip"`` the optimizer's ``step`` is wrapped (on this instance only): after a
        non-finite :meth:`step` it leaves the parameters and the optimizer state untouched.
        """
        if self.optimizer is None:
            self.optimizer = optimizer
        if self.nonfinite == "skip" and not any(g.optimizer is optimizer for g in self._gates):
            self._gates.append(StepGate(optimizer))

    def _hand_over(self, grads: list[Tensor], coefs: Tensor, skipped: Tensor) -> None:
        """Scale the gradients and arm the optimizers' skip of a non-finite step (see the module docstring)."""
        self._scale(grads, coefs)
        for gate in self._gates:
            gate.arm(skipped)

    # ---- introspection and checkpointing (the clipper's, with the engines' method names) ---------
    @property
    def last(self) -> ZClipDecision | AdaGCDecision | None:
        """The last step's decision (device tensors)."""
        return self.clipper.last

    def metrics(self) -> dict[str, Any]:
        """The last step's metrics as Python numbers (one host transfer; call on log steps)."""
        return self.clipper.metrics()

    def state_dict(self) -> dict[str, Any]:
        return self.clipper.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any] | None) -> None:
        """``None``/``{}`` (e.g. ``checkpoint.get("zclip")`` of a run without it) warns and starts from warmup."""
        self.clipper.load_state_dict(state_dict)
        for gate in self._gates:
            gate.pending = None

    # ---- spike forensics -------------------------------------------------------------------------
    def events(self) -> list[Event]:
        """Events (clipped, spike, non-finite steps) since the last read, each handed to ``on_event``.

        One device->host transfer: call it on log steps. Between reads the events wait on the device.
        """
        return self._forensics.recorder.read() if self._forensics is not None else []

    def attach(self, model: nn.Module, *, comm_hook: Callable | None = None, comm_state: object = None) -> None:
        """Set up before the first backward (every rank), so that replica attribution covers step 1.

        A DDP module gets a comm hook that measures each replica's gradient before the all-reduce
        (``comm_hook``/``comm_state``: a hook of one's own to run after the measurement, e.g. a compression
        hook, instead of ``register_comm_hook``); an FSDP2 module a measuring reduce-scatter.
        """
        self._prepare(model, list(model.parameters()))
        is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        if comm_hook is not None and not is_ddp:
            raise ValueError(f"comm_hook is for a DistributedDataParallel module, got {type(model).__name__}")
        meter = self._forensics.meter if self._forensics is not None else None
        if meter is None or meter.attached is not None:
            return
        if comm_hook is not None:
            model.register_comm_hook(comm_state if comm_state is not None else model.process_group,
                                     meter.ddp_hook(comm_hook))
            meter.attached = "ddp"
        else:
            meter.attach(model)

    def observe_replica(self, model: nn.Module | Iterable[Tensor]) -> None:
        """Measure this rank's gradients before a data-parallel reduction of one's own (not DDP/FSDP2)."""
        params = list(model.parameters() if isinstance(model, nn.Module) else model)
        self._prepare(model, params)
        if self._forensics is not None and self._forensics.meter is not None:
            self._forensics.meter.observe(params)

    def _prepare(self, model: nn.Module | Iterable[Tensor], params: list[Tensor]) -> None:
        """Topology, norm calculator and forensics, once (collective over the topology's group at most once)."""
        if self._norms is not None:
            return
        module = model if isinstance(model, nn.Module) else None
        self.topology = self.topology or Topology.for_parameters(params, module)
        # Before the first backward (attach) there is no gradient yet: the parameter's device then.
        where = next((p.grad if p.grad is not None else p for p in params[:1]), None)
        device = local_tensor(where).device if where is not None else None
        self._norms = NormCalculator(self.topology, device=device)
        # The settings must agree over the ranks this clipper spans; a local clipper spans none.
        self.clipper.config_group = self.topology.group
        self.clipper.check_config = self.topology.group is not None
        if self.forensics_config.enabled:
            method = "adagc" if isinstance(self.clipper, AdaGCClipper) else "zclip"
            self._forensics = Forensics(self.forensics_config, topology=self.topology, device=device or "cpu",
                                        method=method, on_event=self.on_event)
            self.clipper.recorder = self._forensics.recorder
            if self._forensics.meter is not None and module is not None:
                self._forensics.meter.attach(module)  # after step 1's reduction: step 1 has no replica data

    def _slots(self) -> Tensor | None:
        return self._forensics.slots() if self._forensics is not None else None

    def _bind(self, names: list[str]) -> None:
        plan = self._norms.plan
        if self._forensics is not None and plan is not self._bound_plan:
            self._forensics.bind([names[i] for i in plan.order])
            self._bound_plan = plan

    def _gradients(self, model: nn.Module | Iterable[Tensor] | Tensor) -> tuple[list[str], list[Tensor], list[Tensor]]:
        if isinstance(model, nn.Module):
            named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
        else:
            if isinstance(model, Tensor):  # one tensor, as clip_grad_norm_ accepts
                model = [model]
            named = [(f"param.{i}", p) for i, p in enumerate(model) if p.grad is not None]
        if not named:
            raise RuntimeError(
                f"zclip_dist: {type(self).__name__}.step() found no gradients (every .grad is None): call it after "
                "loss.backward() and before optimizer.step(); the statistics were left unchanged")
        if self.nonfinite == "skip" and not self._gates and self._param_key is None:
            warnings.warn(
                f"zclip_dist: {type(self).__name__}(nonfinite='skip') without optimizer=: a non-finite step "
                "only zeroes the gradients, and the optimizer still steps (momentum, Adam's moments and weight "
                f"decay move the weights). Pass {type(self).__name__}(..., optimizer=opt) to skip it.", stacklevel=3)
        names = [n for n, _ in named]
        params = [p for _, p in named]
        key = tuple(map(id, params))
        if key != self._param_key:  # a new set of gradients: check it once
            _check_layouts(names, params)
            self._param_key = key
        self._prepare(model, params)
        return names, params, [local_tensor(p.grad) for p in params]

    def _scale(self, grads: list[Tensor], coefs: Tensor) -> None:
        """Multiply each (device, dtype) group of gradients by its coefficient(s): 0-d, or one per tensor
        in plan order. Under nonfinite="skip" with no optimizer to skip, a NaN/Inf entry is then cleared,
        since x * 0 stays NaN."""
        plan = self._norms.plan
        start = 0
        for ix in plan.groups:
            group = [grads[i] for i in ix]
            first = group[0]
            if coefs.dim() == 0:
                torch._foreach_mul_(group, coefs.to(device=first.device, dtype=first.dtype, non_blocking=True))
            else:
                part = coefs[start:start + len(ix)].to(device=first.device, dtype=first.dtype, non_blocking=True)
                torch._foreach_mul_(group, list(part.unbind()))
            start += len(ix)
            if self.nonfinite == "skip" and not self._gates:
                for g in group:
                    g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


class ZClip(_DropIn):
    """Adaptive gradient clipping by z-score anomaly detection on the global gradient norm.

    Positional and keyword arguments are the reference package's (same defaults); see
    :class:`~zclip_dist.config.ZClipConfig`. Extra keyword-only arguments:

    Args:
        nonfinite, recovery_steps, verify_every, log_jsonl, log_interval: see :class:`ZClipConfig`.
        topology: how gradients are sharded/replicated across ranks; guessed from the model when omitted
            (:meth:`Topology.for_parameters`).
        config: a ready :class:`ZClipConfig` instead of the individual settings.
        optimizer: the optimizer stepped after ``step``: under ``nonfinite="skip"`` its next ``step()``
            after a non-finite norm leaves the parameters and its state untouched (free for a fused
            optimizer, one host read at ``optimizer.step()`` otherwise). Without it the gradients are
            zeroed instead, NaN entries included, and a warning says the optimizer still steps.
        forensics: spike forensics (:class:`ForensicsConfig`, a mapping of its keys, ``True`` for the
            defaults or ``False``): at each clipped, spike or non-finite step, the parameters and the
            data-parallel replicas that carried the norm, recorded on the device (see :meth:`events`).
        on_event: called with each :class:`~zclip_dist.forensics.Event` when the events are read
            (JSON-lines log steps on rank 0, every ``forensics.read_every`` steps, :meth:`events`).
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, max_grad_norm: float | None = 1.0,
                 eps: float = 1e-6, warmup_steps: int = 25, mode: str = "zscore",
                 clip_option: str = "adaptive_scaling", clip_factor: float = 1.0,
                 skip_update_on_spike: bool = False, *, nonfinite: str = "skip",
                 recovery_steps: int | None = None, verify_every: int = 0, log_jsonl: str | None = None,
                 log_interval: int = 1, topology: Topology | None = None, config: ZClipConfig | None = None,
                 optimizer: torch.optim.Optimizer | None = None,
                 forensics: ForensicsConfig | Mapping[str, Any] | bool | None = True,
                 on_event: Callable[[Event], None] | None = None) -> None:
        self.config = config if config is not None else ZClipConfig(
            alpha=alpha, z_thresh=z_thresh, max_grad_norm=max_grad_norm, eps=eps, warmup_steps=warmup_steps,
            mode=mode, clip_option=clip_option, clip_factor=clip_factor,
            skip_update_on_spike=skip_update_on_spike, nonfinite=nonfinite, recovery_steps=recovery_steps,
            verify_every=verify_every, log_jsonl=log_jsonl, log_interval=log_interval)
        self.clipper = Clipper(self.config)
        self._setup(self.config.nonfinite, topology, optimizer, forensics, on_event)

    # ---- the step ---------------------------------------------------------------------------------
    def step(self, model: nn.Module | Iterable[Tensor] | Tensor) -> Tensor:
        """Clip the gradients of ``model`` (a module, an iterable of parameters, or one tensor) in place.

        Returns the pre-clip global norm as a 0-d tensor on the gradients' device: fp32, or fp64 when
        some gradients are fp64. Raises if no parameter has a gradient (the statistics are untouched).
        """
        names, params, grads = self._gradients(model)
        if self._forensics is None:
            norm, _ = self._norms(params, grads)
            decision = self.clipper.step(norm)
        else:  # the per-tensor and per-replica squares ride in the norm's one all-reduce
            norm, squares, replicas = self._norms.with_squares(params, grads, self._slots())
            self._bind(names)
            decision = self.clipper.step(norm, squares=squares, replicas=replicas)
        self._hand_over(grads, decision.coef, decision.skipped)
        return norm

    # Reference-compatible read-only views (they read the device state: not for the step path).
    @property
    def mean(self) -> float | None:
        s = self.clipper.state
        return None if s is None or int(s.count) < self.config.warmup_steps else float(s.mean)

    @property
    def var(self) -> float | None:
        s = self.clipper.state
        return None if s is None or int(s.count) < self.config.warmup_steps else float(s.var)

    @property
    def initialized(self) -> bool:
        s = self.clipper.state
        return s is not None and int(s.count) >= self.config.warmup_steps


class AdaGC(_DropIn):
    """AdaGC: per-tensor adaptive clipping from an EMA of each tensor's clipped norm.

    ``AdaGC(...).step(model)`` between ``backward()`` and ``optimizer.step()``; arguments are
    :class:`~zclip_dist.config.AdaGCConfig`'s. Each tensor's norm is the norm of the *whole* tensor
    however it is sharded (one bucketed all-reduce over the topology's tensor group), the state is keyed
    by parameter name, and the step makes no host synchronisation. ``forensics`` and ``on_event``: as
    for :class:`ZClip` (an event is a step where a tensor was clipped, or a non-finite one).
    """

    def __init__(self, *, mode: str = "adagc", clip_ratio: float = 1.04, beta: float = 0.99,
                 warmup_steps: int = 100, max_grad_norm: float | None = 1.0, eps: float = 1e-6,
                 nonfinite: str = "skip", recovery_steps: int | None = None, log_jsonl: str | None = None,
                 log_interval: int = 1, topology: Topology | None = None,
                 config: AdaGCConfig | None = None, optimizer: torch.optim.Optimizer | None = None,
                 forensics: ForensicsConfig | Mapping[str, Any] | bool | None = True,
                 on_event: Callable[[Event], None] | None = None) -> None:
        self.config = config if config is not None else AdaGCConfig(
            mode=mode, clip_ratio=clip_ratio, beta=beta, warmup_steps=warmup_steps,
            max_grad_norm=max_grad_norm, eps=eps, nonfinite=nonfinite, recovery_steps=recovery_steps,
            log_jsonl=log_jsonl, log_interval=log_interval)
        self.clipper = AdaGCClipper(self.config)
        self._setup(self.config.nonfinite, topology, optimizer, forensics, on_event)

    def step(self, model: nn.Module | Iterable[Tensor] | Tensor) -> Tensor:
        """Clip in place; return the pre-clip global norm (0-d tensor, as :meth:`ZClip.step`)."""
        names, params, grads = self._gradients(model)
        norm, full_sq, replicas = self._norms.per_tensor_with(params, grads, self._slots())
        full_sq = full_sq.to(torch.float32)  # gamma is fp32 (fp64 gradients accumulate in fp64)
        plan = self._norms.plan
        self.clipper.bind([names[i] for i in plan.order], plan.device)
        self._bind(names)
        # With a pipeline, full_sq is this stage's: not a share of the global norm's tensors.
        squares = full_sq if self._forensics is not None and self.topology.tensor_group_is_group else None
        decision = self.clipper.step(full_sq, norm, squares=squares, replicas=replicas)
        self._hand_over(grads, decision.coefs, decision.skipped)
        return norm
