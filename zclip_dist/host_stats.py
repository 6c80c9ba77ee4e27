"""ZClip and AdaGC-global on Python floats: the device recurrences of ``stats.py`` and ``adagc.py``,
operation for operation, for offline replay of long traces (a million steps in seconds).

The statistics are a scalar recurrence, so a tensor per step only costs launch overhead. Python floats
are IEEE doubles, which is ZClip's state dtype: every ``+ - * /`` and ``sqrt`` below is the same
correctly rounded operation, in the same order, as the tensor code, so the results are bit-identical
(``tests/test_host_stats.py`` compares every metric of every step in every mode). Two details keep it so:
a square is ``x * x`` (torch's ``pow(x, 2)`` kernel multiplies; libm's ``pow`` may differ in the last
bit), and the warmup mean and variance are computed by torch itself, once, on the same buffer (torch's
``sum`` is not a left-to-right sum).

AdaGC keeps gamma in float32: each operation is computed in double and rounded to float32, which is
exact for ``+ - * /`` (double has more than twice float32's precision), with Python scalars rounded to
float32 first and ``scalar / tensor`` taken as ``reciprocal(tensor) * scalar``, as torch does.
"""

from __future__ import annotations

import math
import struct
from itertools import accumulate
from typing import Any, Sequence

import torch

from .config import AdaGCConfig, ZClipConfig
from .stats import CLIP_EPS, STATE_DTYPE

__all__ = ["zclip_host", "adagc_global_host", "ZCLIP_COLUMNS"]

_INF = math.inf
_NAN = math.nan

#: The columns :func:`zclip_host` returns: ``metrics.METRIC_NAMES``, flags as bools, counters as ints.
ZCLIP_COLUMNS = ("grad_norm", "clipped_norm", "mean", "std", "z", "threshold", "coef",
                 "clipped", "spike", "skipped", "nonfinite", "warmup", "regime_shift",
                 "step", "num_clipped", "num_spikes", "num_nonfinite")


def _div(a: float, b: float) -> float:
    """IEEE division where Python raises: x/0 is +-inf, 0/0 is NaN."""
    try:
        return a / b
    except ZeroDivisionError:
        if a != a or a == 0.0:
            return _NAN
        return math.copysign(_INF, a) * math.copysign(1.0, b)


def _warmup_stats(buffer: list[float]) -> tuple[float, float]:
    # The same tensor ops as stats.zclip_update, on the same values: bitwise the same mean and variance.
    t = torch.tensor(buffer, dtype=STATE_DTYPE)
    n = len(buffer)
    mean = t.sum() / n
    return float(mean), float(((t - mean) ** 2).sum() / n)


class _ZClipRun:
    """The recurrence over a range of steps, appending each step's decision to the columns."""

    def __init__(self, config: ZClipConfig) -> None:
        cfg = config
        self.cfg = cfg
        self.cap = _INF if cfg.max_grad_norm is None else float(cfg.max_grad_norm)
        self.nonfinite_coef = 0.0 if cfg.nonfinite == "skip" else 1.0
        self.count, self.streak, self.mean, self.var = 0, 0, 0.0, 0.0
        self.buffer: list[float] = []
        self.cols: dict[str, list[Any]] = {name: [] for name in
                                           ("mean", "std", "z", "threshold", "coef", "clipped", "spike",
                                            "nonfinite", "warmup", "regime_shift")}

    def snapshot(self) -> tuple[Any, ...]:
        return self.count, self.streak, self.mean, self.var, len(self.buffer), len(self.cols["mean"])

    def restore(self, snap: tuple[Any, ...]) -> None:
        self.count, self.streak, self.mean, self.var, n_buffer, n_rows = snap
        del self.buffer[n_buffer:]
        for col in self.cols.values():
            del col[n_rows:]

    def run(self, norms: Sequence[float], start: int, stop: int, std_of_last: float | None = None) -> list[float]:
        """Steps ``start..stop-1`` with ``math.sqrt``; the last one's std is ``std_of_last`` when given.
        Returns the variance each step took the square root of."""
        cfg = self.cfg
        alpha, one_minus = cfg.alpha, 1 - cfg.alpha
        k, eps, factor = cfg.z_thresh, cfg.eps, cfg.clip_factor
        warm_n, cap, nonfinite_coef = cfg.warmup_steps, self.cap, self.nonfinite_coef
        percentile = cfg.mode == "percentile"
        scaling = cfg.clip_option == "adaptive_scaling"
        recovery = cfg.recovery_steps
        keep_on_spike = cfg.skip_update_on_spike
        isfinite, sqrt = math.isfinite, math.sqrt
        count, streak, mean, var, buffer = self.count, self.streak, self.mean, self.var, self.buffer
        c = self.cols
        col_mean, col_std, col_z, col_thr, col_coef = c["mean"], c["std"], c["z"], c["threshold"], c["coef"]
        col_clip, col_spike, col_nf, col_warm, col_shift = (c["clipped"], c["spike"], c["nonfinite"],
                                                            c["warmup"], c["regime_shift"])
        used = []
        last = stop - 1
        for i in range(start, stop):
            g = norms[i]
            in_warmup = count < warm_n
            used.append(var)
            std = std_of_last if i == last and std_of_last is not None else sqrt(var)
            col_mean.append(mean)
            col_std.append(std)
            col_warm.append(in_warmup)
            finite = isfinite(g)
            if percentile:
                limit = mean + k * std
            else:
                limit = mean + k * (std + eps)  # z > k  <=>  g > limit
            if not finite:  # nothing moves but the counters; streak and the regime-shift flag stay as they were
                col_z.append(_NAN)
                col_thr.append(cap if in_warmup else (limit if limit < cap else cap))
                col_coef.append(nonfinite_coef)
                col_clip.append(False)
                col_spike.append(False)
                col_nf.append(True)
                col_shift.append(recovery is not None and streak > recovery)
                continue
            col_nf.append(False)
            if in_warmup:
                buffer.append(g)
                count += 1
                if count == warm_n:
                    mean, var = _warmup_stats(buffer)
                coef = _div(cap, g + CLIP_EPS)
                if coef > 1.0:
                    coef = 1.0
                col_z.append(_NAN)
                col_thr.append(cap)
                col_coef.append(coef)
                col_clip.append(coef < 1.0)
                col_spike.append(False)
                col_shift.append(False)
                streak = 0
                continue
            count += 1
            z = _div(g - mean, std + eps)
            if percentile:
                spike = g > limit
                adaptive = limit
            else:
                spike = z > k
                adaptive = 0.0
                if spike:  # only a spike reads the adaptive threshold
                    adaptive = (mean + _div(k * std, z / k)) * factor if scaling else mean
            streak = streak + 1 if spike else 0
            shift = False
            if recovery is not None:
                shift = streak > recovery
                spike = spike and not shift
            ceiling = adaptive if spike else g
            if ceiling > cap:
                ceiling = cap
            coef = ceiling / (g + CLIP_EPS) if g > ceiling else 1.0
            col_z.append(z)
            col_thr.append(limit if limit < cap else cap)
            col_coef.append(coef)
            col_clip.append(coef < 1.0)
            col_spike.append(spike)
            col_shift.append(shift)
            if not (keep_on_spike and spike):
                feed = adaptive if spike else g
                new_mean = alpha * mean + one_minus * feed
                d = feed - new_mean
                var = alpha * var + one_minus * (d * d)
                mean = new_mean
        self.count, self.streak, self.mean, self.var = count, streak, mean, var
        return used


#: Steps run ahead before checking their square roots against torch's (see zclip_host).
_CHUNK = 64


def zclip_host(config: ZClipConfig, norms: Sequence[float]) -> dict[str, list[Any]]:
    """ZClip's decision at every step of ``norms``: the same numbers as ``Clipper.step`` + ``metrics()``
    on CPU tensors.

    torch's float64 ``sqrt`` on the CPU (MKL) is not correctly rounded: about 1% of results differ from
    ``math.sqrt`` in the last bit. So steps run ahead in chunks with ``math.sqrt``, torch then takes the
    square roots of the chunk's variances in one call, and from the first step where they differ the
    chunk runs again with torch's value. (CUDA's ``sqrt`` is correctly rounded, like ``math.sqrt``.)
    """
    values = [float(g) for g in norms]
    n = len(values)
    run = _ZClipRun(config)
    t = 0
    while t < n:
        stop = min(n, t + _CHUNK)
        snap = run.snapshot()
        used = run.run(values, t, stop)
        exact = torch.tensor(used, dtype=STATE_DTYPE).sqrt().tolist()
        j = next((i for i, (v, s) in enumerate(zip(used, exact)) if math.sqrt(v) != s), None)
        if j is None:
            t = stop
            continue
        run.restore(snap)
        run.run(values, t, t + j + 1, std_of_last=exact[j])
        t += j + 1

    cols = run.cols
    coef, nonfinite = cols["coef"], cols["nonfinite"]
    return {
        "grad_norm": values,
        "clipped_norm": [g * c for g, c in zip(values, coef)],
        "mean": cols["mean"], "std": cols["std"], "z": cols["z"], "threshold": cols["threshold"], "coef": coef,
        "clipped": cols["clipped"], "spike": cols["spike"],
        "skipped": nonfinite if run.nonfinite_coef == 0.0 else [False] * n,
        "nonfinite": nonfinite, "warmup": cols["warmup"], "regime_shift": cols["regime_shift"],
        "step": list(range(1, n + 1)),
        "num_clipped": list(accumulate(cols["clipped"])), "num_spikes": list(accumulate(cols["spike"])),
        "num_nonfinite": list(accumulate(nonfinite)),
    }


_F32 = struct.Struct("f")


def _f32(x: float) -> float:
    """Round a double to the nearest float32 (inf beyond its range, as a tensor cast does)."""
    try:
        return _F32.unpack(_F32.pack(x))[0]
    except OverflowError:
        return math.copysign(_INF, x)


def adagc_global_host(config: AdaGCConfig, norms: Sequence[float]) -> dict[str, list[Any]]:
    """AdaGC-global at every step of ``norms``, as ``AdaGCClipper`` on the global norm: coefficient,
    threshold (the cap in warmup, then ``clip_ratio * gamma``), clipped, warmup, non-finite."""
    if config.mode != "adagc-global":
        raise ValueError("a norm trace holds only the global norm: replay simulates AdaGC in mode 'adagc-global'")
    cfg = config
    f32, isfinite = _f32, math.isfinite
    eps = f32(cfg.eps)
    ratio, beta, one_minus = f32(cfg.clip_ratio), f32(cfg.beta), f32(1 - cfg.beta)
    cap = None if cfg.max_grad_norm is None else f32(cfg.max_grad_norm)
    warm_n, recovery = cfg.warmup_steps, cfg.recovery_steps
    nonfinite_coef = 0.0 if cfg.nonfinite == "skip" else 1.0

    count, streak, gamma, seen = 0, 0, 0.0, False
    coefs, thresholds, clipped, warmup, nonfinite = [], [], [], [], []
    for value in norms:
        g = f32(float(value))
        # replay hands the clipper sq_norms = g * g in float32: an overflowing square is a non-finite step
        finite = isfinite(g) and isfinite(f32(g * g))
        warm = count < warm_n
        limit = f32(gamma * ratio)
        warmup.append(warm)
        thresholds.append((_INF if cap is None else cap) if warm else limit)
        if not finite:
            coefs.append(nonfinite_coef)
            clipped.append(False)
            nonfinite.append(True)
            continue
        nonfinite.append(False)
        if warm:
            if cap is None:
                coef, n_warm = 1.0, g
            else:
                coef = min(f32(f32(_div(1.0, f32(g + eps))) * cap), 1.0)  # scalar / tensor = reciprocal * scalar
                n_warm = g if g < cap else cap
            gamma = (gamma if gamma < n_warm else n_warm) if seen else n_warm
            streak = 0
        else:
            over = seen and g > limit
            streak = streak + 1 if over else 0
            reset = False
            if recovery is not None and streak > recovery:
                over, reset, streak = False, True, 0
            coef = f32(limit / f32(g + eps)) if over else 1.0
            n_clipped = limit if over else g
            gamma = f32(f32(gamma * beta) + f32(n_clipped * one_minus)) if seen and not reset else g
        seen = True
        count += 1
        coefs.append(coef)
        clipped.append(coef < 1.0)
    return {"coef": coefs, "threshold": thresholds, "clipped": clipped, "warmup": warmup, "nonfinite": nonfinite}
