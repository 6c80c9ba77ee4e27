"""The demo in short mode: its outputs exist and say what the README claims (read from files, not stdout)."""

from __future__ import annotations

import json
import os

import pytest

from zclip_dist.demo.corpus import Corpus, generate_text
from zclip_dist.demo.report import spike_events, summarize
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


def test_outputs_exist(demo):
    out = demo["outputs"]
    for key in ("png", "table", "results", "fixed_jsonl", "zclip_jsonl", "zclip_ds_config", "fixed_ds_config"):
        assert os.path.getsize(out[key]) > 0, key
    with open(out["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_zclip_clipped_the_injected_spike_and_fixed_clipping_did_not_avoid_it(demo):
    with open(demo["outputs"]["results"]) as f:
        results = json.load(f)
    s = results["settings"]["spike_step"]
    fixed, zclip = results["runs"]["fixed"], results["runs"]["zclip"]
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


def test_jsonl_has_one_line_per_logged_step(demo):
    settings = demo["settings"]
    for run in ("fixed", "zclip"):
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
    assert "ZClip" in text and "steps clipped" in text and "wall time" in text


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
    settings = DemoSettings(steps=len(losses), spike_step=29)
    history = [{"loss": v, "grad_norm": 1.0, "coef": 1.0, "clipped": False} for v in losses]
    m = summarize(history, settings, 1.0)
    assert m["jump"] == pytest.approx(2.0) and m["steps_to_recover"] == 5 and m["loss_spikes"] == 1


def test_settings_refuse_a_spike_outside_the_run():
    with pytest.raises(ValueError, match="outside"):
        DemoSettings(steps=10, spike_step=10)
    with pytest.raises(ValueError, match="warmup"):
        DemoSettings(steps=100, spike_step=5)
