"""ZClip state through engine.save_checkpoint / load_checkpoint, and non-finite steps, on real engines.

Save after step k, load in a fresh process group, continue: every decision equals the uninterrupted run's.
A NaN on one rank: every rank skips the step through DeepSpeed's overflow path; the statistics stay put.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests import ds_harness as H
from tests.distributed import run_ranks

SAVE_AT = 4  # warmup is 3 steps: the saved state holds live statistics
PATHS = {"zero0_fp32": {}, "zero1_fp32": {"zero_optimization": {"stage": 1}}}
NAN = {"zero0_nan": {}, "zero2_nan": {"zero_optimization": {"stage": 2}}}
NAN_STEP = 4


def _case(name, ds, root, resume=False):
    return H.Case(name, ds, steps=7, spike_step=5, ckpt_dir=f"{root}/{name}", save_at=SAVE_AT, resume=resume)


def _first(rank, world_size, root):
    runs = {name: H.run_case(_case(name, ds, root), rank) for name, ds in PATHS.items()}
    nan = {name: H.run_case(H.Case(name, ds, steps=6, nan_step=NAN_STEP), rank) for name, ds in NAN.items()}
    return runs, nan


def _resumed(rank, world_size, root):
    return {name: H.run_case(_case(name, ds, root, resume=True), rank) for name, ds in PATHS.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    first = run_ranks(H.call_in_rank, 2, _first, root, init=False)
    second = run_ranks(H.call_in_rank, 2, _resumed, root, init=False)  # a fresh process group
    return first, second


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("name", sorted(PATHS))
def test_resume_makes_the_same_decisions(runs, name):
    first, second = runs
    for rank in range(2):
        full, resumed = first[rank][0][name], second[rank][name]
        tail = full["decisions"][SAVE_AT:]
        assert len(tail) == len(resumed["decisions"]) == 3
        assert any(d["spike"] for d in tail), "the resumed steps must include a ZClip decision that matters"
        for want, got in zip(tail, resumed["decisions"]):
            assert all(_same(float(want[k]), float(got[k])) for k in want), (want, got)
        for key, value in full["state"].items():
            assert torch.equal(value, resumed["state"][key]), key


@pytest.mark.parametrize("name", sorted(NAN))
def test_nonfinite_norm_skips_on_every_rank(runs, name):
    first, _ = runs
    results = [first[rank][1][name] for rank in range(2)]
    for r in results:
        before, after = r["snaps"][NAN_STEP], r["snaps"][NAN_STEP + 1]
        assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the weights"
        skipped = r["decisions"][NAN_STEP]
        assert skipped["nonfinite"] and skipped["skipped"] and r["skipped_steps"] == 1
        # Statistics untouched: the next step sees the mean and std the skipped step saw.
        nxt = r["decisions"][NAN_STEP + 1]
        assert (nxt["mean"], nxt["std"]) == (skipped["mean"], skipped["std"])
        assert nxt["step"] == NAN_STEP + 2 and nxt["num_nonfinite"] == 1
        after_skip = r["snaps"][NAN_STEP + 2]
        assert any(not torch.equal(after[k], after_skip[k]) for k in after), "training did not resume"
    for key, value in results[0]["state"].items():
        assert torch.equal(value, results[1]["state"][key]), key
