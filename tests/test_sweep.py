"""The learning-rate x method sweep in short mode, run as users start it, against its committed numbers."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

from zclip_dist.cli import main
from zclip_dist.demo.sweep import METHODS, SweepSettings, short_mode, train_cell
from zclip_dist.demo.sweep_report import aggregate, summarize_run, unigram_entropy

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED_SHORT = os.path.join(ROOT, "docs", "sweep_short.json")
SHORT = short_mode()


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sweep"))
    assert main(["sweep", "--short", "--out", out, "--no-progress"]) == 0
    with open(os.path.join(out, "results.json")) as f:
        return {"out": out, "results": json.load(f)}


def _cells(results):
    return {(c["lr"], c["method"]): c for c in results["cells"]}


def test_outputs_and_tables_are_well_formed(short):
    out, results = short["out"], short["results"]
    for name in ("sweep.png", "curves.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert len(results["runs"]) == len(SHORT["lrs"]) * len(METHODS) * len(SHORT["seeds"])
    with open(os.path.join(out, "table.md")) as f:
        text = f.read()
    grids = [block for block in text.split("\n\n") if block.startswith("| method")]
    assert len(grids) == 3  # final loss, spikes, steps clipped
    for grid in grids:
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in grid.splitlines()]
        assert rows[0][1:] == [f"{lr:g}" for lr in SHORT["lrs"]]
        assert [r[0] for r in rows[2:]] == ["no clipping", "fixed tight", "fixed loose", "ZClip", "AdaGC"]
        for r in rows[2:]:
            assert all(re.match(r"^(\d+\.\d+( ± \d+\.\d+)?( \*\*\(\d/\d div\)\*\*)?|\d+%|NaN)$", c) for c in r[1:]), r
    with open(os.path.join(out, "traces.json")) as f:
        traces = json.load(f)
    assert all(len(t["loss"]) == SHORT["steps"] == len(t["grad_norm"]) == len(t["clipped"]) for t in traces)


def test_the_high_learning_rate_is_unstable_without_clipping(short):
    """The setting has the property the sweep is about: no clipping diverges at the highest learning rate
    (final loss no better than character frequencies) and trains at the lowest."""
    results = short["results"]
    cells = _cells(results)
    low, high = min(SHORT["lrs"]), max(SHORT["lrs"])
    assert cells[(high, "none")]["diverged"] == 1
    assert cells[(low, "none")]["diverged"] == 0
    assert cells[(low, "none")]["final_mean"] < 0.6 * results["collapse_loss"]


def test_reproduces_the_committed_short_table(short):
    """docs/sweep_short.json is this command's output, committed; a rerun agrees cell for cell (exactly on
    the same CPU and torch; the tolerance covers other CPUs' rounding, not a change of behaviour)."""
    with open(COMMITTED_SHORT) as f:
        committed = json.load(f)
    assert committed["settings"] == short["results"]["settings"] | {"out": committed["settings"]["out"],
                                                                    "jobs": committed["settings"]["jobs"]}
    mine, theirs = _cells(short["results"]), _cells(committed)
    assert mine.keys() == theirs.keys()
    for key, c in theirs.items():
        assert mine[key]["diverged"] == c["diverged"], key
        assert mine[key]["final_mean"] == pytest.approx(c["final_mean"], abs=0.05, rel=0.05), key
        assert mine[key]["clipped_frac"] == pytest.approx(c["clipped_frac"], abs=0.05), key


def test_each_method_clips_as_configured():
    """Twenty steps at a learning rate where the early norms are large: the post-clip norm each method
    leaves is what its rule says (fixed: min(norm, clip); ZClip: capped at the loose clip in warmup)."""
    settings = SweepSettings(steps=20, tight_clip=0.5, loose_clip=1.0)
    runs = {m: train_cell(settings, 3e-3, m, 0) for m in METHODS}
    norms = runs["none"]["grad_norm"]
    # Same seed, same batches: the first step's pre-clip norm is the same for every method.
    assert all(r["grad_norm"][0] == pytest.approx(norms[0]) for r in runs.values())
    assert runs["none"]["clipped"] == [False] * 20
    assert runs["fixed-tight"]["clipped"][0] == (norms[0] > 0.5)
    assert runs["fixed-loose"]["clipped"][0] == (norms[0] > 1.0)
    # In warmup ZClip clips at its cap only, AdaGC at its lambda_abs: both the loose clip here.
    assert runs["zclip"]["clipped"][0] == runs["fixed-loose"]["clipped"][0]
    assert runs["adagc"]["clipped"][0] == runs["fixed-loose"]["clipped"][0]


def test_a_stopped_sweep_resumes_from_its_saved_runs(tmp_path, monkeypatch):
    from zclip_dist.demo import sweep

    settings = SweepSettings(lrs=(3e-3,), methods=("none", "zclip"), seeds=(0,), steps=20, out=str(tmp_path))
    first = sweep.run_cells(settings, progress=False)
    trained = []
    real = sweep.train_cell
    monkeypatch.setattr(sweep, "train_cell", lambda *a, **k: trained.append(a[1:4]) or real(*a, **k))
    assert sweep.run_cells(settings.replace(methods=("none", "zclip", "adagc")), progress=False)[:2] == first
    assert trained == [(3e-3, "adagc", 0)]  # only the new cell trains
    sweep.run_cells(settings.replace(steps=21), progress=False)  # other settings: nothing is reused
    assert trained[1:] == [(3e-3, "none", 0), (3e-3, "zclip", 0)]


def test_summaries_count_spikes_and_divergence():
    collapse = 2.0
    calm = {"lr": 1.0, "method": "none", "seed": 0, "loss": [1.0] * 40, "grad_norm": [1.0] * 40,
            "clipped": [False] * 40, "wall_s": 1.0}
    spiky = dict(calm, seed=1, loss=[1.0] * 20 + [1.6] + [1.0] * 19, clipped=[True] * 10 + [False] * 30)
    dead = dict(calm, seed=2, loss=[1.0] * 20 + [2.5] * 20)
    nan = dict(calm, seed=3, loss=[1.0] * 20 + [math.nan] * 20)
    s = [summarize_run(r, collapse) for r in (calm, spiky, dead, nan)]
    assert [x["spikes"] for x in s] == [0, 1, 1, None]
    assert [x["diverged"] for x in s] == [False, False, True, True]
    assert s[1]["clipped_frac"] == 0.25 and s[2]["final_loss"] == 2.5
    cells = aggregate(s[:3], SweepSettings(lrs=(1.0,), methods=("none",), seeds=(0, 1, 2)))
    c = cells[(1.0, "none")]
    assert c["diverged"] == 1 and c["seeds"] == 3 and c["spikes_mean"] == pytest.approx(2 / 3)
    assert c["final_mean"] == pytest.approx(1.5)


def test_unigram_entropy():
    assert unigram_entropy(torch.tensor([0, 1, 0, 1])) == pytest.approx(math.log(2))
    assert unigram_entropy(torch.tensor([3, 3, 3])) == 0.0


@pytest.mark.parametrize("argv, message", [
    (["--methods", "none,zclip2"], "method = 'zclip2' is invalid: allowed none, fixed-tight, fixed-loose, zclip, adagc"),
    (["--tight-clip", "5", "--loose-clip", "2"], "clips = (5.0, 2.0) are invalid"),
    (["--lrs", "0.1,-1"], "is not a comma-separated list of positive numbers"),
    (["--size", "huge"], "invalid choice: 'huge'"),
    (["--steps", "5"], "steps = 5 is invalid"),
    (["--size", "large"], "size 'large' has no pilot yet: run --pilot and give --tight-clip and --loose-clip"),
])
def test_bad_input_is_one_line_before_training(argv, message, capsys):
    assert main(["sweep", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
