"""ZClip for Megatron: ``--zclip*`` flags, the optimizer hook and metrics, as a public API.

Typical use in a Megatron-LM training script (or through ``python -m zclip_dist.megatron_launch``,
which does this to the stock ``pretrain_gpt.py`` without editing it)::

    from zclip_dist import megatron as zmeg
    pretrain(..., extra_args_provider=zmeg.add_arguments)          # --zclip, --zclip-alpha, ...
    optimizer = get_megatron_optimizer(...)
    if args.zclip:
        optimizer = zmeg.wrap_optimizer(optimizer, zmeg.config_from_args(args))

Flag names are the ``ZClipConfig`` field names with dashes: ``--zclip-alpha``, ``--zclip-z-thresh``,
``--zclip-max-grad-norm``, ... When ``--zclip-max-grad-norm`` is not given, Megatron's ``--clip-grad``
is the cap (``--clip-grad 0`` means no cap), so turning ZClip on keeps the ceiling a run had.
"""

from __future__ import annotations

import argparse
import re
import warnings
from dataclasses import fields
from typing import Any

from .config import CLIP_OPTIONS, MODES, NONFINITE_POLICIES, ConfigError, ZClipConfig, attribute_docs
from .integrations.megatron import LOG_METRICS, attach, attached_optimizer, clipper_of, log_metrics

__all__ = ["add_arguments", "config_from_args", "wrap_optimizer", "enabled", "log_metrics", "clipper_of", "attached_optimizer",
           "flag_name", "LOG_METRICS"]

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


def _doc_help() -> dict[str, str]:
    """Help for fields without an entry above: their text in ``ZClipConfig``'s "Attributes:" docstring."""
    return attribute_docs(ZClipConfig)


def flag_name(field: str) -> str:
    """``z_thresh`` -> ``--zclip-z-thresh``."""
    return "--zclip-" + field.replace("_", "-")


def _fields() -> list[str]:
    return [f.name for f in fields(ZClipConfig) if not f.name.startswith("_")]


def _float_or_none(text: str) -> float | str:
    if text.strip().lower() in (_NONE, "off"):
        return _NONE
    return float(text)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--zclip`` and ``--zclip-<field>`` for every ZClipConfig field; usable as ``extra_args_provider``.

    Every value defaults to ``None`` (= not given), so :func:`config_from_args` can tell a default from
    an explicit setting; values are validated there, before training starts.
    """
    doc = _doc_help()
    group = parser.add_argument_group(title="zclip", description="ZClip adaptive gradient clipping (zclip_dist)")
    group.add_argument("--zclip", action="store_true", default=False,
                       help="Replace the fixed --clip-grad clipping by ZClip (the --clip-grad value becomes its cap).")
    for name in _fields():
        kind = next(f.type for f in fields(ZClipConfig) if f.name == name)
        kwargs: dict[str, Any] = {"default": None, "help": _HELP.get(name) or doc.get(name, f"ZClipConfig.{name}"), "dest": "zclip_" + name}
        if name in _CHOICES:
            kwargs["choices"] = _CHOICES[name]
        elif name == "max_grad_norm":
            kwargs["type"] = _float_or_none
        elif "bool" in str(kind):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "int" in str(kind):
            kwargs["type"] = int
        else:
            kwargs["type"] = float
        group.add_argument(flag_name(name), **kwargs)
    return parser


def enabled(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "zclip", False))


def config_from_args(args: argparse.Namespace) -> ZClipConfig:
    """Build and validate the config from parsed Megatron arguments.

    Raises :class:`ConfigError` naming the flag (e.g. ``--zclip-alpha = 1.5 is invalid: allowed ...``).
    """
    entry = {}
    for name in _fields():
        value = getattr(args, "zclip_" + name, None)
        if value is not None:
            entry[name] = None if value == _NONE else value
    if not enabled(args) and entry:
        warnings.warn("zclip: " + ", ".join(flag_name(k) for k in entry) + " given without --zclip: ZClip is off",
                      stacklevel=2)
    defaults = {}
    if "max_grad_norm" not in entry:
        clip_grad = getattr(args, "clip_grad", None)
        if clip_grad is not None:
            defaults["max_grad_norm"] = float(clip_grad) if clip_grad > 0 else None
    try:
        return ZClipConfig.from_dict(entry, source="--zclip", **defaults)
    except ConfigError as err:
        text = re.sub(r"--zclip\.(\w+)", lambda m: flag_name(m.group(1)), str(err))
        if "max_grad_norm" in defaults and "--zclip-max-grad-norm" in text:
            text += " (taken from --clip-grad; set --zclip-max-grad-norm to override)"
        raise ConfigError(text) from None


def wrap_optimizer(optimizer: Any, config: ZClipConfig) -> Any:
    """Attach ZClip to what ``get_megatron_optimizer`` returned; returns the same object.

    Works for ``ChainedOptimizer`` (dense + expert sub-optimizers), ``DistributedOptimizer``,
    ``Float16OptimizerWithFloat16Params`` and ``FP32Optimizer``. After this, ``optimizer.step()``
    uses Megatron's own global norm, makes it identical on every rank, clips to the ZClip threshold,
    skips the update on a non-finite norm (``update_successful=False``) and updates the statistics
    exactly once; ``state_dict``/``sharded_state_dict``/``load_state_dict`` carry the ZClip state.
    """
    return attach(optimizer, config)
