"""Plain-PyTorch drop-in: ``ZClip(...).step(model)`` between ``loss.backward()`` and ``optimizer.step()``.

Same constructor and call as the reference ``zclip`` package, with the norm made exact for DDP, FSDP2 /
DTensor and explicit TP/PP/DP groups (see :class:`~zclip_dist.topology.Topology`), the state on the
device, and no host synchronisation in ``step`` (under the default ``nonfinite="skip"``).

Cost per step: one read of every gradient for the norm (``torch._foreach_norm``), one scalar
all-reduce, a dozen scalar ops, and one ``torch._foreach_mul_`` -- the work of
``torch.nn.utils.clip_grad_norm_(foreach=True)``. Under ``nonfinite="skip"`` a ``nan_to_num_`` pass
follows so that a NaN/Inf entry cannot reach the optimizer (a multiply cannot clear NaN, and deciding
on the host whether to run the pass would be the sync this module avoids).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..clipper import Clipper
from ..config import ZClipConfig
from ..norms import NormCalculator, local_tensor
from ..stats import ZClipDecision
from ..topology import Topology

__all__ = ["ZClip"]


class ZClip:
    """Adaptive gradient clipping by z-score anomaly detection on the global gradient norm.

    Positional and keyword arguments are the reference package's (same defaults); see
    :class:`~zclip_dist.config.ZClipConfig`. Extra keyword-only arguments:

    Args:
        nonfinite: ``"skip"`` (default), ``"raise"`` or ``"propagate"``.
        topology: how gradients are sharded/replicated across ranks; guessed from the model when omitted
            (:meth:`Topology.for_parameters`).
        config: a ready :class:`ZClipConfig` instead of the individual settings.
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, max_grad_norm: float | None = 1.0,
                 eps: float = 1e-6, warmup_steps: int = 25, mode: str = "zscore",
                 clip_option: str = "adaptive_scaling", clip_factor: float = 1.0,
                 skip_update_on_spike: bool = False, *, nonfinite: str = "skip",
                 topology: Topology | None = None, config: ZClipConfig | None = None) -> None:
        self.config = config if config is not None else ZClipConfig(
            alpha=alpha, z_thresh=z_thresh, max_grad_norm=max_grad_norm, eps=eps, warmup_steps=warmup_steps,
            mode=mode, clip_option=clip_option, clip_factor=clip_factor,
            skip_update_on_spike=skip_update_on_spike, nonfinite=nonfinite)
        self.clipper = Clipper(self.config)
        self.topology = topology
        self._norms: NormCalculator | None = None

    # ---- the step ---------------------------------------------------------------------------------
    def step(self, model: nn.Module | Iterable[Tensor]) -> Tensor:
        """Clip the gradients of ``model`` (a module or an iterable of parameters) in place.

        Returns the pre-clip global norm as a 0-d fp32 tensor on the gradients' device.
        """
        module = model if isinstance(model, nn.Module) else None
        params = [p for p in (model.parameters() if module is not None else model) if p.grad is not None]
        if self._norms is None:
            topology = self.topology or Topology.for_parameters(params, module)
            self.topology = topology
            device = params[0].grad.device if params else None
            self._norms = NormCalculator(topology, device=device)
        grads = [local_tensor(p.grad) for p in params]
        norm, _ = self._norms(params, grads)
        decision = self.clipper.step(norm)
        self._apply(grads, decision)
        return norm

    def _apply(self, grads: list[Tensor], decision: ZClipDecision) -> None:
        if not grads:
            return
        plan = self._norms.plan
        for ix in plan.groups:
            group = [grads[i] for i in ix]
            coef = decision.coef.to(device=group[0].device, dtype=group[0].dtype, non_blocking=True)
            torch._foreach_mul_(group, coef)
            if self.config.nonfinite == "skip":
                for g in group:
                    g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)

    # ---- introspection and checkpointing ---------------------------------------------------------
    @property
    def last(self) -> ZClipDecision | None:
        """The last step's decision (device tensors)."""
        return self.clipper.last

    def metrics(self) -> dict[str, Any]:
        """The last step's metrics as Python numbers (one host transfer; call on log steps)."""
        return self.clipper.metrics()

    def state_dict(self) -> dict[str, Any]:
        return self.clipper.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.clipper.load_state_dict(state_dict)

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
