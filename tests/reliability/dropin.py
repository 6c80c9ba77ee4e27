"""The PyTorch drop-in on 4 gloo ranks, one spawned group: cross-rank identity at scale (DDP, FSDP2, TP x DP
from explicit groups), non-finite faults (ZClip and AdaGC, fp32 and bf16, NaN and Inf), the "raise"
policy, and settings that differ between ranks.

Faults and spikes hit one tensor (or one batch) on one rank at seeded random steps, after the gradient
reduction, so only that rank's copy is bad: the worst case for "every rank takes the same action".
"""

from __future__ import annotations

import math
import random

import torch
from torch import nn

from tests.distributed import tp_dp_groups

from .common import Row, fault_plan, row, steps

WORLD = 4
SPIKE = 50.0
ZCLIP = dict(warmup_steps=20, max_grad_norm=None)
ADAGC = dict(warmup_steps=20, max_grad_norm=10.0)
STAT_FIELDS = {"zclip": ("count", "buffer", "mean", "var", "streak"), "adagc": ("count", "gamma", "seen", "streak")}


# ---- models and data -----------------------------------------------------------------------------
def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3)).to(dtype)


def rank_batch(step: int, rank: int, spikes: dict[int, int], dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)
    if spikes.get(step) == rank:
        y = y * SPIKE  # a corrupted batch on this rank only
    return x.to(dtype), y.to(dtype)


def make_clipper(method: str, topology=None, optimizer=None, **overrides):
    from zclip_dist import AdaGC, ZClip
    from zclip_dist.config import AdaGCConfig, ZClipConfig

    if method == "zclip":
        return ZClip(config=ZClipConfig(**{**ZCLIP, **overrides}), topology=topology, optimizer=optimizer)
    return AdaGC(config=AdaGCConfig(**{**ADAGC, **overrides}), topology=topology, optimizer=optimizer)


def state_bytes(clipper) -> list[bytes]:
    return [t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in clipper.clipper.state]


def wrap(model: nn.Module, kind: str) -> nn.Module:
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    fully_shard(model)
    return model


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p.detach()


def local(g: torch.Tensor) -> torch.Tensor:
    return g.to_local() if hasattr(g, "to_local") else g


# ---- 1. cross-rank identity ----------------------------------------------------------------------
def identity_data_parallel(rank: int, kind: str, method: str, n_steps: int, spikes: dict[int, int]) -> dict:
    """DDP or FSDP2 with real backward passes; verify_every (ZClip) would raise on the first divergence."""
    model = wrap(make_model(), kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    extra = {"verify_every": 10} if method == "zclip" else {}
    clip = make_clipper(method, **extra)
    clipped = 0
    for step in range(n_steps):
        x, y = rank_batch(step, rank, spikes)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        clip.step(model)
        opt.step()
        if step in spikes:
            clipped += _clipped(clip)
    return {"state": state_bytes(clip), "clipped_spikes": clipped, "topology": clip.topology.description}


def _clipped(clip) -> int:
    d = clip.last
    return int(bool(d.clipped)) if hasattr(d, "clip_to") else int(bool(d.clipped.any()))


SHAPES = {"col.weight": (8, 6), "col.bias": (8,), "norm.weight": (6,), "row.weight": (6, 8)}
TP_DIM = {"col.weight": 0, "col.bias": 0, "row.weight": 1}  # norm.weight is a TP duplicate


def identity_tp_dp(rank: int, method: str, n_steps: int, spikes: dict[int, int], tp: int = 2) -> dict:
    """TP2 x DP2 from explicit groups, analytic (already DP-reduced) gradients; a spike scales one TP shard."""
    from zclip_dist import Topology

    tp_group, dp_group, tp_rank, dp_rank = tp_dp_groups(WORLD, tp)
    params = {}
    for name, shape in SHAPES.items():
        local_shape = list(shape)
        if name in TP_DIM:
            local_shape[TP_DIM[name]] //= tp
        params[name] = p = nn.Parameter(torch.zeros(local_shape))
        p.tensor_model_parallel = name in TP_DIM
    topo = Topology.from_groups(tp_group=tp_group, dp_group=dp_group)
    extra = {"verify_every": 10} if method == "zclip" else {}
    clip = make_clipper(method, topology=topo, **extra)
    clipped = 0
    for step in range(n_steps):
        gen = torch.Generator().manual_seed(step)
        for name, shape in SHAPES.items():
            g = torch.randn(shape, generator=gen) * 0.1
            params[name].grad = g.chunk(tp, TP_DIM[name])[tp_rank].clone() if name in TP_DIM else g
        if step in spikes and spikes[step] % tp == tp_rank:
            # A bad batch on one rank reaches its DP replicas through the DP reduction: these gradients
            # stand for reduced ones, so that TP rank's shard is scaled on every DP replica.
            params["col.weight"].grad.mul_(SPIKE)
        clip.step(params.values())
        if step in spikes:
            clipped += _clipped(clip)
    return {"state": state_bytes(clip), "clipped_spikes": clipped, "topology": clip.topology.description}


# ---- 2. non-finite faults ------------------------------------------------------------------------
def _stats(clip, method: str) -> list[torch.Tensor]:
    state = clip.clipper.state
    return [getattr(state, f).clone() for f in STAT_FIELDS[method]] if state is not None else []


def nonfinite_faults(rank: int, method: str, dtype_name: str, n_steps: int, faults: dict[int, int],
                     seed: int) -> dict:
    """DDP; at each fault step one rank writes NaN or Inf into one entry of one tensor's gradient."""
    dtype = getattr(torch, dtype_name)
    model = wrap(make_model(dtype), "ddp")
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    clip = make_clipper(method, optimizer=opt)  # optimizer=: a non-finite step is skipped, not zeroed
    rng = random.Random(seed)  # same draws on every rank: which tensor and which value per fault
    names = [n for n, _ in model.named_parameters()]
    out = {"actions": [], "poisoned": [], "unchanged": [], "nonfinite_params": 0, "injected": []}
    for step in range(n_steps):
        x, y = rank_batch(step, rank, {}, dtype)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        before = None
        if step in faults:
            name, where = rng.choice(names), rng.random()
            value = (math.nan, math.inf, -math.inf)[len(out["injected"]) % 3]  # every kind, whatever the seed
            out["injected"].append((step, faults[step], name, value))
            if faults[step] == rank:
                g = local(dict(model.named_parameters())[name].grad)
                g.view(-1)[int(where * g.numel())] = value
            before = (_stats(clip, method), [full(p).clone() for p in model.parameters()])
        clip.step(model)
        m = clip.metrics()
        out["actions"].append((m["nonfinite"], m["skipped"]))
        opt.step()
        if before is not None:
            out["poisoned"].append(not all(torch.equal(a, b) for a, b in zip(before[0], _stats(clip, method))))
            out["unchanged"].append(all(torch.equal(a, full(b)) for a, b in zip(before[1], model.parameters())))
        out["nonfinite_params"] += sum(int(not torch.isfinite(full(p)).all()) for p in model.parameters())
    out["num_nonfinite"] = int(clip.clipper.state.num_nonfinite)
    out["metrics_num_nonfinite"] = clip.metrics().get("num_nonfinite")  # ZClip's metrics carry the counter
    return out


def nonfinite_raise(rank: int, method: str, bad_rank: int, bad_step: int) -> dict:
    model = wrap(make_model(), "ddp")
    clip = make_clipper(method, nonfinite="raise")
    for step in range(bad_step + 1):
        x, y = rank_batch(step, rank, {})
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if step == bad_step and rank == bad_rank:
            model.module[3].bias.grad[0] = math.nan
        try:
            clip.step(model)
        except FloatingPointError as err:
            return {"raised_at": step, "message": str(err)}
    return {"raised_at": None, "message": ""}


# ---- 4. settings that differ between ranks -------------------------------------------------------
def config_mismatch(rank: int, method: str, odd_rank: int, key: str, value) -> dict:
    model = wrap(make_model(), "ddp")
    clip = make_clipper(method, **({key: value} if rank == odd_rank else {}))
    x, y = rank_batch(0, rank, {})
    nn.functional.mse_loss(model(x), y).backward()
    before = [p.grad.clone() for p in model.parameters()]
    try:
        clip.step(model)
    except ValueError as err:
        untouched = all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
        return {"message": str(err), "untouched": untouched and clip.clipper.last is None}
    return {"message": None, "untouched": False}


# ---- the spawned group and the rows --------------------------------------------------------------
def plan(seed: int = 8) -> dict:
    """Everything the group runs, with its seeded spikes and faults (the same dict on every rank)."""
    n_id, n_nf = steps(120), steps(60, 200)
    return {
        "n_id": n_id, "n_nf": n_nf,
        "spikes": fault_plan(seed, n_id, WORLD, count=max(3, n_id // 40), first=30),
        "faults": fault_plan(seed + 1, n_nf, WORLD, count=max(4, n_nf // 15), first=3),
    }


def worker(rank: int, world: int, p: dict) -> dict:
    out = {}
    for kind in ("ddp", "fsdp2"):
        out[f"id/{kind}/zclip"] = identity_data_parallel(rank, kind, "zclip", p["n_id"], p["spikes"])
    out["id/ddp/adagc"] = identity_data_parallel(rank, "ddp", "adagc", p["n_id"], p["spikes"])
    for method in ("zclip", "adagc"):
        out[f"id/tp2dp2/{method}"] = identity_tp_dp(rank, method, p["n_id"], p["spikes"])
        for dtype in ("float32", "bfloat16"):
            out[f"nf/{method}/{dtype}"] = nonfinite_faults(rank, method, dtype, p["n_nf"], p["faults"], seed=11)
        out[f"raise/{method}"] = nonfinite_raise(rank, method, bad_rank=2, bad_step=3)
    out["mismatch/zclip"] = config_mismatch(rank, "zclip", 3, "z_thresh", 3.0)
    out["mismatch/adagc"] = config_mismatch(rank, "adagc", 1, "beta", 0.9)
    return out


def rows_from(results: list[dict], p: dict) -> list[Row]:
    rows = []
    n_spikes, n_faults = len(p["spikes"]), len(p["faults"])
    for key in [k for k in results[0] if k.startswith("id/")]:
        _, layout, method = key.split("/")
        per = [r[key] for r in results]
        same = all(r["state"] == per[0]["state"] for r in per)
        clipped = per[0]["clipped_spikes"]
        check = "verify_every=10 on, " if method == "zclip" else ""
        rows.append(row("identity", f"drop-in {method} {layout} x{WORLD}",
                        f"{p['n_id']} steps, {n_spikes} spikes (x{SPIKE:g}) on random single ranks, {check}"
                        f"final states compared bitwise",
                        {"states identical": same, "spikes clipped": clipped >= n_spikes // 2},
                        f"state bitwise identical on all {WORLD} ranks; {clipped}/{n_spikes} spikes clipped "
                        f"({per[0]['topology']})"))
    for key in [k for k in results[0] if k.startswith("nf/")]:
        _, method, dtype = key.split("/")
        per = [r[key] for r in results]
        actions_same = all(r["actions"] == per[0]["actions"] for r in per)
        flagged = [t for t, (bad, skipped) in enumerate(per[0]["actions"]) if bad and skipped]
        values = sorted({repr(v) for *_, v in per[0]["injected"]})
        rows.append(row("non-finite", f"drop-in {method} ddp x{WORLD} {dtype}",
                        f"{n_faults} faults ({', '.join(values)}) in one entry of one random tensor on one random "
                        f"rank, over {p['n_nf']} steps, nonfinite='skip'",
                        {"every rank same action": actions_same, "each fault flagged+skipped": flagged == sorted(p["faults"]),
                         "statistics untouched": not any(any(r["poisoned"]) for r in per),
                         "update skipped": all(all(r["unchanged"]) for r in per),
                         "no non-finite parameter": all(r["nonfinite_params"] == 0 for r in per),
                         "counted": all(r["num_nonfinite"] == n_faults for r in per)},
                        f"every fault flagged and skipped on all ranks, statistics and parameters unchanged on "
                        f"those steps, num_nonfinite = {per[0]['num_nonfinite']}, reported in metrics()"))
    for method in ("zclip", "adagc"):
        per = [r[f"raise/{method}"] for r in results]
        msg = per[0]["message"]
        rows.append(row("non-finite", f"drop-in {method} ddp x{WORLD}",
                        "NaN in one gradient on rank 2 at step 3, nonfinite='raise'",
                        {"every rank raised at that step": all(r["raised_at"] == 3 for r in per),
                         "message names the cause and the policy": "non-finite gradient norm" in msg
                         and "nonfinite='raise'" in msg},
                        f"FloatingPointError on every rank: \"{msg}\""))
    for method, key, odd in (("zclip", "z_thresh", 3), ("adagc", "beta", 1)):
        per = [r[f"mismatch/{method}"] for r in results]
        msg = per[0]["message"] or ""
        rows.append(row("bad input", f"drop-in {method} ddp x{WORLD}",
                        f"{key} different on rank {odd} only",
                        {"every rank raised": all(r["message"] == msg and msg for r in per),
                         "names key and rank": key in msg and f"rank(s) [{odd}]" in msg,
                         "before the first update": all(r["untouched"] for r in per)},
                        f"ConfigError at the first step on every rank, gradients untouched: \"{msg}\""))
    return rows


def run() -> list[Row]:
    from tests.distributed import run_ranks

    p = plan()
    return rows_from(run_ranks(worker, WORLD, p), p)
