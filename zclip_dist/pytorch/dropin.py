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
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..adagc import AdaGCDecision
from ..clipper import AdaGCClipper, Clipper
from ..config import AdaGCConfig, ZClipConfig
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

    def _setup(self, nonfinite: str, topology: Topology | None, optimizer: torch.optim.Optimizer | None) -> None:
        self.topology, self.nonfinite, self.optimizer = topology, nonfinite, optimizer
        self._norms = None
        self._gates: list[StepGate] = []
        self._param_key: tuple[int, ...] | None = None
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
        if self._norms is None:
            self.topology = self.topology or Topology.for_parameters(params, model if isinstance(model, nn.Module) else None)
            self._norms = NormCalculator(self.topology, device=params[0].grad.device)
            # The settings must agree over the ranks this clipper spans; a local clipper spans none.
            self.clipper.config_group = self.topology.group
            self.clipper.check_config = self.topology.group is not None
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
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, max_grad_norm: float | None = 1.0,
                 eps: float = 1e-6, warmup_steps: int = 25, mode: str = "zscore",
                 clip_option: str = "adaptive_scaling", clip_factor: float = 1.0,
                 skip_update_on_spike: bool = False, *, nonfinite: str = "skip",
                 recovery_steps: int | None = None, verify_every: int = 0, log_jsonl: str | None = None,
                 log_interval: int = 1, topology: Topology | None = None, config: ZClipConfig | None = None,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        self.config = config if config is not None else ZClipConfig(
            alpha=alpha, z_thresh=z_thresh, max_grad_norm=max_grad_norm, eps=eps, warmup_steps=warmup_steps,
            mode=mode, clip_option=clip_option, clip_factor=clip_factor,
            skip_update_on_spike=skip_update_on_spike, nonfinite=nonfinite, recovery_steps=recovery_steps,
            verify_every=verify_every, log_jsonl=log_jsonl, log_interval=log_interval)
        self.clipper = Clipper(self.config)
        self._setup(self.config.nonfinite, topology, optimizer)

    # ---- the step ---------------------------------------------------------------------------------
    def step(self, model: nn.Module | Iterable[Tensor] | Tensor) -> Tensor:
        """Clip the gradients of ``model`` (a module, an iterable of parameters, or one tensor) in place.

        Returns the pre-clip global norm as a 0-d tensor on the gradients' device: fp32, or fp64 when
        some gradients are fp64. Raises if no parameter has a gradient (the statistics are untouched).
        """
        _, params, grads = self._gradients(model)
        norm, _ = self._norms(params, grads)
        decision = self.clipper.step(norm)
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
    by parameter name, and the step makes no host synchronisation.
    """

    def __init__(self, *, mode: str = "adagc", clip_ratio: float = 1.04, beta: float = 0.99,
                 warmup_steps: int = 100, max_grad_norm: float | None = 1.0, eps: float = 1e-6,
                 nonfinite: str = "skip", recovery_steps: int | None = None, log_jsonl: str | None = None,
                 log_interval: int = 1, topology: Topology | None = None,
                 config: AdaGCConfig | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.config = config if config is not None else AdaGCConfig(
            mode=mode, clip_ratio=clip_ratio, beta=beta, warmup_steps=warmup_steps,
            max_grad_norm=max_grad_norm, eps=eps, nonfinite=nonfinite, recovery_steps=recovery_steps,
            log_jsonl=log_jsonl, log_interval=log_interval)
        self.clipper = AdaGCClipper(self.config)
        self._setup(self.config.nonfinite, topology, optimizer)

    def step(self, model: nn.Module | Iterable[Tensor] | Tensor) -> Tensor:
        """Clip in place; return the pre-clip global norm (0-d tensor, as :meth:`ZClip.step`)."""
        names, params, grads = self._gradients(model)
        norm, full_sq = self._norms.per_tensor(params, grads)
        full_sq = full_sq.to(torch.float32)  # gamma is fp32 (fp64 gradients accumulate in fp64)
        plan = self._norms.plan
        self.clipper.bind([names[i] for i in plan.order], plan.device)
        decision = self.clipper.step(full_sq, norm)
        self._hand_over(grads, decision.coefs, decision.skipped)
        return norm
