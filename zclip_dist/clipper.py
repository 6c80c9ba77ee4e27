"""The engine-independent clipper: one ZClip decision per optimizer step, identical on every rank.

Engine adapters and the PyTorch drop-in own a :class:`Clipper`; they hand it the global norm once per
optimizer step and get back a :class:`~zclip_dist.stats.ZClipDecision` whose ``coef`` they apply (or
whose ``clip_to`` they pass as the engine's ``max_norm``). The clipper keeps the state on the device,
checkpoints it, and enforces the non-finite policy.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from .config import ZClipConfig
from .metrics import metrics_tensors, to_host
from .stats import STATE_DTYPE, ZClipDecision, ZClipState, init_state, zclip_update

__all__ = ["Clipper", "agree", "STATE_FORMAT", "STATE_VERSION"]

logger = logging.getLogger("zclip_dist")

STATE_FORMAT = "zclip_dist.zclip"
STATE_VERSION = 1


def agree(norm: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Make a scalar norm bitwise identical on every rank of ``group`` (MAX, non-finite preserved).

    For engines whose norm is computed per replica (Megatron's non-distributed optimizer reduces over
    the model-parallel group only; DP replicas compute it independently): one 2-element all-reduce
    over ``group`` (usually WORLD). MAX with NaN is not reliable across backends, so the non-finite
    flag travels separately and NaN is restored afterwards.
    """
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return norm
    value = norm.detach().to(torch.float32).reshape(())
    bad = ~torch.isfinite(value)
    packed = torch.stack([torch.where(bad, torch.zeros_like(value), value), bad.to(torch.float32)])
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    return torch.where(packed[1] > 0, torch.full_like(packed[0], float("nan")), packed[0])


class Clipper:
    """ZClip state plus the per-step decision.

    Args:
        config: the settings.
        device: where the state lives (default: the device of the first norm it is given).
    """

    def __init__(self, config: ZClipConfig, *, device: torch.device | str | None = None) -> None:
        self.config = config
        self.state: ZClipState | None = init_state(config, device) if device is not None else None
        self.last: ZClipDecision | None = None

    # ---- the step ---------------------------------------------------------------------------------
    def step(self, norm: Tensor | float) -> ZClipDecision:
        """Feed this optimizer step's pre-clip global norm; update the statistics exactly once.

        No host synchronisation unless ``nonfinite="raise"`` (which must read the flag on the host).
        """
        if not isinstance(norm, Tensor):
            device = self.state.mean.device if self.state is not None else None
            norm = torch.tensor(float(norm), dtype=STATE_DTYPE, device=device)
        if self.state is None:
            self.state = init_state(self.config, norm.device)
        elif self.state.mean.device != norm.device:  # loaded on CPU before the first step: move once
            self.state = ZClipState(*(t.to(norm.device) for t in self.state))
        self.state, self.last = zclip_update(self.config, self.state, norm.to(self.state.mean.device))
        if self.config.nonfinite == "raise" and bool(self.last.nonfinite):
            rank = dist.get_rank() if dist.is_initialized() else 0
            raise FloatingPointError(
                f"zclip: non-finite gradient norm ({float(self.last.norm)}) at step {int(self.state.steps)} "
                f"on rank {rank}; every rank raises (nonfinite='raise'). Set nonfinite='skip' to skip such steps.")
        return self.last

    # ---- metrics ----------------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """The last step's metrics as Python numbers: one host transfer. Call on log steps only."""
        if self.last is None or self.state is None:
            return {}
        return to_host(metrics_tensors(self.last, self.state))

    def metrics_tensor(self) -> Tensor | None:
        """The last step's metrics, still on the device (see ``metrics.METRIC_NAMES``)."""
        return None if self.last is None else metrics_tensors(self.last, self.state)

    # ---- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Versioned, world-size independent (the state is replicated), tensors on CPU."""
        state = self.state if self.state is not None else init_state(self.config, "cpu")
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "state": {k: v.detach().cpu().clone() for k, v in state._asdict().items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        fmt, version = state_dict.get("format"), state_dict.get("version")
        if fmt != STATE_FORMAT:
            raise ValueError(f"not a ZClip state (format {fmt!r}, expected {STATE_FORMAT!r})")
        if not isinstance(version, int) or version > STATE_VERSION:
            raise ValueError(f"ZClip state version {version!r} is newer than this zclip_dist understands "
                             f"(<= {STATE_VERSION}); upgrade zclip_dist to resume from this checkpoint")
        saved_cfg = dict(state_dict.get("config", {}))
        changed = {k: (saved_cfg.get(k), v) for k, v in self.config.to_dict().items() if saved_cfg.get(k, v) != v}
        if changed:
            warnings.warn("zclip: settings differ from the checkpoint's, the new ones apply: "
                          + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()), stacklevel=2)
        device = self.state.mean.device if self.state is not None else "cpu"
        self._apply_state(dict(state_dict["state"]), device)

    def _apply_state(self, saved: dict[str, Tensor], device: torch.device | str) -> None:
        fresh = init_state(self.config, device)
        loaded = {}
        for name, default in fresh._asdict().items():
            value = saved[name].to(device=default.device, dtype=default.dtype)
            loaded[name] = value
        warm_n = self.config.warmup_steps
        if loaded["buffer"].numel() != warm_n:
            if int(loaded["count"]) < max(warm_n, saved["buffer"].numel()):
                warnings.warn("zclip: warmup_steps changed during warmup; warmup starts again", stacklevel=3)
                loaded["count"], loaded["buffer"] = fresh.count, fresh.buffer
            else:
                loaded["buffer"] = fresh.buffer  # statistics exist; the warmup buffer is not used again
                loaded["count"] = torch.maximum(loaded["count"], torch.full_like(loaded["count"], warm_n))
        self.state = ZClipState(**loaded)
        self.last = None
