"""Exact per-step counts: host reads of tensor values and collectives, for the PyTorch drop-in.

Counted by instrumentation (the same patching the tests use), not timed.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from zclip_dist import AdaGC, Topology, ZClip

from .common import make_grads


def _count_collectives(fn) -> int:
    calls = []
    orig = dist.all_reduce

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    dist.all_reduce = counting
    try:
        fn()
    finally:
        dist.all_reduce = orig
    return len(calls)


def run() -> list[dict]:
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.sync_guard import count_host_reads  # the tests' instrumentation, reused

    owns_group = not dist.is_initialized()
    if owns_group:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29655")
        dist.init_process_group("gloo", rank=0, world_size=1)
    rows = []
    try:
        params = make_grads(1_000_000, 50, torch.float32, torch.device("cpu"))
        for name, clipper in (("ZClip", ZClip(warmup_steps=2, topology=Topology.data_parallel())),
                              ("AdaGC", AdaGC(warmup_steps=2, topology=Topology.data_parallel()))):
            for _ in range(3):
                clipper.step(params)
            with count_host_reads() as reads:
                n_coll = _count_collectives(lambda: clipper.step(params))
            rows.append({"front_end": f"PyTorch drop-in {name}", "host_reads_per_step": sum(reads.values()),
                         "collectives_per_step": n_coll})
    finally:
        if owns_group:
            dist.destroy_process_group()
    return rows
