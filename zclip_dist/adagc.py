"""AdaGC statistics as pure functions of device tensors (no host sync, no communication).

Follows the official Megatron patch (lishuai-97/AdaGC ``megatron-gpt2.patch``; see
``docs/internals/algorithms.md``). Per tensor i, with n_i the norm of the *whole* tensor:

* warmup (the first ``warmup_steps`` finite steps): clip globally at lambda_abs, then
  gamma_i <- n_i (first time) or min(gamma_i, n_i), with n_i measured after the global clip;
* afterwards: h_i = min(1, lambda_rel * gamma_i / n_i) (as ``lambda_rel*gamma_i/(n_i+eps)`` when
  clipping), and gamma_i <- beta * gamma_i + (1 - beta) * min(n_i, lambda_rel * gamma_i).

``adagc-global`` applies the same rule to the global norm with one gamma. Departures from the patch,
on purpose: a non-finite step changes nothing (the patch lets NaN poison gamma forever), and a tensor
that first receives a gradient after warmup starts from its own norm instead of failing.

State dtype: float32 for gamma (the paper's "4 bytes per tensor"; the values are norms, not
accumulated sums), int64 for the step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .config import AdaGCConfig

__all__ = ["AdaGCState", "AdaGCDecision", "init_adagc_state", "adagc_update"]


class AdaGCState(NamedTuple):
    count: Tensor  # int64: finite steps so far
    gamma: Tensor  # float32 [n]: one entry per tensor (1 entry in adagc-global mode)
    seen: Tensor  # bool [n]: gamma initialised
    num_nonfinite: Tensor  # int64
    streak: Tensor  # int64 [n]: consecutive clipped steps per tensor (drives ``recovery_steps``)


class AdaGCDecision(NamedTuple):
    norm: Tensor  # pre-clip global norm (float32, NaN/Inf kept)
    coefs: Tensor  # float32 [n_tensors]: multiplier per tensor (all equal in warmup / global mode)
    clipped: Tensor  # bool [n_tensors]: coefficient < 1
    warmup: Tensor  # bool
    nonfinite: Tensor  # bool
    skipped: Tensor  # bool


def init_adagc_state(config: AdaGCConfig, n: int, device: torch.device | str | None = None) -> AdaGCState:
    size = 1 if config.mode == "adagc-global" else n
    return AdaGCState(
        count=torch.zeros((), dtype=torch.int64, device=device),
        gamma=torch.zeros(size, dtype=torch.float32, device=device),
        seen=torch.zeros(size, dtype=torch.bool, device=device),
        num_nonfinite=torch.zeros((), dtype=torch.int64, device=device),
        streak=torch.zeros(size, dtype=torch.int64, device=device),
    )


def adagc_update(config: AdaGCConfig, state: AdaGCState, sq_norms: Tensor, global_norm: Tensor
                 ) -> tuple[AdaGCState, AdaGCDecision]:
    """One step. ``sq_norms``: squared norms of the whole tensors (fp32 vector); ``global_norm``: 0-d."""
    cfg = config
    g = global_norm.to(torch.float32)
    finite = torch.isfinite(g) & torch.isfinite(sq_norms).all()
    safe_g = torch.where(finite, g, torch.zeros_like(g))
    warm = state.count < cfg.warmup_steps
    if cfg.max_grad_norm is None:  # no global clip in warmup
        coef_global = torch.ones_like(safe_g)
    else:
        coef_global = torch.clamp(cfg.max_grad_norm / (safe_g + cfg.eps), max=1.0)

    if cfg.mode == "adagc-global":
        n = safe_g.reshape(1)
        # patch: the running min of min(G, lambda_abs)
        n_warm = n if cfg.max_grad_norm is None else torch.minimum(n, torch.full_like(n, cfg.max_grad_norm))
    else:
        n = torch.where(torch.isfinite(sq_norms), sq_norms, torch.zeros_like(sq_norms)).sqrt()
        n_warm = n * coef_global

    gamma, seen = state.gamma, state.seen
    limit = cfg.clip_ratio * gamma
    over = seen & (n > limit) & ~warm
    streak = torch.where(over, state.streak + 1, torch.zeros_like(state.streak))
    if cfg.recovery_steps is not None:
        # A tensor over its limit on more than recovery_steps steps in a row has moved for good: take its
        # norm as gamma. ``>`` as in ZClip: the first recovery_steps of a run are still clipped.
        reset = streak > cfg.recovery_steps
        over = over & ~reset
        streak = torch.where(reset, torch.zeros_like(streak), streak)
    else:
        reset = torch.zeros_like(over)
    h_after = torch.where(over, limit / (n + cfg.eps), torch.ones_like(n))
    n_clipped = torch.where(over, limit, n)
    gamma_after = torch.where(seen & ~reset, cfg.beta * gamma + (1 - cfg.beta) * n_clipped, n)
    gamma_warm = torch.where(seen, torch.minimum(gamma, n_warm), n_warm)

    coefs = torch.where(warm, coef_global.expand_as(n), h_after)
    new_gamma = torch.where(finite, torch.where(warm, gamma_warm, gamma_after), gamma)
    if cfg.mode == "adagc-global":
        coefs = coefs.expand(sq_norms.shape[0]) if sq_norms.dim() else coefs
    skip = cfg.nonfinite == "skip"
    coefs = torch.where(finite, coefs, torch.zeros_like(coefs) if skip else torch.ones_like(coefs))

    new_state = AdaGCState(
        count=state.count + finite.to(torch.int64),
        gamma=new_gamma,
        seen=seen | finite,
        num_nonfinite=state.num_nonfinite + (~finite).to(torch.int64),
        streak=torch.where(finite, streak, state.streak),
    )
    decision = AdaGCDecision(norm=g, coefs=coefs, clipped=finite & (coefs < 1), warmup=warm,
                             nonfinite=~finite, skipped=~finite if skip else torch.zeros_like(finite))
    return new_state, decision
