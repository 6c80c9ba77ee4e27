"""What only a GPU can show: no synchronisation in the step (CUDA's own detector) and CUDA-graph capture.

* ``torch.cuda.set_sync_debug_mode("error")`` makes any synchronising CUDA call raise; the ZClip and
  AdaGC steps run under it after their first call (which builds the cached plan).
* The ZClip step is captured in a CUDA graph and replayed on a changing gradient stream with a spike;
  every replay must decide exactly what an eager ZClip decides on the same gradients.
"""

from __future__ import annotations

import torch

from zclip_dist import AdaGC, ZClip

from .common import make_grads


def sync_free_steps(device: torch.device, steps: int = 40) -> dict:
    params = make_grads(2_000_000, 64, torch.bfloat16, device)
    out = {}
    for name, clipper in (("ZClip", ZClip(warmup_steps=5)), ("AdaGC", AdaGC(warmup_steps=5))):
        clipper.step(params)  # first call builds the plan (one host-to-device copy of the count mask)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in range(steps):
                if t == steps - 5:
                    for p in params[:3]:
                        p.grad.mul_(50.0)  # a spike, decided on the device
                clipper.step(params)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        out[name] = {"steps_under_sync_debug_error": steps, "raised": False}
    return out


def cuda_graph_replay(device: torch.device, steps: int = 60) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    shapes = [(256, 128), (128,), (512, 256), (64,)]
    stream = [[torch.randn(s, generator=gen) * (30.0 if t == 45 else 1.0) for s in shapes] for t in range(steps)]
    params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
    for p, g in zip(params, stream[0]):
        p.grad = g.to(device)
    graphed = ZClip(max_grad_norm=None, warmup_steps=10)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graphed.step(params)  # warm-up outside the graph: plan built, state allocated
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed_norm = graphed.step(params)
    eager = ZClip(max_grad_norm=None, warmup_steps=10)
    eager_params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
    for p, g in zip(eager_params, stream[0]):
        p.grad = g.to(device)
    eager.step(eager_params)
    mismatches, clipped = 0, 0
    for t in range(1, steps):
        for p, q, g in zip(params, eager_params, stream[t]):
            p.grad.copy_(g)
            q.grad = g.to(device)
        graph.replay()
        eager.step(eager_params)
        a, b = graphed.metrics(), eager.metrics()
        same = all(torch.equal(x.grad, y.grad) for x, y in zip(params, eager_params)) and a["coef"] == b["coef"]
        mismatches += not same
        clipped += a["clipped"]
    return {"replays": steps - 1, "mismatches_vs_eager": mismatches, "clipped_steps": clipped,
            "last_norm": float(graphed_norm)}
