"""Spike forensics on real megatron-core optimizers: TP2 x DP2 with the distributed optimizer, 4 gloo ranks,
megatron-core 0.16.1 and 0.19.2 (tests/megatron_versions.py), ZClip and AdaGC in one spawned group.

Each DP replica writes its own analytic gradient ``G(name, 1000 * step + replica)`` (tests/megatron_fixtures.py)
into ``main_grad`` -- its TP slice of it -- and Megatron's own ``finish_grad_sync`` reduces them over DP,
as after a backward. At SPIKE_STEP replica SPIKE_REPLICA's gradient of SPIKE_PARAM is 30x, at NAN_STEP
replica NAN_REPLICA's NAN_PARAM is NaN: both *before* the DP reduction, as a bad micro-batch makes them.
The oracle, in this (parent) process, knows nothing of Megatron: the full per-replica gradients, their
mean (what the optimizer steps with), and the shares of both.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest

from tests.megatron_fixtures import Layout, full_gradient, merged_shapes
from tests.megatron_versions import CORES, run_ranks_on

LAYOUT = Layout("tp2dp2_distopt", tp=2, dist_opt=True)
STEPS, SPIKE_STEP, NAN_STEP = 16, 10, 13  # loop indices; the clipper's step count is one more
SPIKE_PARAM = "decoder.layers.1.mlp.linear_fc1.weight"  # column-parallel: a TP shard on each TP rank
NAN_PARAM = "decoder.layers.0.input_layernorm.weight"  # TP-duplicated
SPIKE_REPLICA, NAN_REPLICA = 1, 0  # DP ranks: replica 1 is global ranks 2, 3
ZCLIP = dict(alpha=0.9, z_thresh=6.0, warmup_steps=6, max_grad_norm=None)
# clip_ratio 3: no tensor of a fresh random gradient is clipped, the 30x one is.
ADAGC = dict(clip_ratio=3.0, warmup_steps=4, max_grad_norm=None)
FORENSICS = dict(top_k=3, replicas=True, top_replicas=2)
SYNC_STEPS = 3  # ordinary steps whose host reads are counted without forensics


def factor(name: str, step: int, replica: int) -> float:
    if step == SPIKE_STEP and replica == SPIKE_REPLICA and name == SPIKE_PARAM:
        return 30.0
    if step == NAN_STEP and replica == NAN_REPLICA and name == NAN_PARAM:
        return math.nan
    return 1.0


def replica_gradient(name: str, shape: tuple[int, ...], step: int, replica: int):
    return full_gradient(name, shape, 1000 * step + replica) * factor(name, step, replica)


# ---- the ranks ------------------------------------------------------------------------------------
class _Writer:
    """Megatron's TensorBoard writer, as far as log_metrics uses it."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, key, value, step) -> None:
        self.scalars.append((key, float(value), int(step)))


def _write(entries, step: int, replica: int) -> None:
    for p, name, shape, size, rank, dim in entries:
        full = replica_gradient(name, shape, step, replica)
        local = full if dim is None else full.chunk(size, dim=dim)[rank]
        p.main_grad.copy_(local.to(p.main_grad.dtype))


def _run(method: str, forensics, steps: int, jsonl: str | None = None) -> dict:
    from megatron.core import parallel_state as ps

    from tests.megatron_fixtures import AnalyticGrads, SyncCounter, build
    from zclip_dist import megatron as zmeg
    from zclip_dist.config import AdaGCConfig, ZClipConfig

    ddp, opt = build(LAYOUT)
    entries = AnalyticGrads(ddp, LAYOUT).entries
    replica = ps.get_data_parallel_rank()
    config = ZClipConfig(**ZCLIP, log_jsonl=jsonl, log_interval=4) if method == "zclip" else AdaGCConfig(**ADAGC)
    seen = []
    zmeg.wrap_optimizer(opt, config, model=[ddp], forensics=forensics, on_event=lambda e: seen.append(e.to_json()))
    writer, syncs = _Writer(), []
    for step in range(steps):
        _write(entries, step, replica)
        with SyncCounter() as c:
            ddp.finish_grad_sync()  # Megatron's DP reduction (reduce-scatter of each bucket)
            opt.step()
        syncs.append(c.count)
        zmeg.log_metrics(opt, step + 1, writer)  # as training_log: the iteration just completed
    return dict(events=seen, syncs=syncs, writer=writer.scalars, shapes=AnalyticGrads(ddp, LAYOUT).shapes(),
                replica=replica)


def _worker(rank: int, world: int, jsonl: str) -> dict:
    warnings.filterwarnings("ignore")
    from tests import megatron_cpu_shim

    megatron_cpu_shim.apply()
    out = {"zclip_off": _run("zclip", False, SYNC_STEPS), "adagc_off": _run("adagc", False, SYNC_STEPS),
           "zclip": _run("zclip", FORENSICS, STEPS, jsonl), "adagc": _run("adagc", FORENSICS, STEPS)}
    if rank == 0:
        with open(jsonl) as f:
            out["jsonl"] = [json.loads(line) for line in f]
    return out


@pytest.fixture(scope="module", params=CORES)
def results(request, tmp_path_factory):
    jsonl = str(tmp_path_factory.mktemp(request.param) / "zclip.jsonl")
    return run_ranks_on(request.param, _worker, 4, jsonl)


# ---- the oracle -----------------------------------------------------------------------------------
def _shares(sq: dict) -> dict:
    total = sum(v for v in sq.values() if math.isfinite(v))
    return {k: v / total if math.isfinite(v) else None for k, v in sq.items()}


def oracle(shapes: dict, step: int, replicas: int = 2) -> tuple[dict, dict, float]:
    """One process, full model: parameter shares of the DP-mean gradient, replica shares, the mean's norm."""
    per_replica = [{n: replica_gradient(n, s, step, r) for n, s in shapes.items()} for r in range(replicas)]
    mean = {n: sum(g[n] for g in per_replica) / replicas for n in shapes}
    params = {n: float(g.square().sum()) for n, g in mean.items()}
    reps = {r: sum(float(g.square().sum()) for g in grads.values()) for r, grads in enumerate(per_replica)}
    return _shares(params), _shares(reps), math.sqrt(sum(params.values()))


def _check_event(event: dict, shapes: dict, step: int, first_param: str, first_replica: int) -> None:
    params, reps, norm = oracle(shapes, step)
    assert event["step"] == step + 1
    assert event["params"][0]["name"] == first_param
    assert event["replicas"][0]["replica"] == first_replica
    assert event["replicas"][0]["ranks"] == [2 * first_replica, 2 * first_replica + 1]  # TP2: its two ranks
    want = sorted(params, key=lambda n: math.inf if params[n] is None else params[n], reverse=True)[:3]
    assert [p["name"] for p in event["params"]] == want
    for p in event["params"]:
        assert p["share"] == (None if params[p["name"]] is None else pytest.approx(params[p["name"]], rel=1e-4))
    for r in event["replicas"]:
        assert r["share"] == (None if reps[r["replica"]] is None else pytest.approx(reps[r["replica"]], rel=1e-4))
    if math.isfinite(norm):
        assert event["grad_norm"] == pytest.approx(norm, rel=1e-5)
    else:
        assert event["grad_norm"] is None and "nonfinite" in event["kinds"]


@pytest.mark.parametrize("method", ["zclip", "adagc"])
def test_event_names_the_parameter_and_the_replica(results, method):
    runs = [r[method] for r in results]
    shapes = merged_shapes([r["shapes"] for r in runs])
    assert SPIKE_PARAM in shapes and NAN_PARAM in shapes
    events = runs[0]["events"]
    # No event on ordinary steps; the spike and the NaN, in order, on every rank alike.
    assert [e["step"] for e in events] == [SPIKE_STEP + 1, NAN_STEP + 1]
    assert all(r["events"] == events for r in runs)
    _check_event(events[0], shapes, SPIKE_STEP, SPIKE_PARAM, SPIKE_REPLICA)
    _check_event(events[1], shapes, NAN_STEP, NAN_PARAM, NAN_REPLICA)
    assert events[1]["params"][0]["share"] is None and events[1]["params"][0]["nonfinite"]
    assert events[1]["replicas"][0]["nonfinite"]


@pytest.mark.parametrize("method", ["zclip", "adagc"])
def test_ordinary_steps_read_nothing_more(results, method):
    """Host reads per ordinary step (the DP reduction and the step) as without forensics, replica
    measurement included; ZClip reads at event steps only, AdaGC at none (its events are read at log
    steps). ZClip's JSON-lines log steps (rank 0, every 4th step) read its host-memory event buffer too."""
    for rank, r in enumerate(results):
        off_syncs, syncs = r[f"{method}_off"]["syncs"], r[method]["syncs"]
        off = set(off_syncs[1:])  # after the first step (megatron-core 0.19 reads once more there)
        assert len(off) == 1 and syncs[0] == off_syncs[0], (method, syncs, off_syncs)
        log_steps = {i for i in range(STEPS) if (i + 1) % 4 == 0} if rank == 0 and method == "zclip" else set()
        ordinary = [s for i, s in enumerate(syncs) if i not in {0, SPIKE_STEP, NAN_STEP} | log_steps]
        assert len(ordinary) >= STEPS - 7 and set(ordinary) == off, (method, syncs, off)
        if method == "adagc":
            assert syncs[SPIKE_STEP] == syncs[1], syncs  # an event step: the host does not even know


def test_zclip_events_reach_jsonl_and_writers(results):
    events = results[0]["zclip"]["events"]
    lines = [line for line in results[0]["jsonl"] if "call" in line]  # after the header
    logged = [e for line in lines for e in line.get("events", ())]
    assert logged == events
    # The event step has its own line; other lines every log_interval steps, without an events field.
    assert {line["call"] for line in lines if "events" in line} == {SPIKE_STEP + 1, NAN_STEP + 1}
    assert {line["call"] for line in lines if "events" not in line} == {4, 8, 12, 16}
    writer = {(k, it): v for k, v, it in results[0]["zclip"]["writer"]}
    spike = events[0]
    assert writer[(f"zclip/event/param/{SPIKE_PARAM}", SPIKE_STEP + 1)] == pytest.approx(spike["params"][0]["share"])
    assert writer[(f"zclip/event/replica/{SPIKE_REPLICA}", SPIKE_STEP + 1)] == pytest.approx(
        spike["replicas"][0]["share"])
    assert math.isnan(writer[(f"zclip/event/param/{NAN_PARAM}", NAN_STEP + 1)])
    assert not [k for k, _ in writer if k.startswith("zclip/event/") and _ not in (SPIKE_STEP + 1, NAN_STEP + 1)]


def test_adagc_events_reach_writers(results):
    writer = {(k, it): v for k, v, it in results[0]["adagc"]["writer"]}
    spike = results[0]["adagc"]["events"][0]
    assert writer[(f"adagc/event/param/{SPIKE_PARAM}", SPIKE_STEP + 1)] == pytest.approx(spike["params"][0]["share"])


def test_flags_default_on_and_bad_values_fail_naming_the_flag():
    import argparse

    from zclip_dist import megatron as zmeg
    from zclip_dist.config import ConfigError

    parser = zmeg.add_arguments(argparse.ArgumentParser())
    parse = parser.parse_args
    on = zmeg.forensics_config(parse(["--zclip"]))
    assert on.enabled and not on.replicas and on.top_k == 3
    assert not zmeg.forensics_config(parse(["--adagc", "--no-adagc-forensics"])).enabled
    cfg = zmeg.forensics_config(parse(["--zclip", "--zclip-forensics-replicas", "--zclip-forensics-top-k", "5",
                                       "--zclip-forensics-events", "spike", "nonfinite"]))
    assert (cfg.replicas, cfg.top_k, cfg.events) == (True, 5, ("spike", "nonfinite"))
    with pytest.raises(ConfigError, match=r"^--zclip-forensics-top-k = -1 is invalid: allowed an integer >= 0$"):
        zmeg.clipping_config(parse(["--zclip", "--zclip-forensics-top-k", "-1"]))  # before anything is built
    with pytest.raises(ConfigError, match=r"^--adagc-forensics-capacity = 0 is invalid"):
        zmeg.clipping_config(parse(["--adagc", "--adagc-forensics-capacity", "0"]))
    with pytest.raises(SystemExit):  # argparse names the flag and the choices
        parse(["--zclip", "--zclip-forensics-events", "sometimes"])
