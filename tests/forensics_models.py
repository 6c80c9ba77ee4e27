"""Models and oracles for the spike-forensics tests: a gradient spike injected into one named parameter
on one data-parallel replica, and the single-process computation of who carried it.

``ScaleGrad`` multiplies one parameter's gradient inside the forward pass, so the spike (or NaN) exists
on one replica *before* the data-parallel reduction, as a bad micro-batch would make it, under DDP,
FSDP2 (which sees the unsharded parameter there) and hand-written tensor parallelism alike.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

STEPS, WARMUP = 24, 8
SPIKE_STEP, NAN_STEP = 14, 20  # loop indices; the clipper's step count is one more
SPIKE_PARAM, NAN_PARAM = "2.weight", "0.bias"
SPIKE_FACTOR = 30.0
CFG = dict(max_grad_norm=None, warmup_steps=WARMUP, z_thresh=6.0)


class ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g * ctx.factor, None


class ScaledLinear(nn.Linear):
    """A Linear whose weight/bias gradients can be multiplied on this rank (``factors``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.factors = {"weight": 1.0, "bias": 1.0}

    def _p(self, name: str) -> Tensor:
        p, f = getattr(self, name), self.factors[name]
        return p if f == 1.0 else ScaleGrad.apply(p, f)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self._p("weight"), self._p("bias"))


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(ScaledLinear(6, 16), nn.GELU(), ScaledLinear(16, 16), nn.GELU(), ScaledLinear(16, 3))


def factors_at(step: int, replica: int, spike_replica: int, nan_replica: int) -> dict[str, float]:
    """Parameter name -> gradient factor on this replica at this step."""
    if step == SPIKE_STEP and replica == spike_replica:
        return {SPIKE_PARAM: SPIKE_FACTOR}
    if step == NAN_STEP and replica == nan_replica:
        return {NAN_PARAM: math.nan}
    return {}


def set_factors(net: nn.Module, factors: dict[str, float]) -> None:
    from zclip_dist.forensics import logical_name

    for name, m in net.named_modules():
        if isinstance(m, ScaledLinear):
            for p in ("weight", "bias"):
                m.factors[p] = factors.get(f"{logical_name(name + '.')}{p}", 1.0)


def batch(step: int, replica: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + replica)
    return torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)


def oracle(params: dict[str, Tensor], step: int, replicas: int, spike_replica: int, nan_replica: int):
    """One process, full model: parameter shares of the reduced gradient, replica shares (both of the
    finite total; None where NaN/Inf), global norm."""
    net = make_net()
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(params[n])
    per_replica = []
    for r in range(replicas):
        net.zero_grad()
        set_factors(net, factors_at(step, r, spike_replica, nan_replica))
        x, y = batch(step, r)
        F.mse_loss(net(x), y).backward()
        per_replica.append({n: p.grad.clone() for n, p in net.named_parameters()})
    mean = {n: sum(g[n] for g in per_replica) / replicas for n in per_replica[0]}
    return (_shares({n: float(g.double().square().sum()) for n, g in mean.items()}),
            _shares({r: sum(float(g.double().square().sum()) for g in grads.values())
                     for r, grads in enumerate(per_replica)}),
            math.sqrt(sum(float(g.double().square().sum()) for g in mean.values())))


def _shares(sq: dict) -> dict:
    """Shares of the finite total; None for a NaN/Inf entry."""
    total = sum(v for v in sq.values() if math.isfinite(v))
    return {k: v / total if math.isfinite(v) else None for k, v in sq.items()}


def full_params(net: nn.Module) -> dict[str, Tensor]:
    from zclip_dist.forensics import logical_name

    return {logical_name(n): (p.full_tensor() if hasattr(p, "full_tensor") else p.detach()).clone()
            for n, p in net.named_parameters()}


# ---- hand-written tensor parallelism (Megatron style) for TP x DP --------------------------------------
class _CopyToTP(torch.autograd.Function):  # identity forward, all-reduce of the input gradient over TP
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):  # all-reduce forward, identity backward
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class TPNet(nn.Module):
    """``make_net()`` split over a TP group, with the same parameter names: layer 0 column-parallel, layer 2
    row-parallel (its bias TP-duplicated), layer 4 TP-duplicated."""

    def __init__(self, tp_group, tp_rank: int, tp: int) -> None:
        super().__init__()
        full = make_net()
        self.group = tp_group
        self.add_module("0", ScaledLinear(6, 16 // tp))
        self.add_module("2", ScaledLinear(16 // tp, 16))
        self.add_module("4", ScaledLinear(16, 3))
        l0, l2, l4 = (self._modules[k] for k in "024")
        with torch.no_grad():
            l0.weight.copy_(full[0].weight.chunk(tp, 0)[tp_rank])
            l0.bias.copy_(full[0].bias.chunk(tp, 0)[tp_rank])
            l2.weight.copy_(full[2].weight.chunk(tp, 1)[tp_rank])
            l2.bias.copy_(full[2].bias)
            l4.load_state_dict(full[4].state_dict())
        for p in (l0.weight, l0.bias, l2.weight):
            p.tensor_model_parallel = True

    def forward(self, x: Tensor) -> Tensor:
        l0, l2, l4 = (self._modules[k] for k in "024")
        h = F.gelu(l0(_CopyToTP.apply(x, self.group)))
        h = _ReduceFromTP.apply(F.linear(h, l2._p("weight")), self.group) + l2._p("bias")
        return l4(F.gelu(h))

    def full_params(self, tp_group, tp: int) -> dict[str, Tensor]:
        """The TP shards gathered back into make_net()'s full parameters."""
        def gather(t: Tensor, dim: int) -> Tensor:
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.detach().contiguous(), group=tp_group)
            return torch.cat(parts, dim)

        l0, l2, l4 = (self._modules[k] for k in "024")
        return {"0.weight": gather(l0.weight, 0), "0.bias": gather(l0.bias, 0), "2.weight": gather(l2.weight, 1),
                "2.bias": l2.bias.detach().clone(), "4.weight": l4.weight.detach().clone(),
                "4.bias": l4.bias.detach().clone()}
