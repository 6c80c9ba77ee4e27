"""DeepSpeed 0.19.8 engines on 2 gloo ranks, one spawned group (tests/ds_harness.py's model, data and rank
set-up): cross-rank identity on ZeRO-2 at scale, NaN/Inf faults on ZeRO-0 fp32 (no wrapper), ZeRO-2 fp32
and ZeRO-2 bf16, the "raise" policy, fp16 loss-scale overflows under "raise", settings differing between
ranks, a refused engine combination, and the checkpoint edge cases (no ZClip state, a newer state format,
attach() after load_checkpoint).

Faults go in through a gradient hook on one tensor on one rank, i.e. before DeepSpeed's own reduction:
the realistic place (a bad micro-batch on one rank), and DeepSpeed's reduction then spreads it.
"""

from __future__ import annotations

import math
import random
import warnings

import torch
import torch.nn.functional as F

from tests import ds_harness as H

from .common import Row, fault_plan, row, steps

WORLD = 2
ZCLIP = {"alpha": 0.9, "z_thresh": 2.5, "warmup_steps": 5}
Z2 = {"zero_optimization": {"stage": 2}}
NONFINITE_PATHS = {"ZeRO-0 fp32 (no wrapper)": ({}, False), "ZeRO-2 fp32": (Z2, False), "ZeRO-2 bf16": (Z2, True)}
STATS = ("count", "buffer", "mean", "var", "streak")


def engine_for(zclip: dict | None, ds: dict, bf16: bool = False, model=None, fp16: dict | None = None):
    import deepspeed.utils.groups

    from zclip_dist import deepspeed as zds

    deepspeed.utils.groups.mpu = None  # a previous engine's mpu leaks into the next (ds_harness notes)
    case = H.Case("reliability", {**ds, "steps_per_print": 1}, zclip=zclip, bf16=bf16, fp16=fp16)
    if fp16 is not None:
        H.allow_fp16_on_cpu()
    model = model or H.mlp()
    engine, *_ = zds.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                                config=H.ds_config(case))
    return engine


def train_step(engine, step: int, rank: int, spikes: dict[int, int] | None = None, bf16: bool = False,
               dtype: torch.dtype | None = None) -> None:
    x, y = H.adagc_batch(step, rank)
    if spikes and spikes.get(step) == rank:
        x, y = x * H.SPIKE, y * H.SPIKE
    dtype = dtype or (torch.bfloat16 if bf16 else torch.float32)
    engine.backward(F.mse_loss(engine(x.to(dtype)), y.to(dtype)))
    engine.step()


# ---- 1. identity ----------------------------------------------------------------------------------
def identity(rank: int, n_steps: int, spikes: dict[int, int]) -> dict:
    engine = engine_for({**ZCLIP, "verify_every": 10}, Z2)
    clipped = 0
    for step in range(n_steps):
        train_step(engine, step, rank, spikes)
        clipped += step in spikes and engine._zclip.metrics()["clipped"]
    state = engine._zclip.state_dict()["state"]
    return {"state": {k: v.numpy().tobytes() for k, v in state.items()}, "clipped": clipped,
            "optimizer": type(engine.optimizer).__name__}


# ---- 2. non-finite faults -------------------------------------------------------------------------
def _fault_hooks(engine, rank: int, faults: dict[int, int], clock: list[int], seed: int) -> list:
    """One tensor's gradient gets NaN/+-Inf at each fault step on that step's rank; returns the plan."""
    rng = random.Random(seed)
    names = [n for n, _ in engine.module.named_parameters()]
    values = (math.nan, math.inf, -math.inf)  # in turn: every kind is hit whatever the seed
    chosen = {s: (rng.choice(names), values[i % 3]) for i, s in enumerate(sorted(faults))}

    def make(name):
        def hook(grad):
            hit = chosen.get(clock[0])
            if hit is None or hit[0] != name or faults[clock[0]] != rank:
                return grad
            grad = grad.clone()
            grad.view(-1)[0] = hit[1]
            return grad
        return hook

    for name, p in engine.module.named_parameters():
        p.register_hook(make(name))
    return [(s, faults[s], *chosen[s]) for s in sorted(faults)]


def nonfinite(rank: int, ds: dict, bf16: bool, n_steps: int, faults: dict[int, int], policy: str = "skip") -> dict:
    engine = engine_for({**ZCLIP, "nonfinite": policy}, ds, bf16)
    monitor = engine.monitor = H.Monitor()
    clock = [0]
    injected = _fault_hooks(engine, rank, faults, clock, seed=5)
    out = {"actions": [], "poisoned": [], "unchanged": [], "nonfinite_params": 0, "injected": injected,
           "raised": None}
    clipper = engine._zclip.clipper
    for step in range(n_steps):
        clock[0] = step
        before = None
        if step in faults and clipper.state is not None:
            before = ([getattr(clipper.state, f).clone() for f in STATS], H.master_weights(engine))
        try:
            train_step(engine, step, rank, bf16=bf16)
        except FloatingPointError as err:
            out["raised"] = (step, str(err))
            return out
        m = engine._zclip.metrics()
        out["actions"].append((m["nonfinite"], m["skipped"]))
        weights = H.master_weights(engine)
        if before is not None:
            out["poisoned"].append(not all(torch.equal(a, getattr(clipper.state, f)) for a, f in zip(before[0], STATS)))
            out["unchanged"].append(all(torch.equal(before[1][k], weights[k]) for k in weights))
        out["nonfinite_params"] += sum(int(not torch.isfinite(w).all()) for w in weights.values())
    out["num_nonfinite"] = int(clipper.state.num_nonfinite)
    out["skipped_steps"] = engine.skipped_steps
    logged = [v for name, v, _ in monitor.events if name == "Train/zclip/num_nonfinite"]
    out["logged_num_nonfinite"] = logged[-1] if logged else None
    return out


def fp16_overflows(rank: int, n_steps: int, spikes: dict[int, int]) -> dict:
    """fp16 ZeRO-2 at loss scale 4096: a x30 spike overflows fp16, DeepSpeed skips the step and halves the
    scale. Under nonfinite='raise' nothing may raise; the statistics must not move."""
    fp16 = {"initial_scale_power": 12, "hysteresis": 1, "loss_scale_window": 1000}
    engine = engine_for({**ZCLIP, "nonfinite": "raise"}, Z2, fp16=fp16)
    clipper = engine._zclip.clipper
    out = {"overflow_steps": [], "norms": [], "untouched": [], "raised": None}
    for step in range(n_steps):
        before = [getattr(clipper.state, f).clone() for f in STATS]
        skipped = engine.skipped_steps
        try:
            train_step(engine, step, rank, spikes, dtype=torch.float16)
        except FloatingPointError as err:
            out["raised"] = str(err)
            return out
        if engine.skipped_steps > skipped:
            out["overflow_steps"].append(step)
            out["norms"].append(engine._zclip.metrics()["grad_norm"])
            out["untouched"].append(all(torch.equal(a, getattr(clipper.state, f)) for a, f in zip(before, STATS)))
    return out


# ---- 3 and 4: checkpoint edge cases, refusals, differing settings --------------------------------
def attach_after_load(rank: int, root: str) -> dict:
    """attach() after load_checkpoint: restored on an engine zclip_dist built, refused on one it did not."""
    import deepspeed

    from zclip_dist import deepspeed as zds

    engine = engine_for(ZCLIP, {})
    for step in range(8):
        train_step(engine, step, rank)
    saved = engine._zclip.state_dict()["state"]
    engine.save_checkpoint(f"{root}/late")
    late = engine_for(None, {})
    late.load_checkpoint(f"{root}/late")
    state = zds.attach(late, ZCLIP).state_dict()["state"]
    out = {"restored": all(torch.equal(v, state[k]) for k, v in saved.items())}
    model = H.mlp()
    initialize = getattr(deepspeed, "_zclip_dist_original_initialize", deepspeed.initialize)
    config = {k: v for k, v in H.ds_config(H.Case("plain", {}, zclip=None)).items()}
    plain, *_ = initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), config=config)
    plain.load_checkpoint(f"{root}/late")
    try:
        zds.attach(plain, ZCLIP)
        out["refused"] = None
    except ValueError as err:
        out["refused"] = str(err)
    return out



def checkpoints(rank: int, root: str) -> dict:
    """A checkpoint written without ZClip must warn and start from warmup; a newer ZClip state must fail."""
    from zclip_dist.clipper import STATE_VERSION

    plain = engine_for(None, {})
    for step in range(3):
        train_step(plain, step, rank)
    plain.save_checkpoint(f"{root}/plain")
    engine = engine_for(ZCLIP, {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.load_checkpoint(f"{root}/plain")
    warned = [str(w.message) for w in caught if "state" in str(w.message) and "zclip" in str(w.message).lower()]
    fresh = engine._zclip.clipper.state is None or int(engine._zclip.clipper.state.count) == 0
    clipper = engine._zclip.clipper
    original = clipper.state_dict
    clipper.state_dict = lambda: {**original(), "version": STATE_VERSION + 1}  # written by a future release
    engine.save_checkpoint(f"{root}/future")
    newer = None
    try:
        engine_for(ZCLIP, {}).load_checkpoint(f"{root}/future")
    except ValueError as err:
        newer = str(err)
    return {"warned": [w.replace(root, "<dir>") for w in warned], "fresh": fresh, "newer": newer}


def refusals(rank: int) -> dict:
    from zclip_dist.deepspeed import UnsupportedConfiguration

    out = {}
    autocast = {**Z2, "torch_autocast": {"enabled": True, "dtype": "torch.float16"}}
    try:
        engine_for(ZCLIP, autocast)
        out["autocast"] = None
    except UnsupportedConfiguration as err:
        out["autocast"] = str(err)
    engine = engine_for({**ZCLIP, "z_thresh": 3.0} if rank == 1 else ZCLIP, Z2)
    try:
        train_step(engine, 0, rank)
        out["mismatch"] = None
    except ValueError as err:
        out["mismatch"] = str(err)
    out["mismatch_untouched"] = engine._zclip.clipper.last is None  # raised before any decision
    return out


# ---- the spawned group and the rows --------------------------------------------------------------
def plan(seed: int = 18) -> dict:
    n_id, n_nf = steps(60), steps(30, 150)
    return {"n_id": n_id, "n_nf": n_nf,
            "spikes": fault_plan(seed, n_id, WORLD, count=max(3, n_id // 40), first=12),
            "faults": fault_plan(seed + 1, n_nf, WORLD, count=max(3, n_nf // 12), first=7)}


def group(rank: int, world: int, p: dict, root: str) -> dict:
    warnings.filterwarnings("ignore", category=FutureWarning)
    out = {"identity": identity(rank, p["n_id"], p["spikes"])}
    for name, (ds, bf16) in NONFINITE_PATHS.items():
        out[f"nf/{name}"] = nonfinite(rank, ds, bf16, p["n_nf"], p["faults"])
    for name, ds in (("ZeRO-0 fp32", {}), ("ZeRO-2 fp32", Z2)):
        out[f"raise/{name}"] = nonfinite(rank, ds, False, p["n_nf"], p["faults"], policy="raise")
    out["fp16"] = fp16_overflows(rank, p["n_id"], p["spikes"])
    out["checkpoints"] = checkpoints(rank, root)
    out["late"] = attach_after_load(rank, root)
    out["refusals"] = refusals(rank)
    return out


def rows_from(results: list[dict], p: dict) -> list[Row]:
    rows = []
    ident = [r["identity"] for r in results]
    n_spikes = len(p["spikes"])
    rows.append(row("identity", f"DeepSpeed ZeRO-2 fp32 x{WORLD} ({ident[0]['optimizer']})",
                    f"{p['n_id']} steps, {n_spikes} spikes (x{H.SPIKE:g} batch) on random single ranks, "
                    "verify_every=10 on, final states compared bitwise",
                    {"states identical": all(r["state"] == ident[0]["state"] for r in ident),
                     "spikes clipped": ident[0]["clipped"] >= n_spikes // 2},
                    f"state bitwise identical on both ranks; {ident[0]['clipped']}/{n_spikes} spikes clipped"))
    n_faults = len(p["faults"])
    for name in NONFINITE_PATHS:
        per = [r[f"nf/{name}"] for r in results]
        flagged = [t for t, (bad, skipped) in enumerate(per[0]["actions"]) if bad and skipped]
        values = sorted({repr(v) for *_, v in per[0]["injected"]})
        rows.append(row("non-finite", f"DeepSpeed {name} x{WORLD}",
                        f"{n_faults} faults ({', '.join(values)}) in one random tensor's gradient on one random "
                        f"rank (before DeepSpeed's reduction), over {p['n_nf']} steps, nonfinite='skip'",
                        {"every rank same action": all(r["actions"] == per[0]["actions"] for r in per),
                         "each fault flagged+skipped": flagged == sorted(p["faults"]),
                         "statistics untouched": not any(any(r["poisoned"]) for r in per),
                         "update skipped": all(all(r["unchanged"]) for r in per),
                         "no non-finite parameter": all(r["nonfinite_params"] == 0 for r in per),
                         "counted": all(r["num_nonfinite"] == n_faults == r["skipped_steps"] for r in per),
                         "logged": per[0]["logged_num_nonfinite"] == n_faults},
                        f"skipped on both ranks (engine.skipped_steps = {per[0]['skipped_steps']}), statistics and "
                        f"weights unchanged, num_nonfinite = {per[0]['num_nonfinite']}, written to the monitor as "
                        "Train/zclip/num_nonfinite"))
    first_fault = min(p["faults"])
    for name in ("ZeRO-0 fp32", "ZeRO-2 fp32"):
        per = [r[f"raise/{name}"] for r in results]
        raised = [r["raised"] for r in per]
        msg = raised[0][1] if raised[0] else ""
        rows.append(row("non-finite", f"DeepSpeed {name} x{WORLD}",
                        "the same faults, nonfinite='raise'",
                        {"every rank raised at the first fault": all(x and x[0] == first_fault for x in raised),
                         "message names the cause and the policy": "non-finite gradient norm" in msg
                         and "nonfinite='raise'" in msg},
                        f"FloatingPointError on both ranks at step {first_fault}: \"{msg}\""))
    per = [r["fp16"] for r in results]
    n_over = len(per[0]["overflow_steps"])
    rows.append(row("non-finite", f"DeepSpeed ZeRO-2 fp16 x{WORLD}",
                    f"{len(p['spikes'])} x{H.SPIKE:g} spikes over {p['n_id']} steps at dynamic fp16 loss scale 4096 "
                    "(a spike overflows fp16 until the scale has dropped far enough), nonfinite='raise'",
                    {"nothing raised": all(r["raised"] is None for r in per),
                     "overflows happened": n_over >= len(p["spikes"]) // 2,
                     "same steps on every rank": all(r["overflow_steps"] == per[0]["overflow_steps"] for r in per),
                     "recorded as inf": all(v == math.inf for r in per for v in r["norms"]),
                     "statistics untouched": all(all(r["untouched"]) for r in per)},
                    f"{n_over} loss-scale overflows skipped by DeepSpeed on both ranks, recorded as grad_norm = inf, "
                    "statistics unchanged, no FloatingPointError (an overflow is routine under dynamic loss scaling)"))
    ck = [r["checkpoints"] for r in results]
    rows.append(row("restart", f"DeepSpeed ZeRO-0 x{WORLD}", "load_checkpoint of a checkpoint written without ZClip",
                    {"warned on every rank": all(c["warned"] for c in ck), "fresh warmup": all(c["fresh"] for c in ck)},
                    f"UserWarning \"{ck[0]['warned'][0] if ck[0]['warned'] else ''}\", warmup starts again"))
    msg = ck[0]["newer"] or ""
    rows.append(row("restart", f"DeepSpeed ZeRO-0 x{WORLD}", "load_checkpoint of a ZClip state with a newer version",
                    {"refused on every rank": all(c["newer"] for c in ck), "clear message": "newer than this" in msg},
                    f"ValueError: \"{msg}\""))
    late = [r["late"] for r in results]
    msg = late[0]["refused"] or ""
    rows.append(row("restart", f"DeepSpeed ZeRO-0 x{WORLD}", "attach() after engine.load_checkpoint()",
                    {"restored (engine from zclip_dist's initialize)": all(x["restored"] for x in late),
                     "refused, not reset (engine it never saw load)": all(x["refused"] for x in late)
                     and "client_state" in msg},
                    "the saved ZClip state restored bitwise; on an engine built by DeepSpeed's own initialize: "
                    f"UnsupportedConfiguration \"{msg}\""))
    ref = [r["refusals"] for r in results]
    msg = ref[0]["autocast"] or ""
    rows.append(row("bad input", f"DeepSpeed x{WORLD}", "torch_autocast fp16 with ZeRO-2",
                    {"refused at initialize": all(r["autocast"] for r in ref),
                     "names the combination and the way out": "torch_autocast" in msg and "bf16" in msg},
                    f"UnsupportedConfiguration: \"{msg}\""))
    msg = ref[0]["mismatch"] or ""
    rows.append(row("bad input", f"DeepSpeed ZeRO-2 x{WORLD}", "zclip.z_thresh different on rank 1 only",
                    {"every rank raised": all(r["mismatch"] == msg and msg for r in ref),
                     "names key and rank": "z_thresh" in msg and "rank(s) [1]" in msg,
                     "before the first update": all(r["mismatch_untouched"] for r in ref)},
                    f"ConfigError at the first step on both ranks: \"{msg}\""))
    return rows


def run() -> list[Row]:
    import tempfile

    from tests.distributed import run_ranks

    p = plan()
    with tempfile.TemporaryDirectory() as root:
        return rows_from(run_ranks(H.call_in_rank, WORLD, group, p, root, init=False), p)
