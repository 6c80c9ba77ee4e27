"""The DeepSpeed config entries: ``"zclip"`` (:class:`~zclip_dist.config.ZClipConfig` keys) or ``"adagc"``
(:class:`~zclip_dist.config.AdaGCConfig` keys), read from the same JSON/dict DeepSpeed reads.

``gradient_clipping`` is ZClip's cap / AdaGC's lambda_abs unless the entry sets ``max_grad_norm``; both
entries at once are refused; ``"enabled": false`` turns an entry off (DeepSpeed's own convention).
"""

from __future__ import annotations

from typing import Any, Mapping

from ..config import AdaGCConfig, ConfigError, ZClipConfig

__all__ = ["CONFIG_KEY", "ADAGC_CONFIG_KEY", "CLIENT_STATE_KEY", "METRIC_PREFIX", "ADAGC_METRIC_PREFIX",
           "UnsupportedConfiguration", "resolve_config"]

CONFIG_KEY = "zclip"
ADAGC_CONFIG_KEY = "adagc"
CLIENT_STATE_KEY = "zclip_dist"  # ZClip's or AdaGC's state; each carries its own format tag
METRIC_PREFIX = "Train/zclip/"
ADAGC_METRIC_PREFIX = "Train/adagc/"
_METHOD_NAMES = {CONFIG_KEY: "ZClip", ADAGC_CONFIG_KEY: "AdaGC"}


class UnsupportedConfiguration(ValueError):
    """ZClip cannot be applied correctly to this DeepSpeed configuration; the message says why."""


def _entry(param_dict: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    """The enabled ``key`` entry of a DeepSpeed config dict, or ``None`` (absent or ``"enabled": false``)."""
    entry = param_dict.get(key)
    if entry is None:
        return None
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{key} = {entry!r} is invalid: allowed an object of {_METHOD_NAMES[key]} settings")
    enabled = entry.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{key}.enabled = {enabled!r} is invalid: allowed true or false")
    return entry if enabled else None


def _engine_clip(param_dict: Mapping[str, Any]) -> dict[str, float]:
    """``gradient_clipping`` as the ``max_grad_norm`` default when it is a positive number."""
    engine_clip = param_dict.get("gradient_clipping", 0.0)
    if isinstance(engine_clip, (int, float)) and not isinstance(engine_clip, bool) and engine_clip > 0:
        return {"max_grad_norm": float(engine_clip)}
    return {}


def resolve_config(param_dict: Mapping[str, Any]) -> ZClipConfig | AdaGCConfig | None:
    """The clipping entry of a DeepSpeed config dict: a :class:`ZClipConfig` for ``"zclip"``, an
    :class:`AdaGCConfig` for ``"adagc"``, or ``None`` if neither is present (or enabled).

    ``gradient_clipping`` (when > 0) is ``max_grad_norm`` unless the entry sets it: ZClip's cap, AdaGC's
    lambda_abs (the warmup's global clip); with no engine clip the methods' default (1.0) applies.
    ``"enabled": false`` turns an entry off. Both entries enabled at once is an error.
    """
    zclip, adagc = _entry(param_dict, CONFIG_KEY), _entry(param_dict, ADAGC_CONFIG_KEY)
    if zclip is not None and adagc is not None:
        raise ConfigError(f"the DeepSpeed config has both a {CONFIG_KEY!r} and an {ADAGC_CONFIG_KEY!r} entry: "
                          "they are two clipping methods for the same gradients; keep one (or set "
                          '"enabled": false in the other)')
    if adagc is not None:
        return AdaGCConfig.from_dict(adagc, source=ADAGC_CONFIG_KEY, **_engine_clip(param_dict))
    if zclip is not None:
        return ZClipConfig.from_dict(zclip, source=CONFIG_KEY, **_engine_clip(param_dict))
    return None
