"""The demo in short mode: its outputs exist and say what the README claims (read from files, not stdout)."""

from __future__ import annotations

import json
import os

import pytest

from zclip_dist.demo.corpus import Corpus, generate_text
from zclip_dist.demo.report import pilot_summary, spike_events, summarize
from zclip_dist.demo.settings import DemoSettings

from .demo_run import short_demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo():
    return short_demo()


def _lines(path):
    """The records of a metrics file, after its header line."""
    with open(path) as f:
        header, *records = [json.loads(line) for line in f]
    assert header["zclip_dist_metrics"] == 1
    return records


RUNS = ("fixed-1", "fixed-2", "fixed-8", "zclip", "adagc")


def _results(demo):
    with open(demo["outputs"]["results"]) as f:
        return json.load(f)


def test_outputs_exist(demo):
    out = demo["outputs"]
    assert demo["settings"].runs == RUNS
    for key in ("png", "table", "results") + tuple(f"{r}_{kind}" for r in RUNS for kind in ("jsonl", "ds_config")):
        assert os.path.getsize(out[key]) > 0, key
    with open(out["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_each_run_has_its_own_clipping_config(demo):
    configs = {}
    for r in RUNS:
        with open(demo["outputs"][f"{r}_ds_config"]) as f:
            configs[r] = json.load(f)
    assert [configs[r]["gradient_clipping"] for r in RUNS] == [1.0, 2.0, 8.0, 8.0, 8.0]
    assert [("zclip" in configs[r], "adagc" in configs[r]) for r in RUNS] == [(False, False)] * 3 + [(True, False), (False, True)]
    assert configs["adagc"]["adagc"] == {"clip_ratio": 1.04, "beta": 0.99, "warmup_steps": 100}


def test_zclip_clipped_the_injected_spike_and_fixed_clipping_did_not_avoid_it(demo):
    results = _results(demo)
    s = results["settings"]["spike_step"]
    fixed, zclip = results["runs"]["fixed-8"], results["runs"]["zclip"]
    # ZClip clipped the injected step far below the fixed ceiling.
    assert zclip["injected"]["clipped"] and zclip["injected"]["step"] == s
    assert zclip["injected"]["clipped_norm"] < 0.5 * results["settings"]["clip"]
    # The fixed run let it through at its ceiling and the loss spiked right after; ZClip's did not.
    assert fixed["injected"]["clipped_norm"] == pytest.approx(results["settings"]["clip"], rel=1e-4)
    assert s + 1 in fixed["spike_steps"]
    assert s + 1 not in zclip["spike_steps"]
    assert fixed["jump"] > zclip["jump"]
    assert zclip["steps_to_recover"] is not None
    assert fixed["steps_to_recover"] is None or fixed["steps_to_recover"] > zclip["steps_to_recover"]


def test_tight_fixed_clips_bind_often_and_adagc_clips_the_injected_step_per_tensor(demo):
    runs = _results(demo)["runs"]
    # The pilot's typical norm is about 1.5: a clip of 1 binds on most steps, 2 on fewer, 8 almost never.
    n = runs["fixed-1"]["steps"]
    assert runs["fixed-1"]["steps_clipped"] > n / 2
    assert runs["fixed-1"]["steps_clipped"] > runs["fixed-2"]["steps_clipped"] > runs["fixed-8"]["steps_clipped"]
    assert runs["fixed-1"]["injected"]["clipped_norm"] == pytest.approx(1.0, rel=1e-4)
    inj = runs["adagc"]["injected"]
    assert inj["clipped"] and inj["clipped_tensors"] > 0 and inj["coef"] < 0.05 and inj["clipped_norm"] is None


def test_jsonl_has_one_line_per_logged_step(demo):
    settings = demo["settings"]
    for run in RUNS:
        lines = _lines(demo["outputs"][f"{run}_jsonl"])
        assert [r["step"] for r in lines] == list(range(settings.steps))
        assert all(r["run"] == run for r in lines)
    at = _lines(demo["outputs"]["zclip_jsonl"])[settings.spike_step]
    assert at["clipped"] and at["spike"] and at["coef"] < 0.01
    with open(demo["outputs"]["zclip_jsonl"]) as f:
        header = json.loads(f.readline())  # the settings replay needs: the run's "zclip" entry, capped by gradient_clipping
    assert header["method"] == "zclip" and header["settings"]["max_grad_norm"] == settings.clip
    assert {k: header["settings"][k] for k in settings.zclip} == settings.zclip


def test_table_is_the_summary(demo):
    with open(demo["outputs"]["table"]) as f:
        text = f.read()
    assert text.strip() == demo["table"].strip()
    header = text.splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")][1:] == [
        "fixed clip 1", "fixed clip 2", "fixed clip 8", "ZClip (cap 8)", "AdaGC (warmup clip 8)"]
    for row in ("loss jump after step", "steps to recover", "steps clipped", "final loss", "best loss", "wall time"):
        assert row in text


def test_corpus_is_reproducible_from_the_seed():
    assert generate_text(3, 5000) == generate_text(3, 5000)
    assert generate_text(3, 5000) != generate_text(4, 5000)
    c = Corpus(0, 20_000, 48, 3)
    x1, y1 = c.batch(7, 1, 4, 16)
    x2, y2 = c.batch(7, 1, 4, 16)
    assert x1.equal(x2) and y1.equal(y2)
    assert x1[:, 1:].equal(y1[:, :-1])  # targets are the next tokens
    assert not x1.equal(c.batch(7, 2, 4, 16)[0])


def test_spike_analysis_on_a_synthetic_curve():
    losses = [1.0] * 30 + [2.0, 1.6, 1.3, 1.1, 1.02] + [1.0] * 10
    assert spike_events(losses) == [30]
    settings = DemoSettings(steps=len(losses), spike_step=29, adagc={"warmup_steps": 10})
    history = [{"loss": v, "grad_norm": 1.0, "coef": 1.0, "clipped": False} for v in losses]
    m = summarize(history, settings, 1.0)
    assert m["jump"] == pytest.approx(2.0) and m["steps_to_recover"] == 5 and m["loss_spikes"] == 1


def test_settings_refuse_a_spike_outside_the_run():
    with pytest.raises(ValueError, match="outside"):
        DemoSettings(steps=10, spike_step=10)
    with pytest.raises(ValueError, match="ZClip's warmup"):
        DemoSettings(steps=200, spike_step=5)
    with pytest.raises(ValueError, match="AdaGC's warmup"):
        DemoSettings(steps=200, spike_step=80)
    with pytest.raises(ValueError, match="fixed clips"):
        DemoSettings(fixed_clips=(1.0, 0.0))


def test_pilot_is_one_unclipped_run_and_reports_the_typical_norm():
    settings = DemoSettings(pilot=True)
    assert settings.runs == ("none",)
    history = [{"grad_norm": 100.0}] * 25 + [{"grad_norm": float(v)} for v in range(1, 101)]
    p = pilot_summary(history)  # the first 25 steps (ZClip's warmup, the loss falling fast) are left out
    assert p["median"] == pytest.approx(50.5) and p["max"] == 100.0 and p["steps"] == 100
    assert p["p90"] == pytest.approx(90.9)
