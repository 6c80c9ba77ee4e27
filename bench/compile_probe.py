"""Probe (GPU): what a torch.compile-fused ``zclip_update`` would save inside the CUDA graph.

``python bench/compile_probe.py`` -- times the graphed statistics update eagerly-built vs compiled
(Inductor fuses the ~45 scalar kernels). Not used by the package: see bench/RESULTS.md.
"""
import time, torch
from zclip_dist.config import ZClipConfig
from zclip_dist.stats import init_state, zclip_update
from zclip_dist.clipper import _commit
from zclip_dist.graphs import GraphedUpdate

dev = torch.device("cuda")
cfg = ZClipConfig(max_grad_norm=None, warmup_steps=2)
for compiled in (False, True):
    state = init_state(cfg, dev)
    fn = torch.compile(zclip_update, fullgraph=True, dynamic=False) if compiled else zclip_update
    def upd(norm):
        new, d = fn(cfg, state, norm)
        _commit(state, new)
        return d
    n = torch.tensor(1.0, device=dev, dtype=torch.float64)
    t0 = time.perf_counter()
    for _ in range(3):
        upd(n)
    torch.cuda.synchronize(); print("compiled" if compiled else "eager", "warm-up s", round(time.perf_counter() - t0, 2))
    g = GraphedUpdate(upd, [n])
    ts = []
    for i in range(200):
        torch.cuda.synchronize(); t = time.perf_counter(); g(n * (1 + 0.01 * (i % 7))); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    ts.sort(); print("  graphed update median us", round(ts[100] * 1e6, 1))
