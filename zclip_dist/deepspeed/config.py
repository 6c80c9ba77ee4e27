"""The DeepSpeed config entries: ``"zclip"`` (:class:`~zclip_dist.config.ZClipConfig` keys) or ``"adagc"``
(:class:`~zclip_dist.config.AdaGCConfig` keys), read from the same JSON/dict DeepSpeed reads.

* ``gradient_clipping`` is ZClip's cap / AdaGC's lambda_abs unless the entry sets ``max_grad_norm``;
  ``gradient_clipping: 0`` keeps DeepSpeed's meaning, no fixed clip (no cap); without ``gradient_clipping``
  the methods' own default (1.0) applies.
* ``max_grad_norm``: a number, or ``null`` / ``"none"`` for no cap.
* ``"enabled": false`` turns an entry off (DeepSpeed's own convention); the rest of it is still validated.
* ``"forensics"`` inside the entry: spike forensics (:class:`~zclip_dist.config.ForensicsConfig` keys,
  or ``true`` / ``false``); on by default where supported, replica attribution off
  (:func:`resolve_forensics`).
* Both entries at once are refused. DeepSpeed ignores unknown top-level keys, so a key that is almost ours
  (``"zclp"``, ``"ZClip"``), our entry inside another section (``zero_optimization.zclip``) or
  ``"forensics"`` outside the entry would do nothing: all warn.

Importable without DeepSpeed (``zclip-dist replay --ds-config`` reads it).
"""

from __future__ import annotations

import difflib
import math
import warnings
from typing import Any, Mapping

from ..config import AdaGCConfig, ConfigError, ForensicsConfig, ZClipConfig

__all__ = ["CONFIG_KEY", "ADAGC_CONFIG_KEY", "CLIENT_STATE_KEY", "METRIC_PREFIX", "ADAGC_METRIC_PREFIX",
           "FORENSICS_KEY", "UnsupportedConfiguration", "resolve_config", "resolve_forensics"]

CONFIG_KEY = "zclip"
ADAGC_CONFIG_KEY = "adagc"
CLIENT_STATE_KEY = "zclip_dist"  # ZClip's or AdaGC's state; each carries its own format tag
METRIC_PREFIX = "Train/zclip/"
ADAGC_METRIC_PREFIX = "Train/adagc/"
FORENSICS_KEY = "forensics"  # inside the "zclip" / "adagc" entry
_METHODS = {CONFIG_KEY: ZClipConfig, ADAGC_CONFIG_KEY: AdaGCConfig}
_METHOD_NAMES = {CONFIG_KEY: "ZClip", ADAGC_CONFIG_KEY: "AdaGC"}
_NO_CAP = ("none", "null")


class UnsupportedConfiguration(ValueError):
    """ZClip cannot be applied correctly to this DeepSpeed configuration; the message says why."""


def _warn_near_misses(param_dict: Mapping[str, Any]) -> None:
    """Keys DeepSpeed would silently ignore although they were meant for us."""
    for key, value in param_dict.items():
        if not isinstance(key, str) or key in _METHODS:
            continue
        close = difflib.get_close_matches(key.lower(), _METHODS, n=1, cutoff=0.8)
        if close:
            warnings.warn(f"zclip_dist: the DeepSpeed config key {key!r} is not {close[0]!r}: DeepSpeed ignores it, so "
                          f"it clips nothing; rename it to {close[0]!r}", stacklevel=3)
        if _is_forensics(key):
            warnings.warn(f"zclip_dist: the DeepSpeed config key {key!r} is not read: spike forensics settings "
                          f"belong inside the clipping entry, as \"zclip\": {{..., \"{FORENSICS_KEY}\": {{...}}}}",
                          stacklevel=3)
        if isinstance(value, Mapping):
            for inner in value:
                if isinstance(inner, str) and difflib.get_close_matches(inner.lower(), _METHODS, n=1, cutoff=0.8):
                    warnings.warn(f"zclip_dist: {key}.{inner} is not read: the clipping entry belongs at the top level "
                                  "of the DeepSpeed config", stacklevel=3)
                elif _is_forensics(inner):
                    warnings.warn(f"zclip_dist: {key}.{inner} is not read: spike forensics settings belong inside the "
                                  "\"zclip\" / \"adagc\" entry", stacklevel=3)


def _is_forensics(key: Any) -> bool:
    """``"forensics"`` or a near miss (``"forensic"``, ``"Forensics"``)."""
    return isinstance(key, str) and bool(difflib.get_close_matches(key.lower(), [FORENSICS_KEY], n=1, cutoff=0.8))


def _entry(param_dict: Mapping[str, Any], key: str) -> tuple[dict[str, Any], bool] | None:
    """The ``key`` entry (without ``"enabled"``) and whether it is enabled; ``None`` when absent."""
    entry = param_dict.get(key)
    if entry is None:
        return None
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{key} = {entry!r} is invalid: allowed an object of {_METHOD_NAMES[key]} settings")
    entry = dict(entry)
    for inner in entry:
        if inner != FORENSICS_KEY and _is_forensics(inner):
            raise ConfigError(f"{key}.{inner} is not a {_METHOD_NAMES[key]} setting: spike forensics settings go "
                              f"under {key}.{FORENSICS_KEY!r}")
    entry.pop(FORENSICS_KEY, None)  # read by resolve_forensics
    enabled = entry.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{key}.enabled = {enabled!r} is invalid: allowed true or false")
    if "max_grad_norm" in entry:
        entry["max_grad_norm"] = _max_grad_norm(key, entry["max_grad_norm"])
    return entry, enabled


def _max_grad_norm(key: str, value: Any) -> float | None:
    """``null`` or ``"none"`` (any case): no cap. Anything but a positive finite number or those is refused
    here, so the message names every accepted spelling."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _NO_CAP):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return value
    raise ConfigError(f"{key}.max_grad_norm = {value!r} is invalid: allowed a number in (0, inf), or null / "
                      "\"none\" (no cap)")


def _engine_clip(param_dict: Mapping[str, Any]) -> dict[str, float | None]:
    """``gradient_clipping`` as the ``max_grad_norm`` default: a positive number is the cap, 0 is
    DeepSpeed's "no fixed clip" and so no cap; absent (or a placeholder such as HF's "auto" that its
    caller did not fill in) leaves the method's default."""
    clip = param_dict.get("gradient_clipping")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)):
        return {}
    return {"max_grad_norm": float(clip) if clip > 0 else None}


def resolve_config(param_dict: Mapping[str, Any]) -> ZClipConfig | AdaGCConfig | None:
    """The clipping entry of a DeepSpeed config dict: a :class:`ZClipConfig` for ``"zclip"``, an
    :class:`AdaGCConfig` for ``"adagc"``, or ``None`` if neither is present and enabled.

    Every entry present is validated, a disabled one too; invalid values raise
    :class:`~zclip_dist.config.ConfigError` naming the key. See the module docstring for the rules.
    """
    _warn_near_misses(param_dict)
    for key in _METHODS:
        if isinstance(param_dict.get(key), Mapping):
            resolve_forensics(param_dict, key)  # validated with its entry, before training
    found = {key: _entry(param_dict, key) for key in _METHODS}
    configs = {key: _METHODS[key].from_dict(entry, source=key, **_engine_clip(param_dict))
               for key, (entry, _) in ((k, v) for k, v in found.items() if v is not None)}
    enabled = [key for key, v in found.items() if v is not None and v[1]]
    if len(enabled) > 1:
        raise ConfigError(f"the DeepSpeed config has both a {CONFIG_KEY!r} and an {ADAGC_CONFIG_KEY!r} entry: "
                          "they are two clipping methods for the same gradients; keep one (or set "
                          '"enabled": false in the other)')
    return configs[enabled[0]] if enabled else None


def resolve_forensics(param_dict: Mapping[str, Any], key: str) -> tuple[ForensicsConfig, bool]:
    """The ``"forensics"`` value inside the ``key`` entry as a :class:`ForensicsConfig` (``true``, absent or
    ``null``: the defaults; ``false``: off; a mapping of its keys), and whether the user asked for it
    explicitly (present and enabled): an explicit request on a path forensics does not cover is refused
    at attach, the default is then off (one warning in DeepSpeed's log)."""
    entry = param_dict.get(key)
    value = entry.get(FORENSICS_KEY) if isinstance(entry, Mapping) else None
    config = ForensicsConfig.coerce(value, source=f"{key}.{FORENSICS_KEY}")
    return config, value is not None and config.enabled
