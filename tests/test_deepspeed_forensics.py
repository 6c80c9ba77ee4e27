"""Spike forensics in DeepSpeed ZeRO-1/2 engines against the single-process oracle (tests/forensics_models.py).

Two gloo ranks (one spawned process group for every engine). A spike is injected into one named parameter
on one replica before DeepSpeed's data-parallel reduction (``ScaleGrad`` inside the forward pass, as a
bad micro-batch would make it), later a NaN into another parameter on the other replica. The events must
name that parameter and that replica first, with the shares of the full-model computation in one process,
identical on every rank; ZClip records no other event; every ordinary ``engine.step()`` makes exactly
the host reads and collectives it makes with forensics off (an event step: one more all-reduce); ZeRO-1
with two parameter groups, bf16 and AdaGC too; the events reach ``on_event``, the JSON-lines file and the
monitor. The settings are validated in the config entry, before any engine exists.
"""

from __future__ import annotations

import json
import math
import os
import types

import pytest
import torch
import torch.distributed as dist
from torch.nn import functional as F

from zclip_dist.config import ConfigError
from zclip_dist.deepspeed import resolve_config, resolve_forensics
from zclip_dist.forensics import Event, format_events

from . import forensics_models as fm
from .distributed import run_ranks
from .ds_harness import Monitor, call_in_rank
from .test_forensics import _check_event

WORLD = 2
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter",
               "broadcast", "reduce", "all_to_all_single", "barrier")
SPIKE_REPLICA, NAN_REPLICA = 1, 0
ADAGC = {"warmup_steps": 4, "max_grad_norm": 1000.0}


def _config(case: dict, forensics) -> dict:
    method = "adagc" if case.get("adagc") else "zclip"
    entry = dict(ADAGC) if method == "adagc" else dict(fm.CFG)
    if forensics is not None:
        entry["forensics"] = forensics
    if case.get("jsonl"):
        entry.update(log_jsonl=case["jsonl"], log_interval=1000)
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4 * WORLD,
           "steps_per_print": 10**6, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": case.get("stage", 2)}, method: entry}
    if case.get("bf16"):
        cfg["bf16"] = {"enabled": True}
    return cfg


def _same_graph_everywhere(net) -> None:
    """``ScaleGrad`` on every parameter of every rank (factor 1 where nothing is injected): ZeRO-2 packs
    gradients into its buckets in the order autograd produces them and assumes that order is the same on
    every rank; an extra node on one rank alone would reorder its bucket."""
    def scaled(self, name):
        return fm.ScaleGrad.apply(getattr(self, name), self.factors[name])

    for m in net.modules():
        if isinstance(m, fm.ScaledLinear):
            m._p = types.MethodType(scaled, m)


def _train(rank: int, case: dict, forensics) -> dict:
    """One engine: STEPS steps, the spike and the NaN injected; per ordinary step the host reads inside
    engine.step(); the full master weights before the spike and NaN steps; the events on_event saw."""
    from deepspeed.utils import safe_get_full_fp32_param

    from tests.sync_guard import count_host_reads
    from zclip_dist import deepspeed as zds

    seen: list[Event] = []
    net = fm.make_net()
    _same_graph_everywhere(net)
    params = list(net.parameters())
    groups = [{"params": params[:2]}, {"params": params[2:]}] if case.get("groups") else params
    engine, *_ = zds.initialize(model=net, optimizer=torch.optim.SGD(groups, lr=0.02),
                                config=_config(case, forensics), on_event=seen.append)
    monitor = engine.monitor = Monitor()
    dtype = torch.bfloat16 if case.get("bf16") else torch.float32
    out = {"reads": [], "collectives": [], "params": {}}
    calls: list[str] = []
    originals = {fn: getattr(dist, fn) for fn in COLLECTIVES}

    def counting(fn):
        def wrapper(*args, **kwargs):
            calls.append(fn)
            return originals[fn](*args, **kwargs)

        return wrapper

    for step in range(fm.STEPS):
        if step in (fm.SPIKE_STEP, fm.NAN_STEP):
            out["params"][step] = {n: safe_get_full_fp32_param(p).detach().clone()
                                   for n, p in engine.module.named_parameters()}
        fm.set_factors(engine.module, fm.factors_at(step, rank, SPIKE_REPLICA, NAN_REPLICA))
        x, y = (t.to(dtype) for t in fm.batch(step, rank))
        calls.clear()
        for fn in COLLECTIVES:  # backward (DeepSpeed reduces there, the replica meter measures) and step
            setattr(dist, fn, counting(fn))
        try:
            engine.backward(F.mse_loss(engine(x), y))
            with count_host_reads() as reads:
                engine.step()
        finally:
            for fn, original in originals.items():
                setattr(dist, fn, original)
        out["reads"].append(sum(reads.values()))
        out["collectives"].append(len(calls))
    engine._zclip.events()  # AdaGC: other ranks read their clipped steps' rows here
    out.update(events=[e.to_json() for e in seen], monitor=monitor.events, on=engine._zclip.forensics is not None)
    return out


def _refusals(rank: int) -> dict:
    """An explicit forensics entry where it is not covered is refused by name; the default is off, and says
    so once in DeepSpeed's log (rank 0)."""
    import logging

    from deepspeed.utils import logger

    from zclip_dist import deepspeed as zds
    from zclip_dist.deepspeed import UnsupportedConfiguration

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    out, said, keep = {}, [], Keep()
    logger.addHandler(keep)
    for stage, forensics in ((3, {"top_k": 2}), (0, True), (0, None)):
        net = fm.make_net()
        cfg = _config({"stage": stage}, forensics)
        try:
            engine, *_ = zds.initialize(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.02), config=cfg)
            out[(stage, forensics is not None)] = f"on={engine._zclip.forensics is not None}"
        except UnsupportedConfiguration as err:
            out[(stage, forensics is not None)] = str(err)
    logger.removeHandler(keep)
    out["said"] = [m for m in said if "spike forensics is off" in m]
    return out


CASES = {  # name -> (case, forensics entry)
    "zero2_fp32": ({"jsonl": True}, {"replicas": True}),
    "zero2_fp32_off": ({}, False),
    # two parameter groups: at the first clip_grad read, group 0 sits in its flat partition, group 1 not yet
    "zero1_fp32": ({"stage": 1, "groups": True}, {"replicas": True}),
    "zero1_fp32_off": ({"stage": 1, "groups": True}, False),
    "zero2_bf16": ({"bf16": True}, {"replicas": True}),
    "adagc_zero2": ({"adagc": True}, {"replicas": True, "events": ["clipped", "nonfinite"]}),
    "adagc_zero2_off": ({"adagc": True}, False),
}


def _all(rank: int, world: int, jsonl: str) -> dict:
    out = {}
    for name, (case, forensics) in CASES.items():
        case = {**case, "jsonl": jsonl if case.get("jsonl") else None}
        out[name] = _train(rank, case, forensics)
    out["refusals"] = _refusals(rank)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    path = str(tmp_path_factory.mktemp("ds_forensics") / "metrics.jsonl")
    results = run_ranks(call_in_rank, WORLD, _all, path, init=False)
    return results, path


def _events(results, name: str) -> list[Event]:
    first = results[0][name]["events"]
    for r, res in enumerate(results):
        assert res[name]["events"] == first, f"{name}: rank {r} saw other events"
    return [Event.from_json(e) for e in first]


def _oracle(results, name: str, step: int):
    return fm.oracle(results[0][name]["params"][step], step, WORLD, SPIKE_REPLICA, NAN_REPLICA)


def _ordinary(results, name: str, event_steps: set[int]) -> list[list[int]]:
    return [[n for i, n in enumerate(res[name]["reads"]) if i not in event_steps] for res in results]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2_fp32", "zero1_fp32"])
def test_zclip_events_name_the_parameter_and_replica(runs, name):
    results, _ = runs
    events = _events(results, name)
    assert [e.step for e in events] == [fm.SPIKE_STEP + 1, fm.NAN_STEP + 1], format_events(events)  # no others
    spike, nan = events
    params, reps, norm = _oracle(results, name, fm.SPIKE_STEP)
    assert spike.kinds == ("clipped", "spike") and math.isclose(spike.grad_norm, norm, rel_tol=1e-5)
    assert spike.params[0].name == fm.SPIKE_PARAM and spike.replicas[0].replica == SPIKE_REPLICA
    _check_event(spike, params, reps, lambda r: (r,))
    params, reps, _ = _oracle(results, name, fm.NAN_STEP)
    assert nan.kinds == ("nonfinite",) and nan.grad_norm is None
    assert nan.params[0] == (fm.NAN_PARAM, None, True) and nan.replicas[0][::2] == (NAN_REPLICA, None)
    _check_event(nan, params, reps, lambda r: (r,))
    # ordinary steps: exactly the host reads DeepSpeed and ZClip make without forensics (none added)
    events_at = {fm.SPIKE_STEP, fm.NAN_STEP}
    assert _ordinary(results, name, events_at) == _ordinary(results, f"{name}_off", events_at)
    assert min(min(r) for r in _ordinary(results, name, events_at)) > 0  # the guard does see the engine's reads
    # and no collective beyond DeepSpeed's on ordinary steps; one small all-reduce on each event step
    for res, off in zip(results, [r[f"{name}_off"] for r in results]):
        extra = [a - b for a, b in zip(res[name]["collectives"], off["collectives"])]
        assert extra == [int(i in events_at) for i in range(fm.STEPS)], extra

@pytest.mark.slow
def test_bf16_names_the_parameter_and_replica(runs):
    results, _ = runs
    spike, nan = _events(results, "zero2_bf16")
    params, reps, _ = _oracle(results, "zero2_bf16", fm.SPIKE_STEP)
    assert spike.params[0].name == fm.SPIKE_PARAM and spike.replicas[0].replica == SPIKE_REPLICA
    assert math.isclose(spike.params[0].share, params[fm.SPIKE_PARAM], rel_tol=2e-2)  # bf16 gradients
    assert math.isclose(spike.replicas[0].share, reps[SPIKE_REPLICA], rel_tol=2e-2)
    assert nan.params[0] == (fm.NAN_PARAM, None, True) and nan.replicas[0][::2] == (NAN_REPLICA, None)


@pytest.mark.slow
def test_adagc_events_name_the_parameter_and_replica(runs):
    results, _ = runs
    events = {e.step: e for e in _events(results, "adagc_zero2")}
    spike, nan = events[fm.SPIKE_STEP + 1], events[fm.NAN_STEP + 1]
    assert spike.method == "adagc" and "clipped" in spike.kinds and spike.threshold is None
    params, reps, norm = _oracle(results, "adagc_zero2", fm.SPIKE_STEP)
    assert spike.params[0].name == fm.SPIKE_PARAM and spike.replicas[0].replica == SPIKE_REPLICA
    _check_event(spike, params, reps, lambda r: (r,))
    assert nan.kinds == ("nonfinite",) and nan.params[0] == (fm.NAN_PARAM, None, True)
    assert nan.replicas[0][::2] == (NAN_REPLICA, None)
    assert len(events) > 2  # AdaGC clips tensors on other steps too: events whose rows rank 0 gets for free
    # no host read added on any step, clipped ones included (rank 0 decodes the rows that come along with
    # the metrics' non-blocking copy); the NaN step reads its row on every rank
    assert _ordinary(results, "adagc_zero2", {fm.NAN_STEP}) == _ordinary(results, "adagc_zero2_off", {fm.NAN_STEP})
    for res in results:  # the replica slots ride in AdaGC's own all-reduce, which ran before the NaN check
        assert res["adagc_zero2"]["collectives"] == res["adagc_zero2_off"]["collectives"]


@pytest.mark.slow
def test_events_reach_the_jsonl_file_and_the_monitor(runs):
    results, path = runs
    lines = [json.loads(line) for line in open(path)]
    logged = [e for line in lines[1:] for e in line.get("events", ())]
    assert logged == results[0]["zero2_fp32"]["events"]
    assert all("events" not in line for line in lines[1:] if not (line["spike"] or line["nonfinite"]))
    rows = results[0]["zero2_fp32"]["monitor"]
    spike_at = {s for k, v, s in rows if k == "Train/zclip/spike" and v == 1.0}
    (samples,) = spike_at
    named = {k: v for k, v, s in rows if s == samples and k.startswith("Train/zclip/event/")}
    shares = {p["name"]: p["share"] for p in logged[0]["params"]}
    assert named[f"Train/zclip/event/param/{fm.SPIKE_PARAM}"] == shares[fm.SPIKE_PARAM]
    assert f"Train/zclip/event/replica/{SPIKE_REPLICA}" in named and "Train/zclip/event/grad_norm" in named
    assert not results[1]["zero2_fp32"]["monitor"]  # rank 0 writes


@pytest.mark.slow
def test_uncovered_paths_refuse_an_explicit_entry(runs):
    results, _ = runs
    refusals = results[0]["refusals"]
    assert refusals[(3, True)].startswith("zclip.forensics: ZeRO stage 3")
    assert refusals[(0, True)].startswith("zclip.forensics: ZeRO stage 0")
    assert refusals[(0, False)] == "on=False"
    assert results[0]["refusals"]["said"] == [  # once, on rank 0 only
        "[Rank 0] zclip_dist: spike forensics is off on this engine: ZeRO stage 0 (SGD) is not covered; "
        "use ZeRO stage 1 or 2; clipped steps are recorded without the parameters and replicas that carried them"]
    assert results[1]["refusals"]["said"] == []


# ---- the config entry, no engine --------------------------------------------------------------------
@pytest.mark.parametrize("key", ["zclip", "adagc"])
def test_forensics_entry_is_validated_with_its_key(key):
    with pytest.raises(ConfigError, match=rf"{key}\.forensics\.top_k = -1 is invalid"):
        resolve_config({key: {"forensics": {"top_k": -1}}})
    with pytest.raises(ConfigError, match=rf"{key}\.forensics = 'yes' is invalid"):
        resolve_config({key: {"forensics": "yes"}})
    with pytest.raises(ConfigError, match=rf"{key}\.forensics: unknown key\(s\) 'replica'"):
        resolve_config({key: {"enabled": False, "forensics": {"replica": True}}})  # disabled: still validated
    with pytest.raises(ConfigError, match=rf"{key}\.forensic is not a .* setting"):
        resolve_config({key: {"forensic": True}})
    assert resolve_forensics({key: {}}, key) == (resolve_forensics({key: {"forensics": True}}, key)[0], False)
    cfg, explicit = resolve_forensics({key: {"forensics": {"replicas": True}}}, key)
    assert cfg.replicas and explicit and not resolve_forensics({key: {}}, key)[0].replicas
    assert not resolve_forensics({key: {"forensics": False}}, key)[0].enabled


@pytest.mark.parametrize("config,fragment", [
    ({"zclip": {}, "forensics": {"replicas": True}}, "'forensics' is not read"),
    ({"zclip": {}, "zero_optimization": {"stage": 2, "forensics": {}}}, "zero_optimization.forensics is not read"),
])
def test_forensics_outside_the_entry_warns(config, fragment):
    with pytest.warns(UserWarning, match=fragment):
        resolve_config(config)
