"""Spike forensics against single-process oracles.

Multi-rank (gloo): DDP x4, FSDP2 x2, TP2 x DP2 from explicit groups (DDP over the DP group). A spike is
injected into one named parameter on one known replica before the data-parallel reduction, and later a
NaN into another parameter on another replica. The recorded events must name that parameter and that
replica first, with shares equal to the full-model computation in one process (``forensics_models.oracle``);
there must be no event on any other step, and no host read in any ordinary step (backward with the
measuring comm hook included). Single process: the math, the ring buffer, the JSON-lines field, AdaGC.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from zclip_dist import AdaGC, Topology, ZClip
from zclip_dist.config import ConfigError
from zclip_dist.forensics import Event, format_events, logical_name, top_shares

from . import forensics_models as fm
from .distributed import run_ranks, tp_dp_groups
from .sync_guard import count_host_reads


# ---- multi-rank ---------------------------------------------------------------------------------------
def _train(rank: int, world: int, layout: str, spike_replica: int, nan_replica: int):
    if layout == "tp_dp":
        tp_group, dp_group, tp_rank, replica = tp_dp_groups(world, 2)
        net = nn.parallel.DistributedDataParallel(fm.TPNet(tp_group, tp_rank, 2), process_group=dp_group)
        topology = Topology.from_groups(tp_group=tp_group, dp_group=dp_group)
    else:
        replica, net, topology = rank, fm.make_net(), None
        if layout == "ddp":
            net = nn.parallel.DistributedDataParallel(net)
        else:
            from torch.distributed.fsdp import fully_shard

            for i in (0, 2, 4):
                fully_shard(net[i])
            fully_shard(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.02)
    seen: list[Event] = []
    zc = ZClip(**fm.CFG, topology=topology, forensics={"replicas": True}, on_event=seen.append)
    zc.attach(net)  # before the first backward: every step is measured
    out = {"host_reads": 0, "norms": [], "params": {}}
    for step in range(fm.STEPS):
        if step in (fm.SPIKE_STEP, fm.NAN_STEP):
            out["params"][step] = (net.module.full_params(tp_group, 2) if layout == "tp_dp"
                                   else fm.full_params(net))
        fm.set_factors(net, fm.factors_at(step, replica, spike_replica, nan_replica))
        x, y = fm.batch(step, replica)
        opt.zero_grad()
        with count_host_reads() as reads:  # the whole step: forward, backward (comm hook), clip
            F.mse_loss(net(x), y).backward()
            norm = zc.step(net)
        out["host_reads"] += sum(reads.values())
        out["norms"].append(norm.clone())
        opt.step()
    zc.events()  # the one read: the events go to on_event
    out["events"] = [e.to_json() for e in seen]
    out["norms"] = [float(n) for n in out["norms"]]
    return out


def _check_event(event: Event, params, replicas, ranks_of) -> None:
    """Top parameters and replicas, in order and with shares, equal the oracle's (NaN/Inf ranks first)."""
    def order(shares: dict) -> list:
        return sorted(shares, key=lambda k: -math.inf if shares[k] is None else -shares[k])

    def same(got, want) -> bool:
        return got.nonfinite == (want is None) and (want is None or math.isclose(got.share, want, rel_tol=1e-4,
                                                                                  abs_tol=1e-7))

    assert [p.name for p in event.params] == order(params)[:len(event.params)] and len(event.params) == 3
    for p in event.params:
        assert same(p, params[p.name]), (p, params[p.name])
    assert [r.replica for r in event.replicas] == order(replicas)[:2]
    for r in event.replicas:
        assert same(r, replicas[r.replica]), (r, replicas[r.replica])
        assert r.ranks == ranks_of(r.replica)


def _check(results, replicas: int, spike_replica: int, nan_replica: int, ranks_of) -> None:
    first = results[0]
    for r, res in enumerate(results):
        assert res["host_reads"] == 0, f"rank {r}: {res['host_reads']} host reads in {fm.STEPS} steps"
        assert res["events"] == first["events"], f"rank {r} saw other events"
    events = [Event.from_json(e) for e in first["events"]]
    assert [e.step for e in events] == [fm.SPIKE_STEP + 1, fm.NAN_STEP + 1], format_events(events)  # no others
    spike, nan = events

    params, reps, norm = fm.oracle(first["params"][fm.SPIKE_STEP], fm.SPIKE_STEP, replicas, spike_replica, nan_replica)
    assert spike.kinds == ("clipped", "spike") and math.isclose(spike.grad_norm, norm, rel_tol=1e-5)
    assert spike.params[0].name == fm.SPIKE_PARAM and spike.replicas[0].replica == spike_replica
    _check_event(spike, params, reps, ranks_of)

    params, reps, _ = fm.oracle(first["params"][fm.NAN_STEP], fm.NAN_STEP, replicas, spike_replica, nan_replica)
    assert nan.kinds == ("nonfinite",) and nan.grad_norm is None
    assert nan.params[0] == (fm.NAN_PARAM, None, True) and nan.replicas[0][::2] == (nan_replica, None)
    _check_event(nan, params, reps, ranks_of)


@pytest.mark.slow
@pytest.mark.parametrize("layout,world", [("ddp", 4), ("fsdp2", 2)])
def test_data_parallel_events_name_the_parameter_and_replica(layout, world):
    spike_replica, nan_replica = world - 1, 0
    results = run_ranks(_train, world, layout, spike_replica, nan_replica)
    _check(results, world, spike_replica, nan_replica, lambda r: (r,))


@pytest.mark.slow
def test_tensor_x_data_parallel_events_name_the_parameter_and_replica():
    """TP2 x DP2 (consecutive ranks form a TP group): replica d is ranks (2d, 2d+1)."""
    results = run_ranks(_train, 4, "tp_dp", 1, 0)
    _check(results, 2, 1, 0, lambda d: (2 * d, 2 * d + 1))


# ---- one process ------------------------------------------------------------------------------------
def test_top_shares_math():
    v = torch.tensor([1.0, 4.0, math.nan, 3.0, 2.0])
    idx, shares = top_shares(v, 3)
    assert idx.tolist() == [2, 1, 3]
    assert shares[0] == -1.0 and torch.allclose(shares[1:], torch.tensor([0.4, 0.3]))
    _, none = top_shares(torch.zeros(3), 2)  # nothing measured: no share
    assert torch.isnan(none).all()
    assert logical_name("module._orig_mod.layers.0.module.w") == "layers.0.w"


def test_bad_settings_fail_with_the_key():
    with pytest.raises(ConfigError, match=r"forensics.events = \['spikes'\] is invalid"):
        ZClip(forensics={"events": ["spikes"]})
    with pytest.raises(ConfigError, match="forensics.top_k = -1 is invalid"):
        AdaGC(forensics={"top_k": -1})
    with pytest.raises(ConfigError, match="forensics = 'yes' is invalid"):
        ZClip(forensics="yes")


def _net_steps(clipper, steps: int, spike_at: int, *, sync_free: bool = True):
    net = fm.make_net()
    expected = {"": 1.0}
    for step in range(steps):
        fm.set_factors(net, {fm.SPIKE_PARAM: fm.SPIKE_FACTOR} if step == spike_at else {})
        net.zero_grad()
        x, y = fm.batch(step, 0)
        F.mse_loss(net(x), y).backward()
        if step == spike_at:
            expected = {n: float(p.grad.double().square().sum()) for n, p in net.named_parameters()}
        with count_host_reads(fail=sync_free):
            clipper.step(net)
    total = sum(expected.values())
    return {n: v / total for n, v in expected.items()}


def test_jsonl_events_field_and_format(tmp_path):
    path = tmp_path / "m.jsonl"
    zc = ZClip(**fm.CFG, log_jsonl=str(path), log_interval=4)
    shares = _net_steps(zc, 20, spike_at=13, sync_free=False)  # log steps read the metrics
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["method"] == "zclip" and "call" not in lines[0]  # the settings header comes first
    records = lines[1:]
    with_events = [r for r in records if "events" in r]
    assert len(records) == 5 and len(with_events) == 1 and with_events[0]["step"] == 16
    (event,) = with_events[0]["events"]
    assert event["step"] == 14 and event["params"][0]["name"] == fm.SPIKE_PARAM
    assert math.isclose(event["params"][0]["share"], shares[fm.SPIKE_PARAM], rel_tol=1e-4)
    json.dumps(event, allow_nan=False)  # strict JSON
    text = format_events(lines)  # the header line is not an event
    assert "1 event(s)" in text and "clipped+spike" in text and f"{fm.SPIKE_PARAM} " in text


def test_ring_buffer_keeps_the_newest_and_counts_drops():
    zc = ZClip(max_grad_norm=1e-3, warmup_steps=2, forensics={"capacity": 4, "top_k": 1})  # every step clips
    with pytest.warns(UserWarning, match="2 event"):
        _net_steps(zc, 6, spike_at=-1)
        events = zc.events()
    assert [e.step for e in events] == [3, 4, 5, 6] and zc.events() == []
    off = ZClip(max_grad_norm=1e-3, forensics=False)
    _net_steps(off, 2, spike_at=-1)
    assert off.events() == [] and off.clipper.recorder is None


def test_adagc_events_name_the_clipped_parameter():
    seen: list[Event] = []
    ag = AdaGC(warmup_steps=4, max_grad_norm=1e3, forensics={"events": ["clipped"]}, on_event=seen.append)
    shares = _net_steps(ag, 10, spike_at=7)
    assert ag.events() == seen
    spike = [e for e in seen if e.step == 8]
    assert len(spike) == 1 and spike[0].method == "adagc" and spike[0].threshold is None
    row = format_events(spike).splitlines()[-1].split()
    assert row[:4] == ["8", "clipped", f"{spike[0].grad_norm:.4g}", "-"]  # per-tensor thresholds: none to show
    assert spike[0].params[0].name == fm.SPIKE_PARAM
    assert math.isclose(spike[0].params[0].share, shares[fm.SPIKE_PARAM], rel_tol=1e-4)


def test_forensics_never_changes_the_norm():
    """Forensics on or off, the same gradients give the same norm to the last bit: a logging setting must not
    move a run (at a high learning rate a last-bit change grows into another trajectory)."""
    def norms(forensics) -> list[float]:
        zc = ZClip(**fm.CFG, forensics=forensics, nonfinite="propagate")
        net, out = fm.make_net(), []
        for step in range(12):
            fm.set_factors(net, {fm.SPIKE_PARAM: fm.SPIKE_FACTOR} if step == 9 else {})
            net.zero_grad()
            x, y = fm.batch(step, 0)
            F.mse_loss(net(x), y).backward()
            out.append(zc.step(net).item())
        return out

    off = norms(False)
    assert norms(True) == off and norms({"top_k": 1}) == off
