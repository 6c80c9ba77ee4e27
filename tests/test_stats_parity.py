"""ZClip statistics against the reference ``zclip`` 1.0.0 package, decision for decision."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from zclip_dist.clipper import Clipper
from zclip_dist.config import ZClipConfig

from .oracle import ReferenceOracle

STEPS = 2400


def norm_sequence(seed: int, steps: int = STEPS) -> np.ndarray:
    """Random regimes: level random walk, noise levels, gradual drifts, level shifts, isolated spikes."""
    rng = np.random.default_rng(seed)
    level = 10 ** rng.uniform(-3, 2)
    out = []
    while len(out) < steps:
        length = int(rng.integers(50, 400))
        kind = rng.choice(["flat", "drift", "shift", "noisy"])
        noise = rng.uniform(0.01, 0.3) if kind != "noisy" else rng.uniform(0.3, 0.8)
        end = level * (10 ** rng.uniform(-0.5, 0.5)) if kind == "drift" else level
        if kind == "shift":
            level *= rng.choice([0.2, 1.5, 3.0, 10.0])
            end = level
        ramp = np.geomspace(level, end, length)
        seg = ramp * np.exp(rng.normal(0, noise, length))
        spikes = rng.random(length) < 0.03
        seg[spikes] *= rng.uniform(3, 60, spikes.sum())
        out.extend(seg.tolist())
        level = end
    return np.asarray(out[:steps])


CONFIGS = [
    dict(),  # reference defaults (cap 1.0)
    dict(max_grad_norm=None),
    dict(max_grad_norm=None, clip_option="mean"),
    dict(max_grad_norm=None, mode="percentile"),
    dict(max_grad_norm=None, clip_factor=0.7, z_thresh=2.0),
    dict(max_grad_norm=None, skip_update_on_spike=True),
    dict(max_grad_norm=5.0, alpha=0.9, warmup_steps=10, mode="percentile", z_thresh=1.5),
    dict(max_grad_norm=2.0, alpha=0.99, warmup_steps=50, clip_factor=1.3, eps=1e-3),
    dict(max_grad_norm=None, warmup_steps=1, skip_update_on_spike=True, clip_option="mean"),
]


def rel_close(a: float, b: float, rel: float) -> bool:
    return a == b or abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)


@pytest.mark.parametrize("cfg_kwargs,seed", list(zip(CONFIGS, itertools.count(11))))
def test_parity_with_reference(cfg_kwargs, seed):
    cfg = ZClipConfig(**cfg_kwargs)
    ref = ReferenceOracle(cfg)
    clipper = Clipper(cfg, device="cpu")
    norms = norm_sequence(seed)
    clipped = spikes = 0
    for t, g in enumerate(norms):
        ref_coef = ref.step(float(g))
        d = clipper.step(torch.tensor(g, dtype=torch.float64))
        coef = float(d.coef)
        assert rel_close(coef, ref_coef, 1e-6), (t, g, coef, ref_coef)
        # the value the gradient is scaled to (the effective threshold of this step)
        assert rel_close(g * coef, g * ref_coef, 1e-6)
        stats = ref.stats
        if stats is not None:
            st = clipper.state
            assert rel_close(float(st.mean), stats[0], 1e-6), (t, float(st.mean), stats[0])
            assert math.isclose(float(st.var), stats[1], rel_tol=1e-6, abs_tol=1e-12 * stats[0] ** 2), t
        clipped += coef < 1
        spikes += bool(d.spike)
    # the sequence must actually exercise clipping and the adaptive branch
    assert clipped > 20 and spikes > 20, (clipped, spikes)


def test_threshold_is_the_clip_point():
    """``threshold`` is the largest norm that passes: a norm just above it is clipped, just below it is not."""
    cfg = ZClipConfig(max_grad_norm=None, warmup_steps=5)
    base = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95]
    clipper = Clipper(cfg, device="cpu")
    for g in base:
        clipper.step(torch.tensor(g, dtype=torch.float64))
    state = clipper.state

    def copy_of(st):  # the clipper advances its state in place
        return type(st)(*(t.clone() for t in st))

    for factor, expect_clip in ((1 - 1e-9, False), (1 + 1e-9, True)):
        probe = Clipper(cfg, device="cpu")
        probe.state = copy_of(state)
        thr = float(probe.step(torch.tensor(1.0, dtype=torch.float64)).threshold)
        probe.state = copy_of(state)
        d = probe.step(torch.tensor(thr * factor, dtype=torch.float64))
        assert bool(d.clipped) is expect_clip and bool(d.spike) is expect_clip
