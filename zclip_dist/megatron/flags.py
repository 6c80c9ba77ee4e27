"""The ``--zclip*`` / ``--adagc*`` command-line flags and the configs they make. Pure argparse: no
megatron import, so a launcher can add and validate the flags before anything is built."""

from __future__ import annotations

import argparse
import re
import warnings
from dataclasses import fields
from typing import Any, Sequence

from ..config import (
    ADAGC_MODES,
    CLIP_OPTIONS,
    MODES,
    NONFINITE_POLICIES,
    EVENT_KINDS,
    AdaGCConfig,
    ConfigError,
    ForensicsConfig,
    ZClipConfig,
    attribute_docs,
)

__all__ = ["add_arguments", "config_from_args", "adagc_config_from_args", "clipping_config", "forensics_config",
           "enabled", "adagc_enabled", "clipping_enabled", "flag_name", "adagc_flag_name"]

_NONE = "none"

_HELP = {
    "alpha": "EMA decay of the mean and variance of the gradient norm, in (0, 1). Default 0.97.",
    "z_thresh": "z-score above which a step is a spike (also k in percentile mode's mean + k*std). Default 2.5.",
    "max_grad_norm": "Absolute cap on the gradient norm, applied in warmup and after it; 'none' disables it. "
                     "Default: the value of --clip-grad (no cap when --clip-grad is 0).",
    "eps": "Added to the standard deviation in the z-score. Default 1e-6.",
    "warmup_steps": "Number of finite norms collected before the statistics exist. Default 25.",
    "mode": "'zscore' (adaptive threshold from the z-score) or 'percentile' (clip to mean + z_thresh*std).",
    "clip_option": "zscore mode: 'adaptive_scaling' (reciprocal rule, default) or 'mean' (clip to the mean).",
    "clip_factor": "Multiplies the adaptive threshold (all of it, as the reference zclip does). Default 1.0.",
    "skip_update_on_spike": "Leave the statistics untouched on a spike step. Default off.",
    "nonfinite": "NaN/Inf global norm: 'skip' the update on every rank (default), 'raise' on every rank, "
                 "or 'propagate' (Megatron's stock behaviour). The statistics never see it.",
}
_CHOICES = {"mode": MODES, "clip_option": CLIP_OPTIONS, "nonfinite": NONFINITE_POLICIES}

_ADAGC_HELP = {
    "mode": "'adagc' (one threshold per parameter tensor, on the norm of the whole tensor however it is sharded) "
            "or 'adagc-global' (the same rule on the global norm). Default adagc.",
    "max_grad_norm": "lambda_abs: the global clip during warmup; 'none' disables it. Default: the value of "
                     "--clip-grad when > 0, else 1.0.",
    "nonfinite": "NaN/Inf global norm: 'skip' the update on every rank (default), 'raise' on every rank, "
                 "or 'propagate'. Gamma never sees it.",
}
_ADAGC_CHOICES = {"mode": ADAGC_MODES, "nonfinite": NONFINITE_POLICIES}


class _Method:
    """One method's flags: ``--<prefix>`` turns it on, ``--<prefix>-<field>`` sets a config field."""

    def __init__(self, prefix: str, config: type, help_text: dict[str, str], choices: dict[str, tuple],
                 switch_help: str, title: str) -> None:
        self.prefix, self.config, self.help, self.choices = prefix, config, help_text, choices
        self.switch_help, self.title = switch_help, title

    def flag(self, field: str) -> str:
        return f"--{self.prefix}-" + field.replace("_", "-")

    def dest(self, field: str) -> str:
        return f"{self.prefix}_{field}"

    def fields(self) -> list:
        return [f for f in fields(self.config) if not f.name.startswith("_")]

    def add(self, parser: argparse.ArgumentParser) -> None:
        """Every value defaults to ``None`` (= not given), so a default can be told from an explicit setting;
        values are validated when the config is built, before training starts."""
        doc = attribute_docs(self.config)
        group = parser.add_argument_group(title=self.prefix, description=self.title)
        group.add_argument(f"--{self.prefix}", action="store_true", default=False, help=self.switch_help)
        for f in self.fields():
            kwargs: dict[str, Any] = {"default": None, "dest": self.dest(f.name),
                                      "help": self.help.get(f.name) or doc.get(f.name, f"{self.config.__name__}.{f.name}")}
            kind = str(f.type)
            if f.name in self.choices:
                kwargs["choices"] = self.choices[f.name]
            elif "str" in kind:  # a path (log_jsonl): the text as given
                kwargs["type"] = str
                kwargs["metavar"] = "PATH"
            elif "None" in kind:  # optional numbers: 'none' (or 'off') sets None
                kwargs["type"] = _int_or_none if "int" in kind else _float_or_none
            elif "bool" in kind:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif "int" in kind:
                kwargs["type"] = int
            else:
                kwargs["type"] = float
            group.add_argument(self.flag(f.name), **kwargs)

    def given(self, args: argparse.Namespace) -> dict[str, Any]:
        entry = {}
        for f in self.fields():
            value = getattr(args, self.dest(f.name), None)
            if value is not None:
                entry[f.name] = None if value == _NONE else value
        return entry

    def build(self, entry: dict[str, Any], defaults: dict[str, Any], from_clip_grad: bool) -> Any:
        """The config, or a :class:`ConfigError` naming the flag (``--adagc-beta = 1.5 is invalid: ...``)."""
        try:
            return self.config.from_dict(entry, source=f"--{self.prefix}", **defaults)
        except ConfigError as err:
            text = re.sub(rf"--{self.prefix}\.(\w+)", lambda m: self.flag(m.group(1)), str(err))
            flag = self.flag("max_grad_norm")
            if from_clip_grad and flag in text:
                text += f" (taken from --clip-grad; set {flag} to override)"
            raise ConfigError(text) from None


_FORENSICS_HELP = {
    "top_k": "Parameters named per event (clipped, spike or non-finite step), by share of the squared norm. "
             "Default 3.",
    "replicas": "Also name the data-parallel replicas, by their gradients' squared norms before the DP "
                "reduction (measured at each bucket's reduction: one more read of the gradient buffers). "
                "Default off.",
    "top_replicas": "Replicas named per event. Default 2.",
    "events": "Which steps are events: any of clipped, spike, nonfinite. Default all three.",
    "capacity": "Events held between two reads; older ones are dropped and counted. Default 64.",
    "read_every": "Also read the events every N steps on every rank (one host transfer then); 0: only at "
                  "log steps. Default 0.",
}


class _Forensics:
    """``--<method>-forensics`` / ``--no-<method>-forensics`` and ``--<method>-forensics-<field>``."""

    def __init__(self, method: str) -> None:
        self.method, self.prefix = method, f"{method}-forensics"

    def flag(self, field: str) -> str:
        return f"--{self.prefix}-" + field.replace("_", "-")

    def dest(self, field: str) -> str:
        return f"{self.method}_forensics_{field}"

    def add(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(
            title=self.prefix, description=f"Spike forensics for --{self.method} (zclip_dist): at every clipped, "
            "spike or non-finite step, the parameters (and replicas) that carried the gradient norm")
        group.add_argument(f"--{self.prefix}", action=argparse.BooleanOptionalAction, default=None,
                           dest=f"{self.method}_forensics",
                           help="Record spike forensics (default on: ordinary steps cost nothing).")
        for f in fields(ForensicsConfig):
            if f.name.startswith("_"):
                continue
            kwargs: dict[str, Any] = {"default": None, "dest": self.dest(f.name), "help": _FORENSICS_HELP[f.name]}
            if f.name == "replicas":
                kwargs["action"] = argparse.BooleanOptionalAction
            elif f.name == "events":
                kwargs.update(nargs="+", choices=EVENT_KINDS)
            else:
                kwargs["type"] = int
            group.add_argument(self.flag(f.name), **kwargs)

    def build(self, args: argparse.Namespace) -> ForensicsConfig:
        entry = {f.name: getattr(args, self.dest(f.name)) for f in fields(ForensicsConfig)
                 if not f.name.startswith("_") and getattr(args, self.dest(f.name), None) is not None}
        if getattr(args, f"{self.method}_forensics", None) is False:
            return ForensicsConfig(top_k=0)
        try:
            return ForensicsConfig.from_dict(entry, source=f"--{self.prefix}")
        except ConfigError as err:
            raise ConfigError(re.sub(rf"--{self.prefix}\.(\w+)", lambda m: self.flag(m.group(1)), str(err))) from None


_ZCLIP = _Method("zclip", ZClipConfig, _HELP, _CHOICES, title="ZClip adaptive gradient clipping (zclip_dist)",
                 switch_help="Replace the fixed --clip-grad clipping by ZClip (the --clip-grad value becomes its cap).")
_ADAGC = _Method("adagc", AdaGCConfig, _ADAGC_HELP, _ADAGC_CHOICES,
                 title="AdaGC per-tensor adaptive gradient clipping (zclip_dist)",
                 switch_help="Replace the fixed --clip-grad clipping by AdaGC: one threshold per parameter tensor "
                             "(--clip-grad becomes lambda_abs, the warmup's global clip).")


_FORENSICS = {"zclip": _Forensics("zclip"), "adagc": _Forensics("adagc")}


def flag_name(field: str) -> str:
    """``z_thresh`` -> ``--zclip-z-thresh``."""
    return _ZCLIP.flag(field)


def adagc_flag_name(field: str) -> str:
    """``clip_ratio`` -> ``--adagc-clip-ratio``."""
    return _ADAGC.flag(field)


def _float_or_none(text: str) -> float | str:
    if text.strip().lower() in (_NONE, "off"):
        return _NONE
    return float(text)


def _int_or_none(text: str) -> int | str:
    if text.strip().lower() in (_NONE, "off"):
        return _NONE
    return int(text)


def add_arguments(parser: argparse.ArgumentParser, methods: Sequence[str] = ("zclip", "adagc")
                  ) -> argparse.ArgumentParser:
    """Add ``--zclip``, ``--zclip-<field>`` for every ZClipConfig field, ``--adagc`` and ``--adagc-<field>``
    for every AdaGCConfig field (``methods`` picks); usable as ``extra_args_provider``."""
    for method in (_ZCLIP, _ADAGC):
        if method.prefix in methods:
            method.add(parser)
            _FORENSICS[method.prefix].add(parser)
    return parser


def enabled(args: argparse.Namespace) -> bool:
    """``--zclip`` is on."""
    return bool(getattr(args, "zclip", False))


def adagc_enabled(args: argparse.Namespace) -> bool:
    """``--adagc`` is on."""
    return bool(getattr(args, "adagc", False))


def clipping_enabled(args: argparse.Namespace) -> bool:
    """``--zclip`` or ``--adagc`` is on (the hook must be installed)."""
    return enabled(args) or adagc_enabled(args)


def _warn_unused(method: _Method, args: argparse.Namespace, entry: dict[str, Any]) -> None:
    if entry and not getattr(args, method.prefix, False):
        warnings.warn(f"{method.prefix}: " + ", ".join(method.flag(k) for k in entry)
                      + f" given without --{method.prefix}: {method.config.__name__[:-6]} is off", stacklevel=3)


def config_from_args(args: argparse.Namespace) -> ZClipConfig:
    """Build and validate the ZClip config from parsed Megatron arguments.

    Raises :class:`ConfigError` naming the flag (e.g. ``--zclip-alpha = 1.5 is invalid: allowed ...``).
    """
    entry = _ZCLIP.given(args)
    _warn_unused(_ZCLIP, args, entry)
    defaults = {}
    if "max_grad_norm" not in entry:
        clip_grad = getattr(args, "clip_grad", None)
        if clip_grad is not None:
            defaults["max_grad_norm"] = float(clip_grad) if clip_grad > 0 else None
    return _ZCLIP.build(entry, defaults, from_clip_grad="max_grad_norm" in defaults)


def adagc_config_from_args(args: argparse.Namespace) -> AdaGCConfig:
    """Build and validate the AdaGC config; ``--clip-grad`` (when > 0) is lambda_abs unless
    ``--adagc-max-grad-norm`` is given. Raises :class:`ConfigError` naming the flag."""
    entry = _ADAGC.given(args)
    _warn_unused(_ADAGC, args, entry)
    defaults = {}
    clip_grad = getattr(args, "clip_grad", None)
    if "max_grad_norm" not in entry and clip_grad is not None and clip_grad > 0:
        defaults["max_grad_norm"] = float(clip_grad)
    return _ADAGC.build(entry, defaults, from_clip_grad="max_grad_norm" in defaults)


def clipping_config(args: argparse.Namespace) -> ZClipConfig | AdaGCConfig | None:
    """The config of the method the flags turn on, ``None`` if neither; both at once is a :class:`ConfigError`."""
    if enabled(args) and adagc_enabled(args):
        raise ConfigError("--zclip and --adagc are both given: they are two clipping methods for the same "
                          "gradients; keep one")
    if clipping_enabled(args) and getattr(args, "optimizer_cuda_graph", False):
        # The decision is taken on the host from Megatron's host-side norm: nothing a graph replay could redo.
        raise ConfigError(f"--optimizer-cuda-graph cannot be used with --{'adagc' if adagc_enabled(args) else 'zclip'}: "
                          "the clipping decision is taken on the host every step; drop --optimizer-cuda-graph")
    if adagc_enabled(args):
        config = adagc_config_from_args(args)
        forensics_config(args, "adagc")  # validated here too: before anything is built
        return config
    if enabled(args):
        config = config_from_args(args)
        forensics_config(args, "zclip")
        return config
    return None


def forensics_config(args: argparse.Namespace, method: str | None = None) -> ForensicsConfig:
    """The spike-forensics settings of ``--<method>-forensics*`` (``method``: ``"zclip"`` or ``"adagc"``;
    default: the one turned on). On unless ``--no-<method>-forensics``; replica attribution off unless
    ``--<method>-forensics-replicas``. Raises :class:`ConfigError` naming the flag
    (``--zclip-forensics-top-k = -1 is invalid: allowed an integer >= 0``)."""
    if method is None:
        method = "adagc" if adagc_enabled(args) else "zclip"
    if method not in _FORENSICS:
        raise ValueError(f"method = {method!r} is invalid: allowed 'zclip' or 'adagc'")
    return _FORENSICS[method].build(args)
