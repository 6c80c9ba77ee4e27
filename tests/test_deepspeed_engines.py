"""Real DeepSpeed engines on gloo ranks against the single-process oracle (see tests/ds_harness.py).

Two spawned groups carry everything: 2 ranks (ZeRO 0-3 x fp32/bf16, offload, BF16_Optimizer, pipeline with
tied layers, DeepSpeed's pipeline norm bug, host syncs, monitor, refusals) and 4 ranks (pipeline x DP,
TP x DP through megatron-core parallel_state, the FP16_Unfused TP norm bug).
"""

from __future__ import annotations

import csv
import glob
import os

import pytest
import torch

from tests import ds_harness as H
from tests.distributed import run_ranks

Z1, Z2, Z3 = ({"zero_optimization": {"stage": s}} for s in (1, 2, 3))
OFFLOAD = {"offload_optimizer": {"device": "cpu"}}
# Only the cap clips: ZClip's warmup outlasts the run; the cap comes from gradient_clipping.
CAP = 0.05
CAP_ONLY = {"warmup_steps": 100}

MATRIX_2 = [
    (H.Case("zero0_fp32", {}), "SGD"),
    (H.Case("zero0_bf16", {}, bf16=True), "FP16_UnfusedOptimizer"),
    (H.Case("zero1_fp32_gas2", Z1, gas=2), "DeepSpeedZeroOptimizer"),
    (H.Case("zero1_bf16", Z1, bf16=True), "DeepSpeedZeroOptimizer"),
    (H.Case("bf16_optimizer", {**Z1, "data_types": {"grad_accum_dtype": "fp32"}}, bf16=True), "BF16_Optimizer"),
    (H.Case("zero2_fp32", Z2), "DeepSpeedZeroOptimizer"),
    (H.Case("zero2_bf16", Z2, bf16=True), "DeepSpeedZeroOptimizer"),
    (H.Case("zero2_offload", {"zero_optimization": {"stage": 2, **OFFLOAD}}), "DeepSpeedZeroOptimizer"),
    (H.Case("zero3_fp32", Z3), "DeepSpeedZeroOptimizer_Stage3"),
    (H.Case("zero3_bf16", Z3, bf16=True), "DeepSpeedZeroOptimizer_Stage3"),
    (H.Case("zero3_offload", {"zero_optimization": {"stage": 3, **OFFLOAD}}), "DeepSpeedZeroOptimizer_Stage3"),
    (H.Case("pipe2_tied_fp32", {}, kind="pipe", dp=1), "SGD"),
    (H.Case("pipe2_tied_bf16", {}, kind="pipe", dp=1, bf16=True), "BF16_Optimizer"),
]
MATRIX_4 = [
    (H.Case("pipe2_dp2_tied_fp32", {}, kind="pipe"), "SGD"),
    (H.Case("tp2_dp2_fp32", {}, kind="tp"), "SGD"),
    (H.Case("tp2_dp2_bf16", {}, kind="tp", bf16=True), "FP16_UnfusedOptimizer"),
    (H.Case("tp2_dp2_zero2_fp32", Z2, kind="tp"), "DeepSpeedZeroOptimizer"),
]
# DeepSpeed bugs 1 and 2: the same fixed clip by the engine alone and by ZClip's cap.
BUGS_2 = {"pipeline_norm": H.Case("pipe_bug", {}, kind="pipe", dp=1, steps=1, spike_step=None,
                                  gradient_clipping=CAP, zclip=CAP_ONLY)}
BUGS_4 = {"unfused_tp_norm": H.Case("tp_bug", {}, kind="tp", bf16=True, steps=1, spike_step=None,
                                    gradient_clipping=CAP, zclip=CAP_ONLY)}


def _without_zclip(case: H.Case) -> H.Case:
    return H.Case(case.name + "_ds", case.ds, kind=case.kind, dp=case.dp, steps=case.steps, spike_step=None,
                  gradient_clipping=case.gradient_clipping, zclip=None, bf16=case.bf16)


def _bug_runs(rank, bugs):
    return {name: (H.run_case(case, rank), H.run_case(_without_zclip(case), rank)) for name, case in bugs.items()}


# ---- probes that need a live process group (2 ranks) -----------------------------------------------
def _count_syncs(case: H.Case, rank: int, steps: int) -> int:
    """Host reads of device tensor values inside ``engine.step()`` (not forward/backward) over ``steps`` steps."""
    from zclip_dist import deepspeed as zds

    model = H.mlp()
    engine, *_ = zds.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                config=H.ds_config(case))
    return H.train_counting_reads(engine, case, rank, steps)


def _sync_counts(rank):
    out = {}
    for name, ds, policy in (("zero2", Z2, "skip"), ("zero0", {}, "skip"), ("zero0_propagate", {}, "propagate")):
        with_z = H.Case(name, ds, zclip={"warmup_steps": 2, "nonfinite": policy}, spike_step=None)
        without = H.Case(name, ds, zclip=None, spike_step=None)
        out[name] = (_count_syncs(with_z, rank, 5), _count_syncs(without, rank, 5))
    return out


def _monitor_run(rank, log_dir):
    case = H.Case("monitor", {**Z1, "steps_per_print": 2,
                              "csv_monitor": {"enabled": True, "output_path": log_dir, "job_name": "zc"},
                              "tensorboard": {"enabled": True, "output_path": log_dir, "job_name": "zc"}},
                  steps=4, spike_step=None)
    return H.run_case(case, rank)["decisions"]


def _refusals(rank):
    """Messages of initialize() failures; the engine never steps."""
    from zclip_dist import deepspeed as zds

    out = {}
    bad = {**H.ds_config(H.Case("bad", {})), "zclip": {"alpha": 0.5, "mode": "zsc0re"}}
    autocast = {**H.ds_config(H.Case("autocast", Z1)), "torch_autocast": {"enabled": True, "dtype": "torch.float16"}}
    for name, cfg in (("bad_value", bad), ("autocast_fp16_zero", autocast)):
        model = H.mlp()
        try:
            zds.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=cfg)
        except ValueError as err:
            out[name] = (type(err).__name__, str(err))
    return out


def _group_2(rank, world_size, log_dir):
    return {"matrix": {c.name: H.run_case(c, rank) for c, _ in MATRIX_2}, "bugs": _bug_runs(rank, BUGS_2),
            "syncs": _sync_counts(rank), "monitor": _monitor_run(rank, log_dir), "refusals": _refusals(rank)}


def _group_4(rank, world_size):
    return {"matrix": {c.name: H.run_case(c, rank) for c, _ in MATRIX_4}, "bugs": _bug_runs(rank, BUGS_4)}


@pytest.fixture(scope="module")
def group_2(tmp_path_factory):
    log_dir = str(tmp_path_factory.mktemp("monitor"))
    return run_ranks(H.call_in_rank, 2, _group_2, log_dir, init=False), log_dir


@pytest.fixture(scope="module")
def group_4():
    return run_ranks(H.call_in_rank, 4, _group_4, init=False)


# ---- the matrix -----------------------------------------------------------------------------------
def _check_case(case: H.Case, optimizer: str, results: list[dict]) -> None:
    assert {r["optimizer"] for r in results} == {optimizer}, "the configuration did not build the intended path"
    traj = H.trajectory(case, results)
    expected = H.oracle_updates(case, traj, H.reference_kwargs(case))
    tol = 3e-2 if case.bf16 else 2e-5
    for step, (update, true_norm) in enumerate(expected):
        got = {k: traj[step + 1][k] - traj[step][k] for k in traj[step]}
        assert H.rel_diff(got, update) <= tol, f"{case.name}: step {step} update differs from the reference"
        for r in results:
            assert r["decisions"][step]["grad_norm"] == pytest.approx(true_norm, rel=tol)
    spike = results[0]["decisions"][case.spike_step]
    assert spike["spike"] and spike["clipped"] and spike["coef"] < 0.2, "the injected spike was not clipped"
    states = [r["state"] for r in results]
    for other in states[1:]:
        for key, value in states[0].items():
            assert torch.equal(value, other[key]), f"{case.name}: clipper state {key} differs between ranks"


@pytest.mark.parametrize("case,optimizer", MATRIX_2, ids=[c.name for c, _ in MATRIX_2])
def test_matrix_2_ranks(group_2, case, optimizer):
    results, _ = group_2
    _check_case(case, optimizer, [r["matrix"][case.name] for r in results])


@pytest.mark.parametrize("case,optimizer", MATRIX_4, ids=[c.name for c, _ in MATRIX_4])
def test_matrix_4_ranks(group_4, case, optimizer):
    _check_case(case, optimizer, [r["matrix"][case.name] for r in group_4])


# ---- DeepSpeed's norm bugs: the engine's own clip misses the cap, ZClip's meets it -----------------------
def _check_bug(case: H.Case, runs: list[tuple[dict, dict]]) -> None:
    zclip_runs, ds_runs = [r[0] for r in runs], [r[1] for r in runs]
    true_norm = H.oracle_updates(case, H.trajectory(case, zclip_runs), H.reference_kwargs(case))[0][1]
    assert true_norm > 2 * CAP, "the step must be clipped for the test to mean anything"
    expected = CAP * true_norm / (true_norm + 1e-6)
    tol = 1e-2 if case.bf16 else 1e-5
    ds_traj, z_traj = H.trajectory(case, ds_runs), H.trajectory(case, zclip_runs)
    ds_update, z_update = H.update_norm(ds_traj[0], ds_traj[1]), H.update_norm(z_traj[0], z_traj[1])
    assert abs(ds_update / expected - 1) > 0.1, f"DeepSpeed's own norm is now right ({ds_update} vs {expected})"
    assert z_update == pytest.approx(expected, rel=tol)
    assert zclip_runs[0]["decisions"][0]["grad_norm"] == pytest.approx(true_norm, rel=tol)


def test_bug1_fp32_pipeline_norm(group_2):
    results, _ = group_2
    _check_bug(BUGS_2["pipeline_norm"], [r["bugs"]["pipeline_norm"] for r in results])


def test_bug2_unfused_tp_norm(group_4):
    _check_bug(BUGS_4["unfused_tp_norm"], [r["bugs"]["unfused_tp_norm"] for r in group_4])


def test_bug3_autocast_fp16_zero_is_refused(group_2):
    results, _ = group_2
    for r in results:
        kind, message = r["refusals"]["autocast_fp16_zero"]
        assert kind == "UnsupportedConfiguration" and "torch_autocast" in message and "fp16" in message


def test_invalid_zclip_value_fails_at_initialize(group_2):
    results, _ = group_2
    for r in results:
        kind, message = r["refusals"]["bad_value"]
        assert kind == "ConfigError" and "zclip.mode" in message and "zsc0re" in message


# ---- cost and observability ---------------------------------------------------------------------
def test_host_syncs(group_2):
    """ZClip adds at most one host read per optimizer step (5 steps here).

    Wrappers: the clip value, which DeepSpeed branches on in Python right after its own sync on the same
    norm; on unclipped steps ZClip returns 0.0, which skips DeepSpeed's ``is_invalid_grad_norm`` in
    ``unscale_and_clip_grads``, so the net count is between 0 and 1. No wrapper: DeepSpeed reads nothing;
    ZClip reads the skip flag (skipping an optimizer step is a host decision), none under "propagate".
    """
    results, _ = group_2
    for r in results:
        with_z, without = r["syncs"]["zero2"]
        assert 0 <= with_z - without <= 5, r["syncs"]
        with_z, without = r["syncs"]["zero0"]
        assert with_z - without == 5, r["syncs"]
        with_z, without = r["syncs"]["zero0_propagate"]
        assert with_z == without, r["syncs"]


def test_metrics_reach_the_monitor(group_2):
    results, log_dir = group_2
    files = {os.path.basename(f) for f in glob.glob(os.path.join(log_dir, "**", "*.csv"), recursive=True)}
    for name in ("grad_norm", "mean", "std", "z", "threshold", "coef", "clipped", "skipped"):
        assert f"Train_zclip_{name}.csv" in files, sorted(files)
    (path,) = glob.glob(os.path.join(log_dir, "**", "Train_zclip_grad_norm.csv"), recursive=True)
    with open(path) as f:
        rows = list(csv.reader(f))[1:]
    decisions = results[0]["monitor"]
    assert [float(v) for _, v in rows] == pytest.approx([decisions[1]["grad_norm"], decisions[3]["grad_norm"]])


def test_replay_reads_the_monitor_tensorboard(group_2):
    """zclip-dist replay pointed at DeepSpeed's output_path: the job folder found, samples become steps."""
    pytest.importorskip("tensorboard")
    from zclip_dist.traces import read_trace

    results, log_dir = group_2
    decisions = results[0]["monitor"]
    trace = read_trace(log_dir)
    assert trace.field == "Train/zclip/grad_norm" and trace.steps == [2, 4]  # steps_per_print 2, not samples
    assert trace.norms == pytest.approx([decisions[1]["grad_norm"], decisions[3]["grad_norm"]], rel=1e-6)
    assert trace.columns["clipped"] == [float(decisions[1]["clipped"]), float(decisions[3]["clipped"])]
