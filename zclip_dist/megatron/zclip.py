"""ZClip inside the optimizer ``get_megatron_optimizer`` returned.

* :func:`attach` swaps the optimizer object's class for a one-level subclass; the release's own
  ``step()`` runs, and :mod:`zclip_dist.megatron.intercept` hands ZClip the norm that step clips with
  (:meth:`_Overrides._zclip_decide`) and ZClip's clip in place of the fixed ``--clip-grad`` one
  (:meth:`_Overrides._zclip_clip`). The object stays the same, so Megatron-LM's attribute reads
  (``chained_optimizers``, ``param_groups``, ``get_loss_scale()``...) and type checks still work.
* Megatron's norm is already a Python float (its one ``.item()``), so the ZClip statistics run on
  the host (a CPU-resident :class:`~zclip_dist.clipper.Clipper`): no device sync, no kernel. The
  decision's ``clip_to`` goes to Megatron's own ``clip_grad_by_total_norm_fp32`` as ``max_norm``, in
  place of ``--clip-grad``: the same pass, multiplying only when clipping, as stock Megatron does.
  Parameters megatron-core clips with a norm of their own (0.19's MTP heads) keep the stock clip.
* A non-finite norm makes the step return ``update_successful=False`` (``nonfinite="skip"``):
  Megatron-LM skips the update and counts a skipped iteration; the statistics do not move. Megatron's
  norm is already a host float, so this branch costs no sync.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..clipper import Clipper, host_value
from ..config import ZClipConfig
from ..forensics import Event
from .hook import STATE_KEY, attach_forensics, pop_entries, prepare, register, with_entry

__all__ = ["attach"]


class _Overrides:
    """Methods copied into a one-level subclass of the optimizer's class by :func:`attach`.

    Not a base class: CPython refuses ``__class__`` assignment when a mixin sits in front of the
    optimizer's class, so :func:`attach` builds ``type(name, (cls,), these methods)`` and the methods
    reach the original implementation through ``self._zclip_base`` instead of ``super()``.
    """

    zclip: Clipper
    _zclip_config: ZClipConfig
    _zclip_base: type
    _zclip_max_norm: float  # this step's threshold for Megatron's clip (+inf: no clip)
    _zclip_forensics: Any  # MegatronForensics or None

    def _zclip_decide(self, norm: float, finite: bool) -> None:
        """This step's norm, identical on every rank: update the statistics (exactly once per step)."""
        decision = self.zclip.step(torch.tensor(norm, dtype=torch.float64))
        self._zclip_max_norm = host_value(decision.clip_to) if finite else math.inf  # +inf: not clipping
        if self._zclip_forensics is not None:  # before the clip: the squares are of the pre-clip gradients
            self._zclip_forensics.after_zclip_step(self.zclip)

    def _zclip_clip(self, params: list, total_norm: float, use_decoupled_grad: bool, stock_clip: Callable) -> None:
        """Megatron's clip of the main gradients, to ZClip's threshold instead of ``--clip-grad``."""
        if self._zclip_max_norm < math.inf:
            stock_clip(params, self._zclip_max_norm, total_norm, use_decoupled_grad)

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


def attach(optimizer: Any, config: ZClipConfig, model: Any = None, forensics: Any = None,
           on_event: Callable[[Event], None] | None = None) -> Any:
    """Attach ZClip to ``optimizer`` in place and return it (the same object).

    Accepts what ``get_megatron_optimizer`` returns: ``ChainedOptimizer`` (dense + expert
    sub-optimizers), ``DistributedOptimizer``, ``Float16OptimizerWithFloat16Params``, ``FP32Optimizer``.
    ``model``, ``forensics``, ``on_event``: spike forensics (see :func:`zclip_dist.megatron.wrap_optimizer`).
    """
    prepare(optimizer, config, "zclip", _Overrides)
    # "raise" is enforced in intercept on the host float; the clipper itself would read its flag every step.
    inner = config.replace(nonfinite="skip") if config.nonfinite == "raise" else config
    # The norm arrives as a host float: the statistics live on the CPU, where reading them costs nothing.
    optimizer.zclip = Clipper(inner, device="cpu")
    optimizer._zclip_max_norm = math.inf
    register(optimizer)
    if attach_forensics(optimizer, optimizer.zclip, "zclip", forensics, model, on_event) is not None:
        # The event row is written after the decision, so the JSON line is written after it too.
        optimizer.zclip.jsonl_every_interval = False
    return optimizer
