"""ZClip and AdaGC for DeepSpeed: put a ``"zclip": {...}`` or an ``"adagc": {...}`` entry in the DeepSpeed
config. With zclip_dist installed (``pip install``), every ``deepspeed.initialize`` honours it, whoever
calls it: an unchanged script under ``deepspeed`` / ``torchrun`` / ``mpirun`` / plain ``python``, HF
Trainer, Accelerate (``_zclip_dist_autoload``, switched off by ``ZCLIP_DIST_AUTO=0``). Explicitly:

* ``zclip_dist.deepspeed.initialize(...)``: same signature and return value as ``deepspeed.initialize``;
* ``zclip_dist.deepspeed.attach(engine)``: for an engine that is already built;
* ``deepspeed --module zclip_dist.deepspeed.launch train.py ...`` or ``torchrun -m zclip_dist.deepspeed.launch
  train.py ...``: an unchanged script, also with ``ZCLIP_DIST_AUTO=0`` (see :mod:`zclip_dist.deepspeed.launch`).

Without either entry nothing changes; both at once are refused. Keys are those of
:class:`~zclip_dist.config.ZClipConfig` / :class:`~zclip_dist.config.AdaGCConfig` (``mode``, ``clip_ratio``,
``beta``, ``warmup_steps``, ``max_grad_norm``, ``eps``, ``nonfinite``); ``gradient_clipping`` is ZClip's
cap / AdaGC's lambda_abs when ``max_grad_norm`` is not given (see :mod:`~zclip_dist.deepspeed.config`). The
state travels in ``engine.save_checkpoint`` / ``engine.load_checkpoint`` (AdaGC's keyed by parameter name,
so a different DP size can resume); metrics go to the engine's monitor as ``Train/zclip/<name>`` /
``Train/adagc/<name>``. Spike forensics: a ``"forensics"`` key inside the entry (``true``/``false`` or
:class:`~zclip_dist.config.ForensicsConfig` keys; on by default on ZeRO-1/2 fp32/bf16), events to the
JSON-lines file, the monitor (``Train/zclip/event/...``) and ``on_event`` (``initialize(..., on_event=fn)``,
``attach(engine, on_event=fn)``; see :mod:`~zclip_dist.deepspeed.forensics`). ``MegatronMPU()`` adapts
megatron-core ``parallel_state`` to DeepSpeed's ``mpu``.

Modules: ``config`` (the entries), ``groups`` (the engine's process groups), ``attachment`` (what both
methods share: step bracket, checkpoints, metrics, refusals), ``events`` (which steps are written, found
without a device sync), ``zclip`` and ``adagc`` (each method's hooks on every optimizer path),
``zero_layouts`` (ZeRO partition offsets), ``launch`` (the launcher module). Only this package touches
DeepSpeed's private names; how each path works is in ``docs/internals/deepspeed.md``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ..config import AdaGCConfig, ConfigError, ForensicsConfig, ZClipConfig
from ..forensics import Event
from .adagc import DeepSpeedAdaGC
from .attachment import record_loads
from .config import (
    ADAGC_CONFIG_KEY,
    CLIENT_STATE_KEY,
    CONFIG_KEY,
    UnsupportedConfiguration,
    resolve_config,
    resolve_forensics,
)
from .groups import MegatronMPU
from .zclip import DeepSpeedZClip

__all__ = ["initialize", "attach", "resolve_config", "resolve_forensics", "DeepSpeedZClip", "DeepSpeedAdaGC",
           "MegatronMPU", "UnsupportedConfiguration", "CONFIG_KEY", "ADAGC_CONFIG_KEY", "CLIENT_STATE_KEY"]


def _deepspeed_initialize() -> Any:
    """DeepSpeed's own ``initialize``, also once ``_zclip_dist_autoload`` (or the launch module) has replaced
    the public name. Imported here, not at module level: ``zclip_dist.deepspeed.config`` (read by ``zclip-dist
    replay --ds-config``) must import without DeepSpeed installed."""
    import deepspeed

    return getattr(deepspeed, "_zclip_dist_original_initialize", deepspeed.initialize)


def initialize(*args: Any, on_event: Callable[[Event], None] | None = None, **kwargs: Any) -> tuple:
    """``deepspeed.initialize`` plus ZClip or AdaGC when the config has a ``"zclip"`` / ``"adagc"`` entry.

    Same signature, plus ``on_event``: called with each spike-forensics
    :class:`~zclip_dist.forensics.Event` once it is read on this rank (see :func:`attach`). Returns
    ``(engine, optimizer, training_dataloader, lr_scheduler)`` exactly as DeepSpeed does. The attachment
    is ``engine._zclip`` (either method). An invalid value, or both entries, raises
    :class:`~zclip_dist.config.ConfigError` naming the key, before the engine is built when the config
    is passed as a dict.
    """
    for key in ("config", "config_params"):  # fail before building an engine when we can read the config
        if isinstance(kwargs.get(key), Mapping):
            resolve_config(kwargs[key])
    result = _deepspeed_initialize()(*args, **kwargs)
    engine = result[0]
    record_loads(engine)  # a later attach() restores what load_checkpoint brings
    attach(engine, on_event=on_event)
    return result


def attach(engine: Any, config: ZClipConfig | AdaGCConfig | Mapping[str, Any] | None = None, *,
           client_state: Mapping[str, Any] | None = None,
           forensics: ForensicsConfig | Mapping[str, Any] | bool | None = None,
           on_event: Callable[[Event], None] | None = None) -> DeepSpeedZClip | DeepSpeedAdaGC | None:
    """Attach ZClip or AdaGC to a built engine; ``None`` (nothing changed) when the config has neither a
    ``"zclip"`` nor an ``"adagc"`` entry.

    ``config``: a :class:`ZClipConfig` or :class:`AdaGCConfig`, a mapping of ZClip settings, or ``None``
    to read the engine's DeepSpeed config. The attachment is ``engine._zclip`` for either method;
    attaching again returns it (with other settings: an error).

    Any order with ``engine.load_checkpoint``: attached before, the load restores the state. Attached
    after, the state comes from ``client_state`` (what ``load_checkpoint`` returned) if given, else from
    the load zclip_dist saw (engines built through ``deepspeed.initialize`` with zclip_dist installed);
    an engine that loaded a checkpoint zclip_dist did not see is refused rather than started from warmup.

    Spike forensics (ZeRO-1/2 in fp32 or bf16): ``forensics`` (a :class:`ForensicsConfig`, a mapping of
    its keys, ``True`` or ``False``) overrides the entry's ``"forensics"`` key; without either it is on
    with the defaults (replica attribution off). ``on_event(event)`` runs on every rank for each event
    once it is read there: at the event step for ZClip and for non-finite steps; AdaGC's clipped steps on
    rank 0 when its metrics are written, elsewhere every ``read_every`` steps and at ``engine._zclip.events()``.
    """
    params = engine._config._param_dict
    if config is None:
        config = resolve_config(params)
    elif isinstance(config, Mapping):
        others = {k: v for k, v in params.items() if k != ADAGC_CONFIG_KEY}
        params = {**others, CONFIG_KEY: dict(config)}
        config = resolve_config(params)
    existing = getattr(engine, "_zclip", None)
    if existing is not None:
        if config is not None and config != existing.config:
            raise ConfigError(f"zclip_dist: this engine already has {type(existing.config).__name__}"
                              f"({existing.config}) attached; attach() with other settings ({config}) is refused")
        return existing
    if config is None:
        return None
    loaded = _loaded_state(engine, client_state)
    key = ADAGC_CONFIG_KEY if isinstance(config, AdaGCConfig) else CONFIG_KEY
    fx_config, explicit = resolve_forensics(params, key)
    if forensics is not None:
        fx_config = ForensicsConfig.coerce(forensics)
        explicit = fx_config.enabled
    cls = DeepSpeedAdaGC if isinstance(config, AdaGCConfig) else DeepSpeedZClip
    hook = cls(engine, config, fx_config, forensics_explicit=explicit, on_event=on_event)
    engine._zclip = hook
    if loaded is not None:
        hook.restore(*loaded)
    return hook


def _loaded_state(engine: Any, client_state: Mapping[str, Any] | None) -> tuple[Any, Any] | None:
    """``(path, state)`` to restore at attach, ``None`` for a fresh start."""
    if client_state is not None:
        return "passed as client_state", client_state.get(CLIENT_STATE_KEY)
    recorded = getattr(engine, "_zclip_dist_loaded", None)
    if recorded is not None:
        return recorded
    if getattr(engine, "loaded_checkpoint_dp_world_size", None) is not None:
        raise UnsupportedConfiguration(
            "zclip_dist: attach() after engine.load_checkpoint() on an engine zclip_dist did not build: the "
            "checkpoint's ZClip/AdaGC state would be lost (the statistics would restart from warmup). Attach "
            "before load_checkpoint, or pass what it returned: attach(engine, client_state=client_state)")
    return None
