"""Where ZClip and AdaGC enter megatron-core's own ``step()``: the norm read and the clip call.

The release's ``step()`` runs unchanged, so whatever it does still happens (the found-inf skip,
megatron-core 0.19's separate norm and clip of multi-token-prediction heads, ``grad_norm_skip_threshold``,
the zero count, Muon's parameter gather). For the duration of one ``step()`` only:

* **The norm.** The first read of the main gradient norm -- ``ChainedOptimizer.get_grad_norm()``, the
  value its step clips with; for a bare optimizer, the first ``get_grad_norm_fp32`` call of its
  ``clip_grad_norm`` -- is made identical on every rank and handed to the method, which updates its
  statistics exactly once. Every rank reads it, stub ranks included, so collectives stay aligned.
* **The clip.** ``megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32``, looked up by name
  when step runs, becomes the method's clip for the main parameters (ZClip: the same function with its
  threshold as ``max_norm``; AdaGC: per-tensor coefficients). Calls for a separate gradient-norm group
  (parameters carrying ``grad_norm_group``, e.g. 0.19's MTP heads) go to the stock function untouched.
* ``config.clip_grad == 0`` reads as ``inf``: stock step then reaches the clip, and ``inf`` clips nothing
  the method does not clip.
* A non-finite norm under ``nonfinite="skip"`` makes ``step_with_ready_grads`` return ``False`` without
  updating: step returns ``update_successful=False`` and Megatron-LM counts a skipped iteration.

Both names and the call order are those of megatron-core 0.16.1 to 0.19.2 (:data:`SUPPORTED`); other
releases are refused by name at attach, and a step that clips before reading its norm raises.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import re
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from ..clipper import agree

__all__ = ["SUPPORTED", "UnsupportedMegatronCore", "core_version", "check_core_version", "StepHooks"]

#: megatron-core releases whose step() this module is written against (inclusive).
SUPPORTED = ((0, 16, 1), (0, 19, 2))
#: The megatron-core module whose ``step()`` / ``clip_grad_norm()`` look these names up at call time.
_OPTIMIZER_MODULE = "megatron.core.optimizer.optimizer"
_CLIP, _NORM = "clip_grad_by_total_norm_fp32", "get_grad_norm_fp32"
_GROUP_ATTR = "grad_norm_group"  # megatron-core 0.19 GRAD_NORM_GROUP_ATTR; absent on 0.16.1


class UnsupportedMegatronCore(RuntimeError):
    """The installed megatron-core is outside :data:`SUPPORTED`."""


def _version_text(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def core_version() -> tuple[int, int, int]:
    """The installed megatron-core release as ``(major, minor, patch)``."""
    from megatron.core import package_info

    return tuple(int(re.match(r"\d+", str(getattr(package_info, k))).group())  # type: ignore[return-value]
                 for k in ("MAJOR", "MINOR", "PATCH"))


def check_core_version(version: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
    """Raise :class:`UnsupportedMegatronCore` naming the release when it is outside :data:`SUPPORTED`."""
    version = core_version() if version is None else tuple(version)
    low, high = SUPPORTED
    if not low <= version[:3] <= high:
        raise UnsupportedMegatronCore(
            f"zclip_dist.megatron supports megatron-core {_version_text(low)} to {_version_text(high)} "
            f"(Megatron-LM core_v0.16.1 to core_v0.19.0); found megatron-core {_version_text(version)}. "
            f"Install a supported release: pip install 'megatron-core>={_version_text(low)},<={_version_text(high)}'")
    module = importlib.import_module(_OPTIMIZER_MODULE)
    missing = [name for name in (_CLIP, _NORM) if not callable(getattr(module, name, None))]
    if missing:  # pragma: no cover - a patched or broken install
        raise UnsupportedMegatronCore(f"zclip_dist.megatron: {_OPTIMIZER_MODULE} has no {', '.join(missing)}")
    return version


class _Step:
    """What one ``step()`` call has done so far."""

    __slots__ = ("decided", "skip", "norm_in_fp32")

    def __init__(self, norm_in_fp32: bool) -> None:
        self.decided = False  # the method has seen this step's norm
        self.skip = False  # non-finite norm under nonfinite="skip": no update
        self.norm_in_fp32 = norm_in_fp32  # bare optimizer: the norm is clip_grad_norm's first get_grad_norm_fp32


def _params(parameters: Any) -> list:
    return [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)


def _in_separate_group(parameters: list) -> bool:
    """Megatron 0.19 clips a registered group (MTP heads) with its own norm: not the method's business."""
    return any(getattr(p, _GROUP_ATTR, None) is not None for p in parameters)


def _agreed(optimizer: Any, norm: Any) -> tuple[float, bool]:
    """Megatron's norm as a host float, identical on every rank; and whether it is finite.

    Megatron's reduction gives every rank of its group the same bits; where that group is smaller than
    the world (``optimizer._zclip_group``: non-distributed optimizer with DP > 1, or dense and expert
    groups apart) one scalar all-reduce makes it identical by construction (the only added host read).
    ``nonfinite="raise"`` raises here, on every rank alike.
    """
    norm = float(norm)  # 0.16.1..0.19.2 return a host float already; a tensor costs its one read here
    if optimizer._zclip_group is not None:  # first: a NaN on one replica must stop every rank, not that one
        norm = float(agree(torch.full((), norm, dtype=torch.float64, device=optimizer._zclip_device),
                           optimizer._zclip_group))
    finite = math.isfinite(norm)
    if not finite and optimizer._zclip_config.nonfinite == "raise":
        raise FloatingPointError(
            f"zclip_dist: non-finite gradient norm ({norm}); every rank raises (nonfinite='raise'). "
            "Set --zclip-nonfinite / --adagc-nonfinite skip to skip such steps.")
    return norm, finite


def _decide(optimizer: Any, step: _Step, norm: Any) -> float:
    norm, finite = _agreed(optimizer, norm)
    optimizer._zclip_decide(norm, finite)  # the method's statistics: exactly once per step
    step.decided = True
    step.skip = not finite and optimizer._zclip_config.nonfinite == "skip"
    return norm


def _configs(optimizer: Any) -> list:
    subs = list(getattr(optimizer, "chained_optimizers", None) or [])
    seen: dict[int, Any] = {}
    for obj in [optimizer, *subs]:
        config = getattr(obj, "config", None)
        if config is not None:
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextlib.contextmanager
def _inside_step(optimizer: Any) -> Iterator[_Step]:
    module = importlib.import_module(_OPTIMIZER_MODULE)
    stock_clip: Callable = getattr(module, _CLIP)
    stock_norm: Callable = getattr(module, _NORM)
    step = _Step(norm_in_fp32=not hasattr(optimizer, "chained_optimizers"))

    def clip(parameters, max_norm, total_norm, use_decoupled_grad=False):
        params = _params(parameters)
        if _in_separate_group(params):
            return stock_clip(params, max_norm, total_norm, use_decoupled_grad)
        if not step.decided:
            raise RuntimeError(
                "zclip_dist: megatron-core clipped the gradients before reading their norm; this release's "
                f"step() is not one zclip_dist supports (megatron-core {_version_text(SUPPORTED[0])} to "
                f"{_version_text(SUPPORTED[1])})")
        return optimizer._zclip_clip(params, total_norm, use_decoupled_grad, stock_clip)

    def norm_fp32(*args, **kwargs):
        norm = stock_norm(*args, **kwargs)
        if step.norm_in_fp32 and not step.decided:
            return _decide(optimizer, step, norm)
        return norm

    # clip_grad 0 means "no fixed clip"; stock step then skips the clip call the method needs.
    raised = [(c, c.clip_grad) for c in _configs(optimizer) if not c.clip_grad > 0.0]
    for config, _ in raised:
        config.clip_grad = math.inf
    optimizer._zclip_step = step
    setattr(module, _CLIP, clip)
    setattr(module, _NORM, norm_fp32)
    try:
        yield step
    finally:
        setattr(module, _CLIP, stock_clip)
        setattr(module, _NORM, stock_norm)
        optimizer._zclip_step = None
        for config, value in raised:
            config.clip_grad = value


class StepHooks:
    """Methods copied into the optimizer's one-level subclass (see :func:`zclip_dist.megatron.hook.prepare`).

    The method's own class adds ``_zclip_decide(norm, finite)`` (update the statistics once) and
    ``_zclip_clip(params, total_norm, use_decoupled_grad, stock_clip)`` (clip the main gradients).
    """

    _zclip_base: type
    _zclip_step: _Step | None
    _zclip_group: dist.ProcessGroup | None

    @torch.no_grad()
    def step(self):  # noqa: D401 - Megatron's signature: (update_successful, grad_norm, num_zeros_in_grad)
        """The release's own step, with the method deciding on its norm and doing its clip."""
        with _inside_step(self) as step:
            result = self._zclip_base.step(self)
        fx = getattr(self, "_zclip_forensics", None)
        if fx is not None and not step.decided:  # e.g. an fp16 overflow: this step's replica norms are void
            fx.end_step()
        if not step.decided and result[1] is not None:  # found-inf returns (False, None, None)
            raise RuntimeError("zclip_dist: megatron-core stepped without reading the gradient norm; this release's "
                               "step() is not one zclip_dist supports")
        return result

    def get_grad_norm(self):
        norm = self._zclip_base.get_grad_norm(self)
        step = self._zclip_step
        if step is None or step.decided or step.norm_in_fp32:  # outside step(), or a later read inside it
            return norm
        return _decide(self, step, norm)

    def step_with_ready_grads(self) -> bool:
        step = self._zclip_step
        if step is not None and step.skip:
            return False  # non-finite norm, nonfinite="skip": no update on any rank
        return self._zclip_base.step_with_ready_grads(self)
