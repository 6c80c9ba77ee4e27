"""The reference ``zclip`` 1.0.0 package driven with a prescribed global norm.

A single float64 parameter whose gradient is the norm makes the reference's own ``step(model)`` see
exactly that norm; the gradient after the call gives its coefficient. Nothing of the reference is
re-implemented here.
"""

from __future__ import annotations

import torch
from zclip import ZClip as ReferenceZClip

from zclip_dist.config import ZClipConfig

REFERENCE_KEYS = ("alpha", "z_thresh", "max_grad_norm", "eps", "warmup_steps", "mode", "clip_option",
                  "clip_factor", "skip_update_on_spike")


class ReferenceOracle:
    def __init__(self, config: ZClipConfig) -> None:
        self.zclip = ReferenceZClip(**{k: getattr(config, k) for k in REFERENCE_KEYS})
        self.param = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.module = torch.nn.Module()
        self.module.p = self.param

    def step(self, norm: float) -> float:
        """Feed ``norm``; return the reference's coefficient."""
        self.param.grad = torch.tensor([norm], dtype=torch.float64)
        self.zclip.step(self.module)
        return float(self.param.grad[0]) / norm if norm != 0 else 1.0

    @property
    def stats(self) -> tuple[float, float] | None:
        return (self.zclip.mean, self.zclip.var) if self.zclip.initialized else None
