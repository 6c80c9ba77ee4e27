"""Settings for ZClip and AdaGC: the one place defaults and allowed values live.

Every front end builds these dataclasses: ``ZClip(alpha=...)`` in Python, the ``"zclip"`` entry of a
DeepSpeed JSON config (:meth:`ZClipConfig.from_dict`) and Megatron's ``--zclip-*`` flags. Validation
happens here, at construction, so a bad value fails before the first training step with a message that
names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

__all__ = ["ZClipConfig", "AdaGCConfig", "ForensicsConfig", "ConfigError", "NONFINITE_POLICIES", "attribute_docs"]

MODES = ("zscore", "percentile")
CLIP_OPTIONS = ("adaptive_scaling", "mean")
NONFINITE_POLICIES = ("skip", "raise", "propagate")
ADAGC_MODES = ("adagc", "adagc-global")
EVENT_KINDS = ("clipped", "spike", "nonfinite")


class ConfigError(ValueError):
    """A setting is invalid. The message names the key, the bad value and what is allowed."""


def _fail(source: str, key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{source}.{key} = {value!r} is invalid: allowed {allowed}")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_real(source: str, key: str, value: Any, *, low: float, high: float = math.inf,
               low_open: bool = False, high_open: bool = False) -> None:
    """Fail unless ``value`` is a finite real number in the given interval."""
    lo_s, hi_s = ("(" if low_open else "["), (")" if high_open or math.isinf(high) else "]")
    allowed = f"a number in {lo_s}{low:g}, {high:g}{hi_s}"
    # inf passes every range test below but is no setting: eps=inf silences every spike, max_grad_norm=inf
    # hides the documented null (no cap), clip_ratio=inf turns AdaGC off.
    if not _is_real(value) or not math.isfinite(value):
        _fail(source, key, value, allowed)
    if value < low or (low_open and value == low) or value > high or (high_open and value == high):
        _fail(source, key, value, allowed)


def check_int(source: str, key: str, value: Any, *, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        _fail(source, key, value, f"an integer >= {low}")


def check_choice(source: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(source, key, value, "one of " + ", ".join(repr(c) for c in choices))


def check_logging(source: str, path: Any, interval: Any) -> None:
    if path is not None and (not isinstance(path, str) or not path):
        _fail(source, "log_jsonl", path, "a file path (string) or null")
    check_int(source, "log_interval", interval, low=1)


def check_bool(source: str, key: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(source, key, value, "true or false")


class _FromDict:
    """``from_dict`` / ``to_dict`` shared by the config dataclasses."""

    _source = "config"

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any] | None, *, source: str | None = None, **defaults: Any):
        """Build from a JSON-style mapping, rejecting unknown keys by name.

        ``defaults`` fill keys the mapping does not set (used for engine-provided caps such as DeepSpeed's
        ``gradient_clipping``); keys in ``entry`` always win.
        """
        source = source or cls._source
        entry = dict(entry or {})
        entry.pop("enabled", None)  # DeepSpeed convention: a section may carry "enabled"
        names = {f.name for f in fields(cls)}
        known = {n for n in names if not n.startswith("_")}  # "_source" is ours to set, not a setting
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(map(repr, unknown))}: allowed keys are "
                + ", ".join(sorted(known)))
        merged = {k: v for k, v in defaults.items() if k in known}
        merged.update(entry)
        return cls(**merged, _source=source) if "_source" in names else cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, kw_only=True)
class ZClipConfig(_FromDict):
    """ZClip settings. Defaults equal the reference ``zclip`` 1.0.0 package.

    Attributes:
        alpha: EMA decay of the mean and variance of the gradient norm, in (0, 1).
        z_thresh: z-score above which a step is a spike; the k of ``mean + k*std`` in percentile mode.
        max_grad_norm: absolute cap on the norm, applied in warmup and after it; ``None`` disables it.
            When ``None`` is not given explicitly and an engine has a fixed clip (DeepSpeed
            ``gradient_clipping``, Megatron ``--clip-grad``), the engine's value is the cap.
        eps: added to the standard deviation in the z-score.
        warmup_steps: number of (finite) norms collected before the statistics exist.
        mode: ``"zscore"`` or ``"percentile"`` (the latter clips to ``mean + z_thresh*std``); any case,
            as the reference lower-cases it.
        clip_option: ``"adaptive_scaling"`` (reciprocal rule) or ``"mean"``; zscore mode only.
        clip_factor: multiplies the adaptive threshold (all of it, as the reference does).
        skip_update_on_spike: leave the statistics untouched on a spike step.
        nonfinite: what a NaN/Inf global norm does. The statistics never see it under any policy.
            ``"skip"``: the step is skipped on every rank, parameters and optimizer state untouched
            (engines: their own overflow/skip path; the PyTorch drop-in: the ``optimizer=`` it was given,
            without which it can only zero the gradients, and warns).
            ``"raise"``: raise ``FloatingPointError`` on every rank (the drop-in then reads the
            norm on the host every step). ``"propagate"``: leave the gradients to the engine's own checks.
        recovery_steps: opt-in regime-shift recovery (``None``: the reference's behaviour). After this
            many consecutive spike steps the norm level is taken to have moved for good (a data-mixture
            change, the end of LR warmup, unfreezing layers): further consecutive spikes are not clipped
            adaptively and their raw norm feeds the EMA, which catches up within a few steps. Isolated
            spikes (shorter runs) are clipped exactly as before. The reference instead locks in: sigma
            decays to 0 and every later step is clipped (docs/internals/algorithms.md).
        verify_every: every N steps, all ranks compare a fingerprint of their state and raise naming any
            rank that differs (one small all-gather and one host read per check); 0 disables.
        log_jsonl: append the metrics to this JSON-lines file (rank 0 only), in addition to the engine's
            loggers; ``None`` disables.
        log_interval: write every N steps (one host transfer of the metrics on those steps, on rank 0).
    """

    alpha: float = 0.97
    z_thresh: float = 2.5
    max_grad_norm: float | None = 1.0
    eps: float = 1e-6
    warmup_steps: int = 25
    mode: str = "zscore"
    clip_option: str = "adaptive_scaling"
    clip_factor: float = 1.0
    skip_update_on_spike: bool = False
    nonfinite: str = "skip"
    recovery_steps: int | None = None
    verify_every: int = 0
    log_jsonl: str | None = None
    log_interval: int = 1
    _source: str = dataclasses.field(default="zclip", repr=False, compare=False)

    def __post_init__(self) -> None:
        src = self._source
        check_real(src, "alpha", self.alpha, low=0.0, high=1.0, low_open=True, high_open=True)
        check_real(src, "z_thresh", self.z_thresh, low=0.0, low_open=True)
        if self.max_grad_norm is not None:
            check_real(src, "max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        check_real(src, "eps", self.eps, low=0.0)
        check_int(src, "warmup_steps", self.warmup_steps, low=1)
        # The reference lower-cases mode (not clip_option): "ZSCORE" means "zscore" there and here.
        if isinstance(self.mode, str):
            object.__setattr__(self, "mode", self.mode.lower())
        check_choice(src, "mode", self.mode, MODES)
        check_choice(src, "clip_option", self.clip_option, CLIP_OPTIONS)
        check_real(src, "clip_factor", self.clip_factor, low=0.0, low_open=True)
        check_bool(src, "skip_update_on_spike", self.skip_update_on_spike)
        check_choice(src, "nonfinite", self.nonfinite, NONFINITE_POLICIES)
        if self.recovery_steps is not None:
            check_int(src, "recovery_steps", self.recovery_steps, low=1)
        check_int(src, "verify_every", self.verify_every, low=0)
        check_logging(src, self.log_jsonl, self.log_interval)


@dataclass(frozen=True, kw_only=True)
class AdaGCConfig(_FromDict):
    """AdaGC settings. Defaults are the official Megatron patch's (lishuai-97/AdaGC).

    Attributes:
        mode: ``"adagc"`` (one threshold per parameter tensor, of the *whole* tensor however it is
            sharded) or ``"adagc-global"`` (the same rule on the global norm).
        clip_ratio: lambda_rel: a tensor is clipped when its norm exceeds ``clip_ratio * gamma``.
        beta: EMA decay of gamma, the clipped per-tensor norm.
        warmup_steps: T_start: global clipping at ``max_grad_norm`` while gamma is initialised to the
            running minimum of the (globally clipped) per-tensor norms.
        max_grad_norm: lambda_abs, the warmup's global clip. Engines pass their fixed clip
            (``gradient_clipping`` / ``--clip-grad``) when this is not given; otherwise 1.0. ``None``:
            no clip in warmup (gamma starts from the running minimum of the raw norms).
        eps: added to norms in denominators.
        nonfinite: as for :class:`ZClipConfig`; a non-finite step never enters gamma.
        recovery_steps: opt-in (``None``: the official behaviour). A tensor over its limit on more than
            this many consecutive steps has its gamma reset to its current norm (the first ones are
            clipped, as in ZClip): a permanent rise is accepted at
            once instead of over thousands of steps (gamma can grow by at most ``beta + (1-beta)*clip_ratio``
            per step, 5,758 steps for a 10x rise at the defaults). Isolated spikes are still clipped.
        log_jsonl, log_interval: as for :class:`ZClipConfig`.
    """

    mode: str = "adagc"
    clip_ratio: float = 1.04
    beta: float = 0.99
    warmup_steps: int = 100
    max_grad_norm: float | None = 1.0
    eps: float = 1e-6
    nonfinite: str = "skip"
    recovery_steps: int | None = None
    log_jsonl: str | None = None
    log_interval: int = 1
    _source: str = dataclasses.field(default="adagc", repr=False, compare=False)

    def __post_init__(self) -> None:
        src = self._source
        check_choice(src, "mode", self.mode, ADAGC_MODES)
        check_real(src, "clip_ratio", self.clip_ratio, low=1.0)
        check_real(src, "beta", self.beta, low=0.0, high=1.0, high_open=True)
        check_int(src, "warmup_steps", self.warmup_steps, low=0)
        if self.max_grad_norm is not None:
            check_real(src, "max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        check_real(src, "eps", self.eps, low=0.0)
        check_choice(src, "nonfinite", self.nonfinite, NONFINITE_POLICIES)
        if self.recovery_steps is not None:
            check_int(src, "recovery_steps", self.recovery_steps, low=1)
        check_logging(src, self.log_jsonl, self.log_interval)


@dataclass(frozen=True, kw_only=True)
class ForensicsConfig(_FromDict):
    """Spike forensics: at each event step, which parameters and which data-parallel replicas carried
    the squared gradient norm (:mod:`zclip_dist.forensics`). Every rank must use the same settings.

    Attributes:
        top_k: parameters named per event, by share of the squared global norm; 0 turns forensics off.
        replicas: also name the data-parallel replicas, by share of the sum of their squared gradient
            norms before the data-parallel reduction (a DDP comm hook or an FSDP2 reduce-scatter
            wrapper measures them: one extra read of each gradient, during backward). Off by default:
            measured at 1-2% of a small CPU training step (bench/forensics.py), above the 1% allowed
            for a default.
        top_replicas: replicas named per event.
        events: which steps are events: any of "clipped", "spike", "nonfinite" (AdaGC: a tensor clipped).
        capacity: events held on the device between two reads; older ones are dropped and counted.
        read_every: also read the events every N steps on every rank (one host transfer on those
            steps) and hand them to ``on_event``; 0: only at JSON-lines log steps and ``events()`` calls.
    """

    top_k: int = 3
    replicas: bool = False
    top_replicas: int = 2
    events: tuple[str, ...] = EVENT_KINDS
    capacity: int = 64
    read_every: int = 0
    _source: str = dataclasses.field(default="forensics", repr=False, compare=False)

    def __post_init__(self) -> None:
        src = self._source
        check_int(src, "top_k", self.top_k, low=0)
        check_bool(src, "replicas", self.replicas)
        check_int(src, "top_replicas", self.top_replicas, low=1)
        kinds = self.events
        if (isinstance(kinds, str) or not isinstance(kinds, (tuple, list)) or not kinds
                or any(k not in EVENT_KINDS for k in kinds)):
            _fail(src, "events", kinds, "a non-empty list of " + ", ".join(repr(k) for k in EVENT_KINDS))
        object.__setattr__(self, "events", tuple(kinds))  # a JSON list becomes a hashable tuple
        check_int(src, "capacity", self.capacity, low=1)
        check_int(src, "read_every", self.read_every, low=0)

    @property
    def enabled(self) -> bool:
        return self.top_k > 0

    @classmethod
    def coerce(cls, value: "ForensicsConfig | Mapping[str, Any] | bool | None", *,
               source: str = "forensics") -> "ForensicsConfig":
        """``True``/``None``: the defaults; ``False``: off; a mapping: :meth:`from_dict`, where
        ``"enabled": false`` turns forensics off; a ready config passes through."""
        if isinstance(value, cls):
            return value
        if value is None or value is True:
            return cls(_source=source)
        if value is False:
            return cls(top_k=0, _source=source)
        if isinstance(value, Mapping):
            entry = dict(value)
            enabled = entry.get("enabled", True)
            check_bool(source, "enabled", enabled)
            return cls.from_dict(entry, source=source) if enabled else cls(top_k=0, _source=source)
        raise ConfigError(f"{source} = {value!r} is invalid: allowed true, false or a mapping of forensics settings")


def attribute_docs(cls: type) -> dict[str, str]:
    """Field -> its text in ``cls``'s "Attributes:" docstring section: help texts for every front end."""
    out: dict[str, str] = {}
    name = None
    for line in (cls.__doc__ or "").splitlines():
        m = re.match(r"^\s{8}(\w+): (.*)$", line)
        if m:
            name, out[m.group(1)] = m.group(1), m.group(2)
        elif name and line.startswith(" " * 12):
            out[name] += " " + line.strip()
        else:
            name = None
    return {k: v.replace('``"', '"').replace('"``', '"').replace("``", "'") for k, v in out.items()}
