"""AdaGC: the vectorised, sharded, sync-free version against the official patch's semantics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from zclip_dist import AdaGC, Topology
from zclip_dist.config import AdaGCConfig, ConfigError

from .adagc_reference import AdaGCReference
from .distributed import run_ranks, tp_dp_groups
from .sync_guard import count_host_reads

STEPS = 240
SHAPES = {"col.weight": (8, 6), "col.bias": (8,), "norm.weight": (6,), "norm.bias": (6,), "row.weight": (6, 8)}
TP_DIM = {"col.weight": 0, "col.bias": 0, "row.weight": 1}
CFG = dict(warmup_steps=30, clip_ratio=1.05, beta=0.95, max_grad_norm=2.0)


def full_grads(step: int) -> dict[str, torch.Tensor]:
    """Per-tensor regimes with rises, and spikes in single tensors (in one TP rank's slice)."""
    gen = torch.Generator().manual_seed(step)
    scale = {n: 0.1 * (1 + 0.3 * i) for i, n in enumerate(SHAPES)}
    grads = {n: torch.randn(s, generator=gen) * scale[n] for n, s in SHAPES.items()}
    if step % 37 == 5 and step > CFG["warmup_steps"]:
        grads["row.weight"][:, -1] *= 40.0  # last TP rank's shard
    if step % 53 == 7:
        grads["norm.weight"] *= 25.0  # a TP-replicated tensor
    if step > 150:
        grads["col.bias"] *= 3.0  # a permanent rise: gamma has to follow it slowly
    return grads


def reference_run(mode: str = "adagc", steps: int = STEPS, cap: float | None = CFG["max_grad_norm"]):
    # max_grad_norm None (no warmup clip) is the patch with lambda_abs = inf
    ref = AdaGCReference(mode=mode, **{**CFG, "max_grad_norm": math.inf if cap is None else cap})
    out = []
    for t in range(steps):
        grads = full_grads(t)
        ref(grads)
        out.append(grads)
    return ref, out


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return bool(torch.allclose(a, b, rtol=rel, atol=1e-7 * float(b.abs().max().clamp(min=1e-30))))


@pytest.mark.parametrize("cap", [CFG["max_grad_norm"], None])
@pytest.mark.parametrize("mode", ["adagc", "adagc-global"])
def test_single_process_matches_official_semantics(mode, cap):
    ref, ref_grads = reference_run(mode, cap=cap)
    params = {n: nn.Parameter(torch.zeros(s)) for n, s in SHAPES.items()}
    module = nn.Module()
    for n, p in params.items():
        module.register_parameter(n.replace(".", "_"), p)
    ours = AdaGC(mode=mode, **{**CFG, "max_grad_norm": cap})
    clipped_after_warmup = 0
    for t in range(STEPS):
        for n, g in full_grads(t).items():
            params[n].grad = g
        with count_host_reads(fail=True):
            ours.step(module)
        for n in SHAPES:
            assert close(params[n].grad, ref_grads[t][n]), (t, n)
        if t >= CFG["warmup_steps"]:
            clipped_after_warmup += bool(ours.last.clipped.any())
    assert clipped_after_warmup > 10
    gammas = ours.state_dict()["gamma"]
    for name, value in ref.gamma.items():
        key = name if mode == "adagc-global" else name.replace(".", "_")
        assert math.isclose(gammas[key][0], value, rel_tol=1e-5), name


def _adagc_worker(rank: int, world: int, tp: int, layout: str, nan_step: int):
    dp = world // tp
    tp_group, dp_group, tp_rank, dp_rank = tp_dp_groups(world, tp)
    sharded = layout == "dp_sharded"  # distributed-optimizer style: DP ranks hold disjoint slices too
    params, slices = {}, {}
    for name, shape in SHAPES.items():
        dim = TP_DIM.get(name)
        local = torch.zeros(shape)
        sl = [slice(None)] * len(shape)
        if dim is not None:
            sl[dim] = slice(tp_rank * shape[dim] // tp, (tp_rank + 1) * shape[dim] // tp)
        local = local[tuple(sl)]
        if sharded:  # then split the flattened TP shard over DP
            n = local.numel()
            chunk = (n + dp - 1) // dp
            lo, hi = min(dp_rank * chunk, n), min((dp_rank + 1) * chunk, n)
            slices[name] = (tuple(sl), lo, hi)
            local = torch.zeros(hi - lo)
        else:
            slices[name] = (tuple(sl), None, None)
        p = nn.Parameter(local.clone())
        if dim is not None:
            p.tensor_model_parallel = True
        params[name] = p
    topo = Topology.from_groups(tp_group=tp_group, dp_group=dp_group, dp_sharded=sharded)
    module = nn.Module()
    for n, p in params.items():
        module.register_parameter(n.replace(".", "_"), p)
    ada = AdaGC(**CFG, topology=topo)
    calls = []
    orig = dist.all_reduce

    def counting(*a, **k):
        calls.append(k.get("group"))
        return orig(*a, **k)

    out = []
    for t in range(STEPS):
        for name, g in full_grads(t).items():
            sl, lo, hi = slices[name]
            piece = g[sl].reshape(-1)[lo:hi] if sharded else g[sl]
            params[name].grad = piece.clone()
        if t == nan_step and rank == world - 1:
            params["col.weight"].grad.view(-1)[0] = math.nan
        calls.clear()
        dist.all_reduce = counting
        try:
            with count_host_reads(fail=True):
                ada.step(module)
        finally:
            dist.all_reduce = orig
        assert len(calls) == 1, f"{len(calls)} collectives in one step"
        out.append({n: p.grad.clone() for n, p in params.items()})
    return {"grads": out, "slices": slices, "state": ada.state_dict(), "nonfinite": int(ada.clipper.state.num_nonfinite)}


@pytest.mark.slow
@pytest.mark.parametrize("tp,world,layout", [(2, 2, "replicated"), (2, 4, "replicated"), (2, 4, "dp_sharded")])
def test_distributed_matches_single_process_reference(tp, world, layout):
    nan_step = 100
    results = run_ranks(_adagc_worker, world, tp, layout, nan_step)
    # reference: the same stream without the NaN step (it never enters gamma; its update is skipped)
    ref = AdaGCReference(**CFG)
    ref_grads = []
    for t in range(STEPS):
        grads = full_grads(t)
        if t != nan_step:
            ref(grads)
        ref_grads.append(grads)
    for r, res in enumerate(results):
        assert res["nonfinite"] == 1
        assert res["state"]["gamma"] == results[0]["state"]["gamma"], f"rank {r} gamma differs"
        for t in range(STEPS):
            for name, got in res["grads"][t].items():
                if t == nan_step:
                    assert torch.count_nonzero(got) == 0  # skipped on every rank
                    continue
                sl, lo, hi = res["slices"][name]
                want = ref_grads[t][name][sl]
                want = want.reshape(-1)[lo:hi] if lo is not None else want
                assert close(got, want), (r, t, name)
    for name, value in ref.gamma.items():
        assert math.isclose(results[0]["state"]["gamma"][name.replace(".", "_")][0], value, rel_tol=1e-5)


def test_resume_by_name_equals_uninterrupted_run():
    def run(ada, steps, params):
        seen = []
        for t in steps:
            for n, g in full_grads(t).items():
                params[n].grad = g
            ada.step(list(params.values()))
            seen.append(ada.last.coefs.clone())
        return seen

    def fresh():
        return {n: nn.Parameter(torch.zeros(s)) for n, s in SHAPES.items()}

    full = run(AdaGC(**CFG), range(120), fresh())
    first = AdaGC(**CFG)
    head = run(first, range(60), fresh())
    saved = copy.deepcopy(first.state_dict())
    resumed = AdaGC(**CFG)
    resumed.load_state_dict(saved)
    tail = run(resumed, range(60, 120), fresh())
    assert all(torch.equal(a, b) for a, b in zip(head + tail, full))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"adagc\.clip_ratio = 0\.9 .*\[1, inf\)"):
        AdaGCConfig(clip_ratio=0.9)
    with pytest.raises(ConfigError, match=r"adagc\.mode = 'AdaGC' .*'adagc', 'adagc-global'"):
        AdaGCConfig(mode="AdaGC")
