"""ZClip statistics as pure functions of device tensors.

``zclip_update(config, state, norm) -> (state', decision)`` is the whole algorithm of the reference
``zclip`` 1.0.0 package (``zclip/zclip.py``), rewritten without Python branches on tensor values so it
runs on the gradients' device with no host synchronisation and can be captured in a CUDA graph. Every
branch of the reference becomes a ``torch.where``; the reference's quirks are kept on purpose (see
``docs/internals/algorithms.md``): ``clip_factor`` scales the whole adaptive threshold, the variance
update uses the new mean, the EMA is fed the adaptive threshold before the ``max_grad_norm`` cap, the
scaling epsilon is a fixed 1e-6, and both tests are strict inequalities.

The one deliberate departure: a non-finite norm never touches the statistics (the reference lets NaN
poison the mean and variance for the rest of the run).

State dtype: float64. The reference keeps its statistics in Python floats (IEEE double); float64 tensors
reproduce its arithmetic operation for operation, so decisions near a threshold flip only where the two
disagree in the last bit, and 100k-step runs do not drift. The cost is a dozen scalar fp64 operations per
step. The coefficient handed back to the gradients is cast to their dtype by the caller.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .config import ZClipConfig

__all__ = ["ZClipState", "ZClipDecision", "init_state", "zclip_update", "STATE_DTYPE", "CLIP_EPS"]

STATE_DTYPE = torch.float64
#: The reference divides by ``norm + 1e-6`` whatever ``eps`` is; so do DeepSpeed, Megatron and torch.
CLIP_EPS = 1e-6


class ZClipState(NamedTuple):
    """Replicated ZClip state; every field is a tensor on the training device."""

    count: Tensor  # int64: finite norms seen so far (warmup is over when count >= warmup_steps)
    buffer: Tensor  # float64 [warmup_steps]: norms collected during warmup
    mean: Tensor  # float64: EMA mean (meaningful once warmup is over)
    var: Tensor  # float64: EMA variance
    steps: Tensor  # int64: calls, finite or not
    num_clipped: Tensor  # int64: steps whose gradient was scaled down (finite norms)
    num_spikes: Tensor  # int64: steps the z-test (or percentile test) flagged
    num_nonfinite: Tensor  # int64: steps with a NaN/Inf norm
    streak: Tensor  # int64: consecutive spike steps (finite steps only); drives ``recovery_steps``


class ZClipDecision(NamedTuple):
    """What one step decided; all 0-d tensors on the training device."""

    norm: Tensor  # float64 pre-clip global norm as given (NaN/Inf kept)
    coef: Tensor  # float64 multiplier for every gradient (1 = untouched; 0 on a skipped non-finite step)
    clip_to: Tensor  # float64 the norm the gradient is scaled to; +inf when not clipped
    threshold: Tensor  # float64 largest norm that passes unclipped this step (after the cap)
    mean: Tensor  # float64 statistics *before* this step's update
    std: Tensor
    z: Tensor
    warmup: Tensor  # bool: the statistics did not exist yet at this step
    spike: Tensor  # bool: clipped adaptively this step
    regime_shift: Tensor  # bool: a spike run longer than ``recovery_steps``: accepted as the new level
    clipped: Tensor  # bool: coef < 1 on a finite step
    nonfinite: Tensor  # bool
    skipped: Tensor  # bool: the update should not be applied (non-finite under "skip")


def init_state(config: ZClipConfig, device: torch.device | str | None = None) -> ZClipState:
    def zero(dtype: torch.dtype) -> Tensor:
        return torch.zeros((), dtype=dtype, device=device)

    return ZClipState(
        count=zero(torch.int64),
        buffer=torch.zeros(config.warmup_steps, dtype=STATE_DTYPE, device=device),
        mean=zero(STATE_DTYPE),
        var=zero(STATE_DTYPE),
        steps=zero(torch.int64),
        num_clipped=zero(torch.int64),
        num_spikes=zero(torch.int64),
        num_nonfinite=zero(torch.int64),
        streak=zero(torch.int64),
    )


def zclip_update(config: ZClipConfig, state: ZClipState, norm: Tensor) -> tuple[ZClipState, ZClipDecision]:
    """One optimizer step of ZClip. Pure: returns the new state, never mutates ``state``.

    ``norm`` is the pre-clip global L2 norm (0-d tensor, any float dtype, on the state's device).
    """
    cfg = config
    g_raw = norm.detach().to(STATE_DTYPE)
    finite = torch.isfinite(g_raw)
    g = torch.where(finite, g_raw, torch.zeros_like(g_raw))  # arithmetic-safe stand-in for NaN/Inf
    warm_n = cfg.warmup_steps
    in_warmup = state.count < warm_n

    # Warmup (reference lines 182-201): collect the norm; the call that fills the buffer creates the
    # statistics from it (population variance). Only the adaptive part waits: the cap clips from step 1.
    collect = finite & in_warmup
    slot = torch.arange(warm_n, device=g.device) == state.count
    buffer = torch.where(slot & collect, g, state.buffer)
    count = state.count + finite.to(torch.int64)
    filled = collect & (count == warm_n)
    # torch's sum is not the reference's left-to-right Python sum(); over <= a few hundred norms they
    # differ in the last bits only (rel ~1e-16), far inside the parity tolerance.
    w_mean = buffer.sum() / warm_n
    w_var = ((buffer - w_mean) ** 2).sum() / warm_n

    # After warmup (reference lines 203-211), with the statistics of the previous step.
    mean, var = state.mean, state.var
    std = var.sqrt()
    z = (g - mean) / (std + cfg.eps)
    if cfg.mode == "percentile":
        limit = mean + cfg.z_thresh * std
        spike = g > limit
        adaptive = limit
        pass_limit = limit
    else:
        spike = z > cfg.z_thresh
        if cfg.clip_option == "adaptive_scaling":
            eta = z / cfg.z_thresh
            adaptive = (mean + (cfg.z_thresh * std) / eta) * cfg.clip_factor
        else:
            adaptive = mean
        pass_limit = mean + cfg.z_thresh * (std + cfg.eps)  # z > z_thresh  <=>  g > pass_limit
    spike = spike & finite & ~in_warmup
    streak = torch.where(spike, state.streak + 1, torch.where(finite, torch.zeros_like(state.streak), state.streak))
    if cfg.recovery_steps is not None:
        regime_shift = streak > cfg.recovery_steps
        spike = spike & ~regime_shift  # the new level: not clipped adaptively, raw norm feeds the EMA
    else:
        regime_shift = torch.zeros_like(spike)

    ceiling = torch.where(spike, adaptive, g)
    inf = torch.full_like(g, float("inf"))
    cap = inf if cfg.max_grad_norm is None else torch.full_like(g, float(cfg.max_grad_norm))
    ceiling = torch.minimum(ceiling, cap)
    # Reference: scale by ceiling/(g+1e-6) only if g > ceiling. In warmup it calls torch's
    # clip_grad_norm_, whose coefficient is min(1, cap/(g+1e-6)) with no strict test.
    one = torch.ones_like(g)
    coef_after = torch.where(g > ceiling, ceiling / (g + CLIP_EPS), one)
    coef_warm = torch.clamp(cap / (g + CLIP_EPS), max=1.0)
    coef = torch.where(in_warmup, coef_warm, coef_after)
    clipped = finite & (coef < 1.0)
    clip_to = torch.where(clipped, torch.where(in_warmup, cap, ceiling), inf)
    threshold = torch.where(in_warmup, cap, torch.minimum(pass_limit, cap))

    # EMA update, new mean first and the variance with the *new* mean (reference lines 77-80).
    feed = torch.where(spike, adaptive, g)
    new_mean = cfg.alpha * mean + (1 - cfg.alpha) * feed
    new_var = cfg.alpha * var + (1 - cfg.alpha) * (feed - new_mean) ** 2
    update = finite & ~in_warmup
    if cfg.skip_update_on_spike:
        update = update & ~spike
    mean_out = torch.where(update, new_mean, torch.where(filled, w_mean, mean))
    var_out = torch.where(update, new_var, torch.where(filled, w_var, var))

    skipped = ~finite if cfg.nonfinite == "skip" else torch.zeros_like(finite)
    if cfg.nonfinite == "skip":
        coef = torch.where(finite, coef, torch.zeros_like(coef))
    else:
        coef = torch.where(finite, coef, one)  # "raise" and "propagate" leave the gradient alone

    new_state = ZClipState(
        count=count,
        buffer=buffer,
        mean=mean_out,
        var=var_out,
        steps=state.steps + 1,
        num_clipped=state.num_clipped + clipped.to(torch.int64),
        num_spikes=state.num_spikes + spike.to(torch.int64),
        num_nonfinite=state.num_nonfinite + (~finite).to(torch.int64),
        streak=streak,
    )
    decision = ZClipDecision(
        # mean is copied: the clipper writes the new state into the old tensors (see clipper._commit)
        norm=g_raw, coef=coef, clip_to=clip_to, threshold=threshold, mean=mean.clone(), std=std,
        z=torch.where(in_warmup | ~finite, torch.full_like(z, float("nan")), z),
        warmup=in_warmup, spike=spike, regime_shift=regime_shift, clipped=clipped, nonfinite=~finite, skipped=skipped,
    )
    return new_state, decision
