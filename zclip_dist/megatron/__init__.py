"""ZClip and AdaGC for Megatron: ``--zclip*`` / ``--adagc*`` flags, the optimizer hook and metrics.

Typical use in a Megatron-LM training script (or through ``python -m zclip_dist.megatron.launch``,
which does this to the stock ``pretrain_gpt.py`` without editing it)::

    from zclip_dist import megatron as zmeg
    pretrain(..., extra_args_provider=zmeg.add_arguments)          # --zclip*, --adagc*
    optimizer = get_megatron_optimizer(config, model, ...)
    config = zmeg.clipping_config(args)                            # ZClipConfig, AdaGCConfig or None
    if config is not None:
        optimizer = zmeg.wrap_optimizer(optimizer, config, model=model)

Flag names are the config field names with dashes: ``--zclip-alpha``, ``--zclip-z-thresh``,
``--zclip-max-grad-norm``, ...; ``--adagc-clip-ratio``, ``--adagc-beta``, ``--adagc-warmup-steps``, ...
When ``--zclip-max-grad-norm`` is not given, Megatron's ``--clip-grad`` is the cap (``--clip-grad 0``
means no cap), so turning ZClip on keeps the ceiling a run had. When ``--adagc-max-grad-norm`` is not
given, ``--clip-grad`` (when > 0) is AdaGC's lambda_abs, the warmup's global clip. ``--zclip`` and
``--adagc`` together are refused.

Supported: megatron-core 0.16.1 to 0.19.2 (Megatron-LM core_v0.16.1 to core_v0.19.0); other releases are
refused by name when the hook is attached and before the launcher runs a script.

Modules: ``flags`` (argparse only), ``hook`` (what both methods do to the optimizer object),
``intercept`` (where they enter the release's own ``step()``: its norm read and its clip call), ``zclip``
and ``adagc`` (each method's decision and clip), ``forensics`` (spike forensics: which parameters and
replicas carried an event step's norm; ``--zclip-forensics*`` / ``--adagc-forensics*``), ``launch`` (runs the stock ``pretrain_gpt.py`` with the
flags and the hook), ``patch`` (the source patch for a Megatron-LM checkout). Only this package touches
megatron-core's and Megatron-LM's private names; how Megatron computes its norm and where the hook sits
is in ``docs/internals/megatron.md``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ..config import AdaGCConfig, ForensicsConfig, ZClipConfig
from ..forensics import Event
from . import adagc as _adagc
from . import zclip as _zclip
from .flags import (
    adagc_config_from_args,
    adagc_enabled,
    adagc_flag_name,
    add_arguments,
    clipping_config,
    clipping_enabled,
    config_from_args,
    enabled,
    flag_name,
    forensics_config,
)
from .hook import LOG_METRICS, attached_optimizer, clipper_of, forensics_of, log_metrics

__all__ = ["add_arguments", "config_from_args", "adagc_config_from_args", "clipping_config", "wrap_optimizer",
           "enabled", "adagc_enabled", "clipping_enabled", "log_metrics", "clipper_of", "attached_optimizer",
           "flag_name", "adagc_flag_name", "forensics_config", "forensics_of", "LOG_METRICS", "ADAGC_LOG_METRICS"]

ADAGC_LOG_METRICS = _adagc.LOG_METRICS


def wrap_optimizer(optimizer: Any, config: ZClipConfig | AdaGCConfig, model: Any = None, *,
                   forensics: ForensicsConfig | Mapping[str, Any] | bool | None = None,
                   on_event: Callable[[Event], None] | None = None) -> Any:
    """Attach ZClip or AdaGC to what ``get_megatron_optimizer`` returned; returns the same object.

    ZClip works for ``ChainedOptimizer`` (dense + expert sub-optimizers), ``DistributedOptimizer``,
    ``Float16OptimizerWithFloat16Params`` and ``FP32Optimizer``; AdaGC for the same without expert
    sub-optimizers. After this, ``optimizer.step()`` is still the release's own; the method takes
    Megatron's global norm as that step reads it, makes it identical on every rank, updates the
    statistics exactly once, replaces the step's clip (ZClip: to its threshold; AdaGC: each tensor by its
    coefficient) and skips the update on a non-finite norm (``update_successful=False``);
    ``state_dict``/``sharded_state_dict``/``load_state_dict`` carry the state. Raises
    :class:`~zclip_dist.megatron.intercept.UnsupportedMegatronCore` outside megatron-core 0.16.1..0.19.2.

    ``model``: the model chunks; AdaGC keys gamma by their parameter names, forensics names parameters by
    them (ZClip needs them for forensics only; without them, names are positions).

    ``forensics``: spike forensics (:class:`~zclip_dist.config.ForensicsConfig`, a mapping, ``True`` /
    ``False``; ``None``: the ``--zclip-forensics*`` / ``--adagc-forensics*`` flags of Megatron-LM's
    arguments, else the defaults: on, replica attribution off). At every clipped, spike or non-finite
    step the top parameters (and, with ``replicas``, DP replicas) by share of the squared norm go to the
    JSON-lines sink (``events``), to ``on_event`` and to Megatron's writers (:func:`log_metrics`).
    ``on_event(event)``: called with each :class:`~zclip_dist.forensics.Event` when this rank reads it
    (ZClip: at the event step, every rank; AdaGC: when the host reads anyway -- a log step, or every
    ``read_every`` steps).
    """
    if isinstance(config, AdaGCConfig):
        return _adagc.attach(optimizer, config, model=model, forensics=forensics, on_event=on_event)
    if not isinstance(config, ZClipConfig):
        raise TypeError(f"wrap_optimizer needs a ZClipConfig or an AdaGCConfig, got {type(config).__name__}")
    return _zclip.attach(optimizer, config, model=model, forensics=forensics, on_event=on_event)
