"""``zclip-dist events``, ``report`` and ``replay`` show the spike forensics a run recorded.

The events come from a real run of the drop-in (our JSONL), from the scalars a monitor received
(TensorBoard, as Megatron's writer and DeepSpeed's monitor write them), and from the example script
run as its docstring says (torchrun, two gloo ranks). Each must name the parameter and replica the
run's own events named, with the same shares.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
from torch.nn import functional as F

from zclip_dist import ZClip
from zclip_dist.cli import main
from zclip_dist.forensics import Event, ReplicaShare, Share, event_scalars

from . import forensics_models as fm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPIKE = 13  # loop index; the clipper's step is one more


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A drop-in run logging every step, a spike injected into one parameter: its JSONL and its events."""
    path = str(tmp_path_factory.mktemp("run") / "metrics.jsonl")
    seen: list[Event] = []
    zc = ZClip(**fm.CFG, log_jsonl=path, log_interval=1, on_event=seen.append, nonfinite="propagate")
    net = fm.make_net()
    for step in range(20):
        fm.set_factors(net, {fm.SPIKE_PARAM: fm.SPIKE_FACTOR} if step == SPIKE else {})
        net.zero_grad()
        x, y = fm.batch(step, 0)
        F.mse_loss(net(x), y).backward()
        zc.step(net)
    zc.events()
    assert [e.step for e in seen] == [SPIKE + 1] and seen[0].params[0].name == fm.SPIKE_PARAM
    return {"path": path, "event": seen[0]}


def _cli(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_events_lists_what_the_run_recorded(run, capsys):
    out = _cli(capsys, "events", run["path"])
    event = run["event"]
    assert "forensics: 1 event(s); top parameter: 2.weight (1 of 1); replicas not measured" in out
    row = next(line for line in out.splitlines() if line.startswith(str(event.step)))
    assert "clipped+spike" in row and f"{fm.SPIKE_PARAM} {100 * event.params[0].share:.3g}%" in row
    (line,) = _cli(capsys, "events", run["path"], "--json").splitlines()
    assert Event.from_json(json.loads(line)) == event  # lossless: shares to the last bit


def test_report_and_replay_keep_the_events(run, capsys, tmp_path):
    event, top = run["event"], run["event"].params[0]
    report = _cli(capsys, "report", run["path"])
    spike_line = next(line for line in report.splitlines() if line.strip().startswith(f"step {event.step:>8}"))
    assert spike_line.endswith(f"; {top.name} {100 * top.share:.3g}%")
    assert "forensics: 1 event(s)" in report
    out_csv = str(tmp_path / "replay.csv")
    replay = _cli(capsys, "replay", run["path"], "--csv-out", out_csv, "--no-png")
    clipped = next(line for line in replay.splitlines() if line.strip().startswith(f"step {event.step:>8}"))
    assert clipped.endswith(f"; in the run: {top.name} {100 * top.share:.3g}%")
    with open(out_csv) as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f)}
    assert rows[event.step]["run_top_param"] == top.name
    assert float(rows[event.step]["run_top_param_share"]) == top.share
    assert rows[event.step - 1]["run_top_param"] == ""
    # Simulated with a threshold the spike stays under: the replay says the run's event would not be clipped.
    loose = _cli(capsys, "replay", run["path"], "--zclip-z-thresh", "1e6", "--zclip-max-grad-norm", "none", "--no-png")
    assert "1 of them not clipped by this ZClip" in loose


def test_events_from_tensorboard_scalars(tmp_path, capsys):
    """Megatron's writer (and DeepSpeed's monitor, against samples) receive events as scalars
    (``event_scalars``); the CLI rebuilds them: shares, a NaN entry, the kinds from the logged flags."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    spike = Event(step=7, method="zclip", kinds=("clipped", "spike"), grad_norm=41.5, threshold=None,
                  params=(Share("decoder.layers.1.mlp.fc1.weight", 0.75), Share("embedding.weight", 0.25)),
                  replicas=(ReplicaShare(3, (), 0.98), ReplicaShare(0, (), 0.02)))
    nan = Event(step=9, method="zclip", kinds=("nonfinite",), grad_norm=None, threshold=None,
                params=(Share("output_layer.weight", None, True), Share("embedding.weight", 1.0)), replicas=())
    writer = SummaryWriter(str(tmp_path / "tb"))
    for step in range(1, 12):
        bad = step == nan.step
        if step % 5 == 0:  # Megatron's own norm, every --log-interval iterations
            writer.add_scalar("grad-norm", 1.0, step)
        writer.add_scalar("zclip/grad_norm", math.nan if bad else 1.0 + 40 * (step == spike.step), step)
        for flag, on in (("clipped", step == spike.step), ("spike", step == spike.step), ("nonfinite", bad)):
            writer.add_scalar(f"zclip/{flag}", float(on), step)
        for event in (spike, nan):
            if event.step == step:
                for tag, value in event_scalars(event, "zclip/event/").items():
                    writer.add_scalar(tag, value, step)
    writer.close()
    (got_spike, got_nan) = [Event.from_json(json.loads(line))
                            for line in _cli(capsys, "events", str(tmp_path / "tb"), "--json").splitlines()]
    assert got_spike.step == 7 and got_spike.kinds == spike.kinds and got_spike.grad_norm == 41.5
    assert [(p.name, p.nonfinite) for p in got_spike.params] == [(p.name, False) for p in spike.params]
    assert all(math.isclose(g.share, w.share, rel_tol=1e-6) for g, w in zip(got_spike.params, spike.params))
    assert [r.replica for r in got_spike.replicas] == [3, 0]
    assert got_nan.kinds == ("nonfinite",) and got_nan.grad_norm is None
    assert got_nan.params[0] == ("output_layer.weight", None, True)  # NaN first, as recorded
    # replay reads Megatron's grad-norm (logged every 5 iterations) and keeps the events all the same
    replay = _cli(capsys, "replay", str(tmp_path / "tb"), "--no-png")
    assert "[grad-norm]" in replay and "forensics: 2 event(s)" in replay
    assert "2 at steps the trace does not hold" in replay


@pytest.mark.slow
def test_the_example_under_torchrun_names_the_bad_replica(tmp_path, capsys):
    """examples/spike_forensics.py as its docstring runs it: rank 1 draws the corrupted batch; the
    events name replica 1 (rank 1) first, and its on_event hook finds its own sample ids."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           os.path.join(ROOT, "examples", "spike_forensics.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1: my batch carried the spike at step 61" in done.stdout
    assert "rank 0: my batch" not in done.stdout and "UserWarning" not in done.stderr
    (line,) = _cli(capsys, "events", str(tmp_path / "runs" / "forensics" / "metrics.jsonl"), "--json").splitlines()
    event = Event.from_json(json.loads(line))
    assert event.step == 61 and event.replicas[0].replica == 1 and event.replicas[0].ranks == (1,)
    assert event.replicas[0].share > 0.99


@pytest.mark.slow
def test_deepspeed_tensorboard_events_match_the_jsonl(tmp_path, capsys):
    """A DeepSpeed ZeRO-2 job under torchrun with a TensorBoard monitor: `zclip-dist events` on the
    monitor's folder lists the JSONL's events (same steps, kinds, norms, thresholds and shares to float32),
    and the corrupted batch's event names replica 1 first."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("tensorboard")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           os.path.join(ROOT, "tests", "ds_forensics_script.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    jsonl, tb = [[Event.from_json(json.loads(line))
                  for line in _cli(capsys, "events", str(tmp_path / where), "--json").splitlines()]
                 for where in ("metrics.jsonl", "tb")]
    assert [e.step for e in tb] == [e.step for e in jsonl] and len(jsonl) > 1
    for a, b in zip(jsonl, tb):
        assert (a.kinds, [p.name for p in a.params], [r.replica for r in a.replicas]) == \
               (b.kinds, [p.name for p in b.params], [r.replica for r in b.replicas])
        assert math.isclose(a.grad_norm, b.grad_norm, rel_tol=1e-6)
        assert math.isclose(a.threshold, b.threshold, rel_tol=1e-6)
        pairs = zip(a.params + a.replicas, b.params + b.replicas)
        assert all(math.isclose(p.share, q.share, rel_tol=1e-6) for p, q in pairs)
    spike = next(e for e in jsonl if "spike" in e.kinds)
    assert spike.step == 31 and spike.replicas[0].replica == 1 and spike.replicas[0].ranks == (1,)
    assert spike.replicas[0].share > 0.99
