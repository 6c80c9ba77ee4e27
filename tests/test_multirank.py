"""Multi-rank gloo runs of the drop-in against single-process oracles.

Each layout trains (or feeds gradients) for 200 steps with a spike on one rank only and checks:
the global norm of every step equals the norm of the same full gradient computed in one process
(rel <= 1e-5), the coefficients equal the reference ``zclip`` package fed those oracle norms, and every
rank ends with a bitwise-identical state. Non-finite values are injected on a single rank, including a
rank whose copy does not count toward the norm.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from zclip_dist import Topology, ZClip
from zclip_dist.config import ZClipConfig

from .distributed import run_ranks, tp_dp_groups
from .oracle import ReferenceOracle

STEPS = 200
SPIKE_STEP = 120
CFG = dict(max_grad_norm=None, warmup_steps=20)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))


def rank_batch(step: int, rank: int, spike_rank: int):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)
    if step == SPIKE_STEP and rank == spike_rank:
        y = y * 50.0  # a corrupted batch on one rank only
    return x, y


def state_tuple(zc: ZClip) -> list[torch.Tensor]:
    return [t.clone() for t in zc.clipper.state] if zc.clipper.state is not None else []


def assert_states_identical(results):
    first = results[0]["state"]
    for r, res in enumerate(results[1:], 1):
        for a, b in zip(first, res["state"]):
            assert torch.equal(a, b), f"rank {r} state differs from rank 0"


def check_against_oracle(oracle_norms, results, cfg=ZClipConfig(**CFG)):
    ref = ReferenceOracle(cfg)
    for t, g in enumerate(oracle_norms):
        ref_coef = ref.step(g)
        for r, res in enumerate(results):
            assert math.isclose(res["norms"][t], g, rel_tol=1e-5), (t, r, res["norms"][t], g)
            assert math.isclose(res["coefs"][t], ref_coef, rel_tol=1e-5), (t, r, res["coefs"][t], ref_coef)
    assert any(c < 1 for c in results[0]["coefs"][SPIKE_STEP:SPIKE_STEP + 1]), "the spike was not clipped"


# ---- DDP and FSDP2: real model, real backward ------------------------------------------------------
def _train(rank: int, world: int, wrap: str, nan_step: int):
    model = make_model()
    if wrap == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    zc = ZClip(**CFG)
    out = {"norms": [], "coefs": [], "params": [], "nonfinite": []}
    for step in range(STEPS):
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
        out["params"].append([t.clone() for t in full])
        x, y = rank_batch(step, rank, spike_rank=world - 1)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if step == nan_step and rank == world - 1:  # after the reduction: only this rank's copy is bad
            g = next(model.parameters()).grad
            (g.to_local() if hasattr(g, "to_local") else g).view(-1)[0] = math.nan
        before = state_tuple(zc)
        norm = zc.step(model)
        m = zc.metrics()
        if m["nonfinite"]:
            assert all(torch.equal(a, b) for a, b in zip(before[:4], state_tuple(zc)[:4]))
        out["norms"].append(float(norm))
        out["coefs"].append(m["coef"])
        out["nonfinite"].append(m["nonfinite"])
        opt.step()
        assert all(torch.isfinite(p.full_tensor() if hasattr(p, "full_tensor") else p).all() for p in model.parameters())
    out["state"] = state_tuple(zc)
    out["topology"] = zc.topology.description
    return out


def _oracle_norms(params_per_step, world: int) -> list[float]:
    """Single process, full model: the gradient of the mean loss over all ranks' batches."""
    model = make_model()
    norms = []
    for step, params in enumerate(params_per_step):
        with torch.no_grad():
            for p, v in zip(model.parameters(), params):
                p.copy_(v)
        model.zero_grad()
        xs, ys = zip(*(rank_batch(step, r, spike_rank=world - 1) for r in range(world)))
        nn.functional.mse_loss(model(torch.cat(xs)), torch.cat(ys)).backward()
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
    return norms


@pytest.mark.slow
@pytest.mark.parametrize("wrap,world", [("ddp", 2), ("ddp", 4), ("fsdp2", 2), ("fsdp2", 4)])
def test_data_parallel_layouts_match_single_process(wrap, world):
    nan_step = 160
    results = run_ranks(_train, world, wrap, nan_step)
    assert_states_identical(results)
    for res in results:
        assert res["nonfinite"][nan_step] and sum(res["nonfinite"]) == 1  # every rank saw it, once
        assert torch.equal(torch.tensor(res["coefs"][nan_step]), torch.tensor(0.0))
    expected_kind = "data_parallel" if wrap == "ddp" else "mesh"
    assert results[0]["topology"].startswith(expected_kind)
    oracle = _oracle_norms(results[0]["params"], world)
    oracle[nan_step] = results[0]["norms"][nan_step]  # NaN step: compared through the flag above
    finite = [t for t in range(STEPS) if t != nan_step]
    for t in finite:
        for r, res in enumerate(results):
            assert math.isclose(res["norms"][t], oracle[t], rel_tol=1e-5), (t, r, res["norms"][t], oracle[t])
    # decisions: the reference package fed the oracle norms (the NaN step is not fed: it never enters)
    ref = ReferenceOracle(ZClipConfig(**CFG))
    for t in finite:
        ref_coef = ref.step(oracle[t])
        assert math.isclose(results[0]["coefs"][t], ref_coef, rel_tol=1e-5), (t, results[0]["coefs"][t], ref_coef)
    assert results[0]["coefs"][SPIKE_STEP] < 1, "the spike was not clipped"


# ---- tensor parallel from explicit groups, with analytic gradients ----------------------------------
SHAPES = {"col.weight": (8, 6), "col.bias": (8,), "norm.weight": (6,), "norm.bias": (6,), "row.weight": (6, 8)}
TP_DIM = {"col.weight": 0, "col.bias": 0, "row.weight": 1}  # others are TP-replicated (LayerNorm-like)


def full_grads(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    grads = {n: torch.randn(s, generator=gen) * 0.1 for n, s in SHAPES.items()}
    if step == SPIKE_STEP:
        grads["row.weight"][:, -1] *= 300.0  # lives in the last TP rank's shard only
    return grads


def _tp_worker(rank: int, world: int, tp: int, nan_steps: dict):
    tp_group, dp_group, tp_rank, dp_rank = tp_dp_groups(world, tp)
    params = {}
    for name, shape in SHAPES.items():
        dim = TP_DIM.get(name)
        local = list(shape)
        if dim is not None:
            local[dim] //= tp
        p = nn.Parameter(torch.zeros(local))
        if dim is not None:
            p.tensor_model_parallel = True
        params[name] = p
    topo = Topology.from_groups(tp_group=tp_group, dp_group=dp_group)
    zc = ZClip(**CFG, topology=topo)
    out = {"norms": [], "coefs": [], "nonfinite": []}
    for step in range(STEPS):
        for name, g in full_grads(step).items():
            dim = TP_DIM.get(name)
            params[name].grad = g.chunk(tp, dim)[tp_rank].clone() if dim is not None else g.clone()
        where = nan_steps.get(step)
        if where is not None and where[0] == rank:
            params[where[1]].grad.view(-1)[0] = where[2]
        before = state_tuple(zc)
        norm = zc.step(list(params.values()))
        m = zc.metrics()
        out["norms"].append(float(norm))
        out["coefs"].append(m["coef"])
        out["nonfinite"].append(m["nonfinite"])
        if m["nonfinite"]:
            assert all(torch.equal(a, b) for a, b in zip(before[:4], state_tuple(zc)[:4]))
            assert all(torch.count_nonzero(p.grad) == 0 for p in params.values()), "gradients not zeroed"
    out["state"] = state_tuple(zc)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp,world", [(2, 2), (2, 4)])
def test_tensor_parallel_groups_match_full_gradient(tp, world):
    # NaN in a counted shard of the last rank; Inf in a TP-duplicate copy that does *not* count (TP rank 1)
    nan_steps = {60: (world - 1, "col.weight", math.nan), 90: (1, "norm.weight", math.inf)}
    results = run_ranks(_tp_worker, world, tp, nan_steps)
    assert_states_identical(results)
    for res in results:
        assert [t for t, bad in enumerate(res["nonfinite"]) if bad] == sorted(nan_steps)
    oracle = [float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in full_grads(t).values()])))
              for t in range(STEPS)]
    # drop the non-finite steps (they never enter the statistics) and compare the rest step by step
    keep = [t for t in range(STEPS) if t not in nan_steps]
    trimmed = [{k: ([v[t] for t in keep] if k != "state" else v) for k, v in res.items()} for res in results]
    spike_pos = keep.index(SPIKE_STEP)
    ref = ReferenceOracle(ZClipConfig(**CFG))
    for i, t in enumerate(keep):
        ref_coef = ref.step(oracle[t])
        for r, res in enumerate(trimmed):
            assert math.isclose(res["norms"][i], oracle[t], rel_tol=1e-5), (t, r, res["norms"][i], oracle[t])
            assert math.isclose(res["coefs"][i], ref_coef, rel_tol=1e-5), (t, r)
    assert trimmed[0]["coefs"][spike_pos] < 0.1, "the spike was not clipped"


# ---- the runtime identity check ---------------------------------------------------------------------
def _diverging(rank: int, world: int):
    """Rank 1 is fed a different norm at step 7 (what a wrong topology would do); verify_every=5 catches it."""
    from zclip_dist.clipper import Clipper

    clipper = Clipper(ZClipConfig(warmup_steps=3, verify_every=5), device="cpu")
    for step in range(1, 13):
        norm = 1.0 + 0.01 * step + (0.5 if (rank == 1 and step == 7) else 0.0)
        try:
            clipper.step(torch.tensor(norm, dtype=torch.float64))
        except RuntimeError as err:
            return step, str(err)
    return None, ""


@pytest.mark.slow
def test_verify_every_names_the_diverging_rank():
    results = run_ranks(_diverging, 3)
    for step, message in results:  # every rank raises at the first check after the divergence
        assert step == 10 and "rank(s) [1]" in message, (step, message)
