"""ZClip and AdaGC for DeepSpeed: put a ``"zclip": {...}`` or an ``"adagc": {...}`` entry in the DeepSpeed
config, then use one of

* ``zclip_dist.deepspeed.initialize(...)``: same signature and return value as ``deepspeed.initialize``;
* ``zclip_dist.deepspeed.attach(engine)``: for an engine that is already built;
* ``deepspeed --module zclip_dist.launch train.py ...`` or ``torchrun -m zclip_dist.launch train.py ...``:
  an unchanged script that calls ``deepspeed.initialize`` (see :mod:`zclip_dist.launch`).

Without either entry nothing changes; both at once are refused. Keys are those of
:class:`~zclip_dist.config.ZClipConfig` / :class:`~zclip_dist.config.AdaGCConfig` (``mode``, ``clip_ratio``,
``beta``, ``warmup_steps``, ``max_grad_norm``, ``eps``, ``nonfinite``); ``gradient_clipping`` is ZClip's
cap / AdaGC's lambda_abs when ``max_grad_norm`` is not given. The state travels in
``engine.save_checkpoint`` / ``engine.load_checkpoint`` (AdaGC's keyed by parameter name, so a different
DP size can resume); metrics go to the engine's monitor as ``Train/zclip/<name>`` / ``Train/adagc/<name>``. ``MegatronMPU()`` adapts megatron-core ``parallel_state`` to DeepSpeed's ``mpu``.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import deepspeed

from .integrations.deepspeed import (ADAGC_CONFIG_KEY, CLIENT_STATE_KEY, CONFIG_KEY, DeepSpeedAdaGC, DeepSpeedZClip,
                                     MegatronMPU, UnsupportedConfiguration, attach, resolve_config)

__all__ = ["initialize", "attach", "resolve_config", "DeepSpeedZClip", "DeepSpeedAdaGC", "MegatronMPU",
           "UnsupportedConfiguration", "CONFIG_KEY", "ADAGC_CONFIG_KEY", "CLIENT_STATE_KEY"]


# Captured at import, before zclip_dist.launch (which imports this module first) replaces the public name.
_deepspeed_initialize = deepspeed.initialize


@functools.wraps(_deepspeed_initialize)
def initialize(*args: Any, **kwargs: Any) -> tuple:
    """``deepspeed.initialize`` plus ZClip or AdaGC when the config has a ``"zclip"`` / ``"adagc"`` entry.

    Same signature; returns ``(engine, optimizer, training_dataloader, lr_scheduler)`` exactly as DeepSpeed
    does. The attachment is ``engine._zclip`` (either method). An invalid value, or both entries, raises
    :class:`~zclip_dist.config.ConfigError` naming the key, before the engine is built when the config
    is passed as a dict.
    """
    for key in ("config", "config_params"):  # fail before building an engine when we can read the config
        if isinstance(kwargs.get(key), Mapping):
            resolve_config(kwargs[key])
    result = _deepspeed_initialize(*args, **kwargs)
    attach(result[0])
    return result
