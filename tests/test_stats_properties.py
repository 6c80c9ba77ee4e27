"""Invariants of the ZClip statistics, checked by Hypothesis over arbitrary settings and norm sequences."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zclip_dist.config import ZClipConfig
from zclip_dist.stats import init_state, zclip_update

configs = st.builds(
    ZClipConfig,
    alpha=st.floats(0.5, 0.999),
    z_thresh=st.floats(0.5, 5.0),
    max_grad_norm=st.one_of(st.none(), st.floats(1e-3, 1e3)),
    eps=st.floats(0.0, 1e-2),
    warmup_steps=st.integers(1, 8),
    mode=st.sampled_from(["zscore", "percentile"]),
    clip_option=st.sampled_from(["adaptive_scaling", "mean"]),
    clip_factor=st.floats(0.3, 2.0),
    skip_update_on_spike=st.booleans(),
)
finite_norms = st.floats(1e-6, 1e6, allow_nan=False, allow_infinity=False)
any_norms = st.one_of(finite_norms, st.sampled_from([math.nan, math.inf, -math.inf]))


def run(cfg, norms):
    state = init_state(cfg, "cpu")
    out = []
    for g in norms:
        new_state, d = zclip_update(cfg, state, torch.tensor(g, dtype=torch.float64))
        out.append((state, new_state, d))
        state = new_state
    return out


@settings(max_examples=150, deadline=None)
@given(cfg=configs, norms=st.lists(any_norms, min_size=1, max_size=40))
def test_coefficient_bounds_and_cap(cfg, norms):
    for _, _, d in run(cfg, norms):
        coef, g = float(d.coef), float(d.norm)
        assert 0.0 <= coef <= 1.0
        if not math.isfinite(g):
            assert coef == (0.0 if cfg.nonfinite == "skip" else 1.0) and bool(d.nonfinite)
            continue
        if cfg.max_grad_norm is not None:  # the cap always holds (up to the 1e-6 in the denominator)
            assert g * coef <= cfg.max_grad_norm * (1 + 1e-9)
        if bool(d.clipped):
            assert g * coef <= float(d.clip_to) * (1 + 1e-9)
        else:
            assert coef == 1.0 or (bool(d.warmup) and coef > 1 - 1e-6 / max(g, 1e-300))


@settings(max_examples=150, deadline=None)
@given(cfg=configs, norms=st.lists(any_norms, min_size=1, max_size=40))
def test_nonfinite_never_touches_statistics(cfg, norms):
    for before, after, d in run(cfg, norms):
        if bool(d.nonfinite):
            for name in ("count", "buffer", "mean", "var", "num_clipped", "num_spikes"):
                assert torch.equal(getattr(before, name), getattr(after, name)), name
            assert int(after.num_nonfinite) == int(before.num_nonfinite) + 1
        assert torch.isfinite(after.mean) and torch.isfinite(after.var) and float(after.var) >= 0


@settings(max_examples=60, deadline=None)
@given(cfg=configs, norms=st.lists(finite_norms, min_size=1, max_size=30))
def test_pure_and_deterministic(cfg, norms):
    """Same inputs -> bitwise same outputs (what makes every rank agree), and the input state is not mutated."""
    state = init_state(cfg, "cpu")
    for g in norms:
        snapshot = [t.clone() for t in state]
        s1, d1 = zclip_update(cfg, state, torch.tensor(g, dtype=torch.float64))
        s2, d2 = zclip_update(cfg, state, torch.tensor(g, dtype=torch.float64))
        assert all(torch.equal(a, b) for a, b in zip(state, snapshot))
        assert all(torch.equal(a, b) for a, b in zip(s1, s2))
        assert all(torch.equal(a, b) or (a.isnan().all() and b.isnan().all()) for a, b in zip(d1, d2))
        state = s1


@settings(max_examples=60, deadline=None)
@given(cfg=configs, n=st.integers(1, 30), g=st.floats(1e-3, 1e3), eps=st.floats(1e-6, 1e-2))
def test_constant_norm_is_never_a_spike(cfg, n, g, eps):
    """A steady norm has zero variance; only the cap may clip it. (eps must dominate the EMA's rounding
    of g: with eps = 0 a one-ulp difference divided by sigma = 0 is an infinite z-score, in the
    reference package too.)"""
    for _, _, d in run(cfg.replace(max_grad_norm=None, eps=eps), [g] * n):
        assert not bool(d.spike) and float(d.coef) == 1.0


@settings(max_examples=60, deadline=None)
@given(cfg=configs, norms=st.lists(finite_norms, min_size=1, max_size=30))
def test_warmup_length(cfg, norms):
    """Statistics exist after exactly ``warmup_steps`` finite norms; no adaptive clipping before."""
    for i, (_, after, d) in enumerate(run(cfg, norms)):
        assert bool(d.warmup) == (i < cfg.warmup_steps)
        if bool(d.warmup):
            assert not bool(d.spike)
