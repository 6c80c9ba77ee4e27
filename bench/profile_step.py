"""Where the drop-in's step time goes on a device: norm, statistics, scaling, timed separately.

``python -m bench.profile_step [--device cuda]``; prints medians in microseconds.
"""

from __future__ import annotations

import argparse

import torch

from zclip_dist import ZClip
from zclip_dist.stats import zclip_update

from .common import make_grads, median_time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--tensors", type=int, default=50)
    args = parser.parse_args()
    device = torch.device(args.device)
    params = make_grads(args.params, args.tensors, torch.float32, device)
    zc = ZClip(max_grad_norm=None, warmup_steps=2, nonfinite="propagate")
    for _ in range(3):
        zc.step(params)
    _, ps, grads = zc._gradients(params)
    norm, _ = zc._norms(ps, grads)
    coef = zc.last.coef
    parts = {
        "gradients list": lambda: zc._gradients(params),
        "norm (NormCalculator)": lambda: zc._norms(ps, grads),
        "statistics (zclip_update)": lambda: zclip_update(zc.config, zc.clipper.state, norm),
        "Clipper.step": lambda: zc.clipper.step(norm),
        "scale (_foreach_mul_)": lambda: zc._scale(grads, coef),
        "whole ZClip.step": lambda: zc.step(params),
        "torch.clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True),
    }
    for name, fn in parts.items():
        print(f"{name:28s} {median_time(fn, device, repeats=30) * 1e6:9.1f} us")


if __name__ == "__main__":
    main()
