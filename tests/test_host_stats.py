"""The host recurrences replay uses are bit-identical to the device path training uses, in every mode.

The oracle is the training code itself: ``Clipper`` / ``AdaGCClipper`` stepping on CPU tensors, one
step at a time, read back through ``metrics_tensor``. Every metric of every step must have the same
bits (NaN where NaN), over traces with warmup, noise, isolated spikes, spike runs, level shifts,
non-finite norms, zeros and constant stretches.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from zclip_dist.clipper import AdaGCClipper, Clipper
from zclip_dist.config import AdaGCConfig, ZClipConfig
from zclip_dist.host_stats import ZCLIP_COLUMNS, adagc_global_host, zclip_host
from zclip_dist.metrics import METRIC_NAMES

STEPS = 2500


def trace(seed: int, steps: int = STEPS) -> list[float]:
    rng = random.Random(seed)
    level, out = 1.5, []
    for t in range(steps):
        if t < 12:
            out.append(2.0)  # a constant start: std 0 after a short warmup (z = inf or NaN when eps = 0)
            continue
        if t % 700 == 350:
            level *= rng.choice([0.3, 4.0])  # a regime shift
        g = level * math.exp(rng.gauss(0.0, 0.15))
        if t % 97 == 13:
            g *= rng.uniform(5, 200)  # an isolated spike
        if 1200 <= t < 1210:
            g *= 30.0  # a run of spikes
        if t % 211 == 17:
            g = rng.choice([math.nan, math.inf, -math.inf])
        if t % 503 == 40:
            g = 0.0
        out.append(g)
    out[3] = math.nan  # non-finite inside warmup
    out[1500] = 1e200
    return out


ZCLIP_MODES = [
    dict(),  # the reference's defaults: zscore, adaptive_scaling, cap 1.0
    dict(clip_option="mean", max_grad_norm=None, skip_update_on_spike=True, warmup_steps=10),
    dict(mode="percentile", z_thresh=2.0, max_grad_norm=50.0, recovery_steps=5),
    dict(alpha=0.9, eps=0.0, warmup_steps=8, clip_factor=1.3, recovery_steps=3, nonfinite="propagate",
         max_grad_norm=None),
    dict(mode="percentile", eps=0.0, warmup_steps=1, skip_update_on_spike=True, max_grad_norm=3.0),
]


def _same(a: float, b: float) -> bool:
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b) or (a != a and b != b)


@pytest.mark.parametrize("settings", ZCLIP_MODES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_zclip_host_equals_the_device_path_bit_for_bit(settings):
    config = ZClipConfig(**settings)
    norms = trace(seed=len(settings))
    clipper = Clipper(config, device="cpu", cuda_graph=False)
    rows = []
    for g in norms:
        clipper.step(torch.tensor(g, dtype=torch.float64))
        rows.append(clipper.metrics_tensor())
    device = dict(zip(METRIC_NAMES, torch.stack(rows).T.tolist()))
    host = zclip_host(config, norms)
    assert ZCLIP_COLUMNS == METRIC_NAMES
    for name in METRIC_NAMES:
        bad = [i for i, (h, d) in enumerate(zip(host[name], device[name])) if not _same(float(h), d)]
        assert not bad, f"{name}: step {bad[0]}: host {host[name][bad[0]]!r} device {device[name][bad[0]]!r}"
    # the trace exercises what it is meant to
    assert sum(host["spike"]) > 20 and sum(host["nonfinite"]) > 10 and sum(host["clipped"]) > 20
    if config.recovery_steps is not None:
        assert any(host["regime_shift"])


ADAGC_MODES = [
    dict(),
    dict(max_grad_norm=None, warmup_steps=20, clip_ratio=1.1, beta=0.95),
    dict(recovery_steps=4, warmup_steps=0, nonfinite="propagate", max_grad_norm=2.0),
    dict(eps=0.0, warmup_steps=5, max_grad_norm=0.5, recovery_steps=2),
]


@pytest.mark.parametrize("settings", ADAGC_MODES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_adagc_global_host_equals_the_device_path_bit_for_bit(settings):
    config = AdaGCConfig(mode="adagc-global", **settings)
    norms = trace(seed=10 + len(settings))
    norms[900] = 1e20  # finite, but its square overflows float32: the device path calls it non-finite
    clipper = AdaGCClipper(config, cuda_graph=False)
    clipper.bind(("global",), torch.device("cpu"))
    coef, threshold, clipped = [], [], []
    for g in norms:
        warm = bool(clipper.state.count < config.warmup_steps)
        limit = (config.clip_ratio * clipper.state.gamma)[0].item()  # the value the step compares with
        threshold.append((math.inf if config.max_grad_norm is None else torch.tensor(config.max_grad_norm).float().item())
                         if warm else limit)
        value = torch.tensor(g, dtype=torch.float32)
        d = clipper.step((value * value).reshape(1), value)
        coef.append(d.coefs[0].item())
        clipped.append(bool(d.clipped[0]))
    host = adagc_global_host(config, norms)
    for name, device in (("coef", coef), ("threshold", threshold), ("clipped", clipped)):
        bad = [i for i, (h, d) in enumerate(zip(host[name], device)) if not _same(float(h), float(d))]
        assert not bad, f"{name}: step {bad[0]}: host {host[name][bad[0]]!r} device {device[bad[0]]!r}"
    assert sum(host["clipped"]) > 20 and host["nonfinite"][900]
