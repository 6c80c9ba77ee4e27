"""Offline replay: exact reproduction of a DeepSpeed run's decisions, the three trace readers, AdaGC-global."""

from __future__ import annotations

import csv
import json

import pytest

from zclip_dist.cli import main
from zclip_dist.config import AdaGCConfig, ZClipConfig
from zclip_dist.replay import TraceError, read_trace, replay, simulate_adagc, simulate_zclip

from .demo_run import short_demo


@pytest.mark.slow
def test_replay_reproduces_the_decisions_of_a_deepspeed_run(tmp_path, capsys):
    """The short demo's ZClip run is 4 gloo ranks of real DeepSpeed ZeRO-1 engines, logged every step."""
    out = short_demo()["outputs"]
    with open(out["zclip_jsonl"]) as f:
        recorded = [json.loads(line) for line in f]
    table = tmp_path / "decisions.csv"
    assert main(["replay", out["zclip_jsonl"], "--ds-config", out["zclip_ds_config"], "--csv-out", str(table),
                 "--png", str(tmp_path / "r.png"), "--no-progress"]) == 0
    with open(table) as f:
        replayed = list(csv.DictReader(f))
    assert [int(r["step"]) for r in replayed] == [r["step"] for r in recorded]
    assert [int(r["step"]) for r in replayed if r["zclip_clipped"] == "1"] == [r["step"] for r in recorded if r["clipped"]]
    for run, sim in zip(recorded, replayed):
        assert float(sim["zclip_coef"]) == pytest.approx(run["coef"], rel=1e-6, abs=0)
        assert float(sim["zclip_threshold"]) == pytest.approx(run["threshold"], rel=1e-6)
    printed = capsys.readouterr().out
    assert f"step {short_demo()['settings'].spike_step:>8}:" in printed
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


NORMS = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98, 12.0, 1.0, 1.01]


def _expected(norms=NORMS):
    return simulate_zclip(norms, ZClipConfig(warmup_steps=5, max_grad_norm=None), progress=False)


def _check(trace, steps):
    assert trace.steps == steps
    assert trace.norms == pytest.approx(NORMS, rel=1e-6)


def test_jsonl_reader_filters_runs_and_keeps_steps(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [{"run": "zclip", "step": 10 + i, "grad_norm": v} for i, v in enumerate(NORMS)]
    lines += [{"run": "fixed", "step": 10 + i, "grad_norm": 99.0} for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    _check(read_trace(str(path), run="zclip"), list(range(10, 21)))
    with pytest.raises(TraceError, match="repeat"):
        read_trace(str(path))  # two runs interleaved: refuse rather than mix them


def test_csv_reader_finds_the_norm_column(tmp_path):
    path = tmp_path / "n.csv"
    rows = ["iteration,lm loss,grad-norm"] + [f"{i * 2},3.0,{v}" for i, v in enumerate(NORMS)]
    path.write_text("\n".join(rows) + "\n")
    trace = read_trace(str(path))
    _check(trace, list(range(0, 22, 2)))
    assert trace.field == "grad-norm" and trace.gaps() == 10
    with pytest.raises(TraceError, match="no column 'nope'"):
        read_trace(str(path), field="nope")


@pytest.mark.parametrize("tag", ["Train/zclip/grad_norm", "grad-norm"])  # DeepSpeed monitor, Megatron
def test_tensorboard_reader(tmp_path, tag):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    for i, v in enumerate(NORMS):
        writer.add_scalar("Train/Samples/train_loss", 2.0, i * 32)
        writer.add_scalar(tag, v, i * 32)
    writer.close()
    trace = read_trace(str(tmp_path))
    assert trace.field == tag
    _check(trace, [i * 32 for i in range(len(NORMS))])
    # TensorBoard stores float32: the decisions match those on the float32-rounded norms.
    got = replay(trace, ZClipConfig(warmup_steps=5, max_grad_norm=None), progress=False).zclip
    assert got["clipped"] == _expected()["clipped"]


def test_zclip_replay_clips_the_spike_only():
    z = _expected()
    assert [i for i, c in enumerate(z["clipped"]) if c] == [8]
    assert z["warmup"][:5] == [True] * 5 and not any(z["warmup"][5:])


def test_adagc_global_follows_the_official_rule():
    cfg = AdaGCConfig(mode="adagc-global", warmup_steps=3, max_grad_norm=1.0, clip_ratio=1.04, beta=0.99)
    a = simulate_adagc([2.0, 0.8, 0.9, 0.85, 10.0], cfg, progress=False)
    # warmup: global clip at 1.0; gamma = running min of min(G, 1.0) = 0.8
    assert a["coef"][0] == pytest.approx(1.0 / (2.0 + 1e-6), rel=1e-6)
    assert a["threshold"][:3] == [1.0, 1.0, 1.0]
    assert a["threshold"][3] == pytest.approx(1.04 * 0.8, rel=1e-6) and a["clipped"][3]  # 0.85 > 0.832
    gamma = 0.99 * 0.8 + 0.01 * 1.04 * 0.8
    assert a["coef"][4] == pytest.approx(1.04 * gamma / (10.0 + 1e-6), rel=1e-5)
    with pytest.raises(ValueError, match="adagc-global"):
        simulate_adagc([1.0], AdaGCConfig(), progress=False)


@pytest.mark.parametrize("content,match", [
    ('{"grad_norm": 1.0}\nnot json\n', "not JSON"),
    ('{"loss": 1.0}\n', "cannot tell which key"),
    ('{"grad_norm": "abc"}\n', "not a number"),
    ("", "no records"),
])
def test_bad_jsonl_is_one_clear_error(tmp_path, content, match):
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    with pytest.raises(TraceError, match=match) as err:
        read_trace(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_unknown_extension_asks_for_format(tmp_path):
    path = tmp_path / "trace.bin"
    path.write_bytes(b"\x00\x01")
    with pytest.raises(TraceError, match="--format"):
        read_trace(str(path))
