"""Opt-in regime-shift recovery: re-adapt to a permanent change of the norm level within 50 steps,
keep clipping isolated spikes, and leave the reference behaviour untouched by default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zclip_dist.adagc import adagc_update, init_adagc_state
from zclip_dist.clipper import Clipper
from zclip_dist.config import AdaGCConfig, ZClipConfig

SHIFT_AT = 200
STEPS = 1400
SPIKES_AFTER = (SHIFT_AT + 400, SHIFT_AT + 900)  # isolated x6 spikes at the new level


def levels(factor: float, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    level = np.where(np.arange(STEPS) < SHIFT_AT, 1.0, factor)
    g = level * np.exp(rng.normal(0, noise, STEPS))
    for t in SPIKES_AFTER:
        g[t] *= 6.0
    return g


def zclip_clips(cfg: ZClipConfig, norms: np.ndarray) -> np.ndarray:
    clipper = Clipper(cfg, device="cpu")
    return np.array([bool(clipper.step(torch.tensor(g, dtype=torch.float64)).clipped) for g in norms])


@pytest.mark.parametrize("factor", [1.5, 10.0])
def test_zclip_recovery(factor):
    norms = levels(factor)
    base = ZClipConfig(max_grad_norm=None)
    locked = zclip_clips(base, norms)
    assert locked[SHIFT_AT + 100:].mean() > 0.9  # the reference locks in: nearly every step clipped
    recovering = zclip_clips(base.replace(recovery_steps=10), norms)
    after = recovering[SHIFT_AT + 50:]
    spikes = {t - SHIFT_AT - 50 for t in SPIKES_AFTER}
    others = np.array([c for i, c in enumerate(after) if i not in spikes])
    assert others.mean() < 0.05, others.mean()  # re-adapted within 50 steps
    assert all(recovering[t] for t in SPIKES_AFTER)  # isolated spikes are still clipped
    assert recovering[:SHIFT_AT].tolist() == locked[:SHIFT_AT].tolist()  # no change before the shift


def adagc_clips(cfg: AdaGCConfig, norms: np.ndarray) -> np.ndarray:
    state = init_adagc_state(cfg, 2, "cpu")
    out = []
    for g in norms:
        sq = torch.tensor([g * g, 1.0])  # tensor 0 shifts; tensor 1 is steady
        state, d = adagc_update(cfg, state, sq, sq.sum().sqrt())
        out.append(bool(d.clipped[0]))
    return np.array(out)


def test_adagc_recovery():
    # 1% noise: with clip_ratio 1.04 a steady tensor is then rarely clipped (at 5% noise AdaGC clips
    # about a fifth of all steps by design, before any shift)
    norms = levels(10.0, noise=0.01)
    base = AdaGCConfig(warmup_steps=100, max_grad_norm=100.0)
    slow = adagc_clips(base, norms)
    assert slow[SHIFT_AT + 100:SHIFT_AT + 1000].mean() > 0.9  # the official rule needs ~5,800 steps
    fast = adagc_clips(base.replace(recovery_steps=10), norms)
    after = fast[SHIFT_AT + 50:]
    spikes = {t - SHIFT_AT - 50 for t in SPIKES_AFTER}
    others = np.array([c for i, c in enumerate(after) if i not in spikes])
    assert others.mean() < 0.05, others.mean()
    assert all(fast[t] for t in SPIKES_AFTER)


def test_adagc_recovery_counts_like_zclip():
    """``recovery_steps=R``: the first R over-limit steps of a run are clipped, the (R+1)-th is accepted,
    in both methods (AdaGC used to accept the R-th, so R=1 never clipped at all)."""
    norms = levels(1.0, noise=0.01)
    norms[SHIFT_AT] *= 6.0  # one isolated spike
    for r in (1, 3):
        assert adagc_clips(AdaGCConfig(warmup_steps=100, max_grad_norm=100.0, recovery_steps=r), norms)[SHIFT_AT]
        assert zclip_clips(ZClipConfig(max_grad_norm=None, recovery_steps=r), norms)[SHIFT_AT]
    run = levels(10.0, noise=0.01)  # a permanent x10 rise at SHIFT_AT
    fast = adagc_clips(AdaGCConfig(warmup_steps=100, max_grad_norm=100.0, recovery_steps=3), run)
    assert fast[SHIFT_AT:SHIFT_AT + 4].tolist() == [True, True, True, False]


def test_adagc_streak_survives_resume():
    """A run of over-limit steps cut by a checkpoint continues exactly: the streak is saved by name."""
    from zclip_dist.clipper import AdaGCClipper

    cfg = AdaGCConfig(warmup_steps=100, max_grad_norm=100.0, recovery_steps=5)
    run = levels(10.0, noise=0.01)

    def feed(clipper, norms):
        out = []
        for g in norms:
            sq = torch.tensor([g * g, 1.0], dtype=torch.float32)
            out.append(clipper.step(sq, sq.sum().sqrt()).coefs.clone())
        return out

    straight = AdaGCClipper(cfg, cuda_graph=False)
    straight.bind(["w", "b"], torch.device("cpu"))
    expected = feed(straight, run[:SHIFT_AT + 20])
    first = AdaGCClipper(cfg, cuda_graph=False)
    first.bind(["w", "b"], torch.device("cpu"))
    got = feed(first, run[:SHIFT_AT + 2])  # stop two steps into the over-limit run
    assert first.state_dict()["streak"] == {"w": 2}
    resumed = AdaGCClipper(cfg, cuda_graph=False)
    resumed.load_state_dict(first.state_dict())
    resumed.bind(["w", "b"], torch.device("cpu"))
    got += feed(resumed, run[SHIFT_AT + 2:SHIFT_AT + 20])
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
