"""The standalone clip phase: ZClip and AdaGC drop-ins vs torch's clip_grad_norm_ and the reference zclip.

All variants see the same gradients; each call computes the norm and scales the gradients (the
baseline's coefficient is fixed, ZClip's is adaptive). "skip by zeroing" is the fallback without
``optimizer=`` (a nan_to_num pass guards against NaN entries); "skip by fused optimizer" is
``ZClip(..., optimizer=AdamW(fused=True))``: the clip phase of any ``optimizer=``, whose ``step()`` then
skips a non-finite step itself (its cost per optimizer kind: ``bench/skip_cost.py``). The reference package only scales when it clips;
on a CPU its host branch costs nothing, so its ratio there is reported as measured.
"""

from __future__ import annotations

import itertools

import torch
from zclip import ZClip as ReferenceZClip

from zclip_dist import AdaGC, ZClip

from .common import make_grads, median_time

SIZES = [10_000_000, 100_000_000]
TENSORS = [50, 500]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run(device: torch.device, *, quick: bool = False, repeats: int = 10) -> list[dict]:
    rows = []
    sizes = SIZES[:1] if quick else SIZES
    for n, k, (dname, dtype) in itertools.product(sizes, TENSORS, DTYPES.items()):
        params = make_grads(n, k, dtype, device)
        module = torch.nn.Module()
        module.params = torch.nn.ParameterList(params)
        # Warmed-up clippers (past warmup) so the adaptive branch is what gets timed.
        zclip_skip = ZClip(max_grad_norm=None, warmup_steps=2)
        fused = torch.optim.AdamW(params, fused=True)  # never stepped: attached, so no scrub pass
        zclip_fused = ZClip(max_grad_norm=None, warmup_steps=2, optimizer=fused)
        adagc = AdaGC(warmup_steps=2, optimizer=fused)
        ref = ReferenceZClip(max_grad_norm=None, warmup_steps=2)
        variants = {
            "torch.clip_grad_norm_(foreach)": lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True),
            "zclip_dist.ZClip, skip by zeroing": lambda: zclip_skip.step(params),
            "zclip_dist.ZClip, skip by fused optimizer": lambda: zclip_fused.step(params),
            "zclip_dist.AdaGC, skip by fused optimizer": lambda: adagc.step(params),
            "reference zclip 1.0.0": lambda: ref.step(module),
        }
        r = max(3, repeats // (10 if n >= 100_000_000 else 1))
        times = {name: median_time(fn, device, repeats=r) for name, fn in variants.items()}
        base = times["torch.clip_grad_norm_(foreach)"]
        for name, t in times.items():
            rows.append({"device": device.type, "params": n, "tensors": k, "dtype": dname, "variant": name,
                         "median_ms": t * 1e3, "ratio_vs_clip_grad_norm": t / base,
                         "reference_over_this": times["reference zclip 1.0.0"] / t})
        del params, module
    return rows
