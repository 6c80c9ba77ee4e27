"""ZClip inside the optimizer ``get_megatron_optimizer`` returned.

* :func:`attach` swaps the optimizer object's class for a subclass whose ``step`` is stock
  ``ChainedOptimizer.step`` (megatron-core 0.16.1, ``optimizer.py:1308-1338``) with the fixed
  ``--clip-grad`` replaced by the ZClip decision. The object stays the same, so Megatron-LM's attribute
  reads (``chained_optimizers``, ``param_groups``, ``get_loss_scale()``...) and type checks still work.
* Megatron's norm is already a Python float (its one ``.item()``), so the ZClip statistics run on
  the host (a CPU-resident :class:`~zclip_dist.clipper.Clipper`): no device sync, no kernel. The
  decision's ``clip_to`` goes to Megatron's own ``clip_grad_by_total_norm_fp32`` as ``max_norm``, in
  place of ``--clip-grad``: the same pass, multiplying only when clipping, as stock Megatron does.
* A non-finite norm returns ``(False, norm, None)``: Megatron-LM skips the update and counts a skipped
  iteration; the statistics do not move. Megatron's norm is already a host float, so this branch
  costs no sync.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from ..clipper import Clipper, host_value
from ..config import ZClipConfig
from .hook import (
    STATE_KEY,
    finish_step,
    megatron_norm,
    pop_entries,
    prepare,
    register,
    sub_optimizers,
    uses_decoupled_grad,
    with_entry,
)

try:  # the module-level name stock ChainedOptimizer.step calls
    from megatron.core.optimizer.optimizer import clip_grad_by_total_norm_fp32
except ImportError:  # pragma: no cover - megatron-core is an optional extra
    clip_grad_by_total_norm_fp32 = None

__all__ = ["attach"]


class _Overrides:
    """Methods copied into a one-level subclass of the optimizer's class by :func:`attach`.

    Not a base class: CPython refuses ``__class__`` assignment when a mixin sits in front of the
    optimizer's class, so :func:`attach` builds ``type(name, (cls,), these methods)`` and the methods
    reach the original implementation through ``self._zclip_base`` instead of ``super()``.
    """

    zclip: Clipper
    _zclip_config: ZClipConfig
    _zclip_group: dist.ProcessGroup | None
    _zclip_base: type

    @torch.no_grad()
    def step(self):  # noqa: D401 - Megatron's signature: (update_successful, grad_norm, num_zeros_in_grad)
        """Stock ChainedOptimizer.step with the fixed clip replaced by ZClip's decision."""
        if self.prepare_grads():  # found inf/NaN through the loss scaler: Megatron's own skip, stats untouched
            return False, None, None
        grad_norm, finite = megatron_norm(self, self._zclip_config.nonfinite)
        decision = self.zclip.step(torch.tensor(grad_norm, dtype=torch.float64))  # host state: exactly once
        if not finite and self._zclip_config.nonfinite == "skip":
            return False, grad_norm, None  # Megatron-LM skips the LR step and counts a skipped iteration
        max_norm = host_value(decision.clip_to)  # +inf when not clipping
        if finite and max_norm < math.inf:
            for sub in sub_optimizers(self):
                if getattr(sub, "is_stub_optimizer", False) or not sub.get_parameters():
                    continue
                clip_grad_by_total_norm_fp32(
                    sub.get_parameters(), max_norm=max_norm, total_norm=grad_norm,
                    use_decoupled_grad=uses_decoupled_grad(sub))
        return finish_step(self, grad_norm)

    # ---- checkpoints: one extra entry, removed before Megatron sees the dict ----------------------
    def state_dict(self, *args, **kwargs):
        return with_entry(self._zclip_base.state_dict(self, *args, **kwargs), STATE_KEY, self.zclip.state_dict())

    def sharded_state_dict(self, *args, **kwargs):
        # Replicated state: a plain entry, which dist_checkpointing saves once as common state.
        return with_entry(self._zclip_base.sharded_state_dict(self, *args, **kwargs), STATE_KEY,
                          self.zclip.state_dict())

    def load_state_dict(self, state_dict, *args, **kwargs):
        state_dict, saved = pop_entries(state_dict, STATE_KEY, "ZClip")
        if saved is not None:
            self.zclip.load_state_dict(saved)
        return self._zclip_base.load_state_dict(self, state_dict, *args, **kwargs)


def attach(optimizer: Any, config: ZClipConfig) -> Any:
    """Attach ZClip to ``optimizer`` in place and return it (the same object).

    Accepts what ``get_megatron_optimizer`` returns: ``ChainedOptimizer`` (dense + expert
    sub-optimizers), ``DistributedOptimizer``, ``Float16OptimizerWithFloat16Params``, ``FP32Optimizer``.
    """
    prepare(optimizer, config, "zclip", _Overrides)
    # "raise" is enforced in megatron_norm on the host float; the clipper itself would read its flag every step.
    inner = config.replace(nonfinite="skip") if config.nonfinite == "raise" else config
    # The norm arrives as a host float: the statistics live on the CPU, where reading them costs nothing.
    optimizer.zclip = Clipper(inner, device="cpu")
    return register(optimizer)
