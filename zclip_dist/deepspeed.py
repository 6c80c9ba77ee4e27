"""ZClip for DeepSpeed: put a ``"zclip": {...}`` entry in the DeepSpeed config, then use one of

* ``zclip_dist.deepspeed.initialize(...)``: same signature and return value as ``deepspeed.initialize``;
* ``zclip_dist.deepspeed.attach(engine)``: for an engine that is already built;
* ``deepspeed --module zclip_dist.launch train.py ...`` or ``torchrun -m zclip_dist.launch train.py ...``:
  an unchanged script that calls ``deepspeed.initialize`` (see :mod:`zclip_dist.launch`).

Without a ``"zclip"`` entry nothing changes. Keys are those of :class:`~zclip_dist.config.ZClipConfig`;
``gradient_clipping`` is the cap when ``max_grad_norm`` is not given. The ZClip state travels in
``engine.save_checkpoint`` / ``engine.load_checkpoint``; metrics go to the engine's monitor as
``Train/zclip/<name>``. ``MegatronMPU()`` adapts megatron-core ``parallel_state`` to DeepSpeed's ``mpu``.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import deepspeed

from .integrations.deepspeed import (CLIENT_STATE_KEY, CONFIG_KEY, DeepSpeedZClip, MegatronMPU,
                                     UnsupportedConfiguration, attach, resolve_config)

__all__ = ["initialize", "attach", "resolve_config", "DeepSpeedZClip", "MegatronMPU", "UnsupportedConfiguration",
           "CONFIG_KEY", "CLIENT_STATE_KEY"]


# Captured at import, before zclip_dist.launch (which imports this module first) replaces the public name.
_deepspeed_initialize = deepspeed.initialize


@functools.wraps(_deepspeed_initialize)
def initialize(*args: Any, **kwargs: Any) -> tuple:
    """``deepspeed.initialize`` plus ZClip when the config has a ``"zclip"`` entry.

    Same signature; returns ``(engine, optimizer, training_dataloader, lr_scheduler)`` exactly as DeepSpeed
    does. The attachment is ``engine._zclip``. An invalid ``"zclip"`` value raises
    :class:`~zclip_dist.config.ConfigError` naming the key, before any step.
    """
    for key in ("config", "config_params"):  # fail before building an engine when we can read the config
        if isinstance(kwargs.get(key), Mapping):
            resolve_config(kwargs[key])
    result = _deepspeed_initialize(*args, **kwargs)
    attach(result[0])
    return result
