"""Offline replay: a run's own JSONL replays its decisions exactly with no flags; the readers take what
DeepSpeed (TensorBoard, against samples, in output_path/job_name/) and Megatron (grad-norm) write;
settings precedence; the plot of a long trace keeps every event."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch import nn

from zclip_dist import AdaGC, ZClip
from zclip_dist.cli import main
from zclip_dist.clipper import Clipper
from zclip_dist.config import AdaGCConfig, ZClipConfig
from zclip_dist.replay import TraceError, read_trace, replay, resolve_settings, simulate_adagc, simulate_zclip

from .demo_run import short_demo


def _rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _records(path) -> list[dict]:
    def strict(constant):
        raise ValueError(f"not strict JSON: {constant}")

    with open(path) as f:
        lines = [json.loads(line, parse_constant=strict) for line in f]  # any JSON parser reads it
    return lines


def dropin_run(tmp_path, clipper, steps: int = 300) -> str:
    """A tiny model trained with a drop-in clipper logging every step; spikes at 150-151 and 250, a NaN at 200."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        x = torch.randn(16, 8, generator=gen)
        y = x.sum(1, keepdim=True) * (40.0 if t in (150, 151, 250) else 1.0)
        if t == 200:
            x[0, 0] = float("nan")
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        clipper.step(model)
        opt.step()
    return clipper.config.log_jsonl


def test_zclip_dropin_jsonl_replays_its_own_decisions_with_no_flags(tmp_path, capsys):
    path = dropin_run(tmp_path, ZClip(alpha=0.9, z_thresh=2.0, warmup_steps=20, max_grad_norm=3.0,
                                      log_jsonl=str(tmp_path / "run.jsonl")))
    lines = _records(path)
    assert lines[0]["zclip_dist_metrics"] == 1 and lines[0]["method"] == "zclip"
    assert lines[0]["settings"]["alpha"] == 0.9 and "log_jsonl" not in lines[0]["settings"]
    recorded = lines[1:]
    nan_step = recorded[200]
    assert nan_step["grad_norm"] is None and nan_step["nonfinite_values"]["grad_norm"] == "NaN" and nan_step["nonfinite"]

    out = tmp_path / "d.csv"
    assert main(["replay", path, "--csv-out", str(out), "--no-png"]) == 0
    printed = capsys.readouterr().out
    assert "settings from the trace's header (zclip run)" in printed
    assert "the run's own ZClip decisions: the same at every step" in printed
    replayed = _rows(out)
    assert [int(r["step"]) for r in replayed] == [r["step"] for r in recorded]
    assert [r["zclip_clipped"] == "1" for r in replayed] == [r["clipped"] for r in recorded]
    assert [float(r["zclip_coef"]) for r in replayed] == [r["coef"] for r in recorded]  # exactly, every step
    assert sum(r["clipped"] for r in recorded) > 5 and any(r["clipped"] and r["warmup"] for r in recorded)

    # the defaults are not the run's settings: without the header the decisions differ, and replay says so
    assert main(["replay", path, "--csv-out", str(out), "--no-png", "--ignore-header"]) == 0
    assert [r["zclip_clipped"] == "1" for r in _rows(out)] != [r["clipped"] for r in recorded]
    assert "settings from defaults" in capsys.readouterr().out


def test_adagc_global_dropin_jsonl_replays_its_own_decisions_with_no_flags(tmp_path, capsys):
    path = dropin_run(tmp_path, AdaGC(mode="adagc-global", warmup_steps=30, clip_ratio=1.1, beta=0.95,
                                      max_grad_norm=2.0, log_jsonl=str(tmp_path / "a.jsonl")))
    recorded = _records(path)[1:]
    out = tmp_path / "d.csv"
    assert main(["replay", path, "--csv-out", str(out), "--no-png"]) == 0
    assert "the run's own AdaGC-global decisions: the same at every step" in capsys.readouterr().out
    replayed = _rows(out)
    assert [r["adagc_clipped"] == "1" for r in replayed] == [r["num_clipped_tensors"] > 0 for r in recorded]
    assert [float(r["adagc_coef"]) for r in replayed if r["adagc_clipped"] == "1"] == \
        [r["min_coef"] for r in recorded if r["num_clipped_tensors"]]
    assert sum(r["num_clipped_tensors"] > 0 for r in recorded) > 5


def test_report_of_a_run(tmp_path, capsys):
    path = dropin_run(tmp_path, ZClip(alpha=0.9, warmup_steps=20, max_grad_norm=None, recovery_steps=30,
                                      log_jsonl=str(tmp_path / "run.jsonl")))
    recorded = _records(path)[1:]
    assert main(["report", path, "--top", "3"]) == 0
    text = capsys.readouterr().out
    n_clipped = sum(r["clipped"] for r in recorded)
    assert f"clipped: {n_clipped} of 300 steps ({100 * n_clipped / 300:.1f}%; 0 in warmup" in text
    assert "[recorded]" in text and "method: zclip (alpha=0.9" in text
    largest = [line.split()[1].rstrip(":") for line in text.splitlines() if line.startswith("  step ")]
    assert largest == ["151", "152", "251"]  # the injected spikes, largest first in size, listed by step
    assert "non-finite norms: 1 (steps 201)" in text
    assert "regime shifts accepted: none" in text and "threshold after warmup: min" in text
    # a trace of norms alone: the decisions are simulated, and the report says so
    csv_path = _csv_trace(tmp_path, [r["grad_norm"] if r["grad_norm"] is not None else "nan" for r in recorded])
    assert main(["report", csv_path]) == 0
    assert "[simulated: the trace records no decisions; ZClip with defaults]" in capsys.readouterr().out


@pytest.mark.slow
def test_replay_reproduces_the_decisions_of_a_deepspeed_run(tmp_path, capsys):
    """The short demo's ZClip run: 4 gloo ranks of real DeepSpeed ZeRO-1 engines, logged every step."""
    out = short_demo()["outputs"]
    recorded = _records(out["zclip_jsonl"])[1:]
    table = tmp_path / "decisions.csv"
    assert main(["replay", out["zclip_jsonl"], "--csv-out", str(table), "--png", str(tmp_path / "r.png")]) == 0
    replayed = _rows(table)
    assert [int(r["step"]) for r in replayed] == [r["step"] for r in recorded]
    assert [r["zclip_clipped"] == "1" for r in replayed] == [r["clipped"] for r in recorded]
    assert [float(r["zclip_coef"]) for r in replayed] == [r["coef"] for r in recorded]
    printed = capsys.readouterr().out
    assert "the same at every step" in printed
    assert f"step {short_demo()['settings'].spike_step:>8}:" in printed
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    # each fixed run's header carries its own cap, which ZClip and AdaGC then take
    from zclip_dist.demo.settings import fixed_run

    for clip in short_demo()["settings"].fixed_clips:
        fixed = read_trace(out[f"{fixed_run(clip)}_jsonl"])
        s = resolve_settings(fixed)
        assert fixed.header["method"] == "fixed"
        assert s.zclip.max_grad_norm == s.adagc.max_grad_norm == clip


# ---- what the engines write -----------------------------------------------------------------------
def deepspeed_monitor(output_path: str, job_name: str, monkeypatch):
    """DeepSpeed's own TensorBoard monitor class (rank 0 of a job), writing where DeepSpeed writes."""
    from deepspeed.monitor import tensorboard as tb
    from deepspeed.monitor.config import DeepSpeedMonitorConfig

    monkeypatch.setattr(tb.dist, "get_rank", lambda group=None: 0)
    config = DeepSpeedMonitorConfig(tensorboard={"enabled": True, "output_path": output_path, "job_name": job_name})
    return tb.TensorBoardMonitor(config.tensorboard)


def write_like_deepspeed(monitor, norms, batch: int, steps_per_print: int, prefix: str = "Train/zclip/",
                         with_step: bool = True) -> None:
    """The events of a DeepSpeed run: lr at every optimizer step, our metrics every steps_per_print steps,
    both against global_samples (steps x train_batch_size), as engine.step and our attachment log them."""
    clipper = Clipper(ZClipConfig(warmup_steps=5), device="cpu", cuda_graph=False)
    for k, g in enumerate(norms, 1):
        clipper.step(g)
        samples = k * batch
        monitor.write_events([("Train/Samples/lr", 1e-3, samples)])
        if k % steps_per_print == 0:
            m = clipper.metrics()
            names = [n for n in m if with_step or n != "step"]
            monitor.write_events([(prefix + n, float(m[n]), samples) for n in names])
    monitor.summary_writer.close()


NORMS = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98, 12.0, 1.0, 1.01, 0.97] * 5


@pytest.mark.parametrize("with_step", [True, False], ids=["Train/zclip/step", "lr spacing"])
def test_deepspeed_tensorboard_output_path_and_samples_become_steps(tmp_path, monkeypatch, with_step):
    pytest.importorskip("tensorboard")
    pytest.importorskip("deepspeed")
    write_like_deepspeed(deepspeed_monitor(str(tmp_path / "tb"), "my_job", monkeypatch), NORMS, batch=32,
                         steps_per_print=3, with_step=with_step)
    assert (tmp_path / "tb" / "my_job").is_dir()  # DeepSpeed's layout: output_path/job_name/events.*
    trace = read_trace(str(tmp_path / "tb"))  # the output_path, as a user would point at it
    assert trace.field == "Train/zclip/grad_norm"
    assert trace.steps == list(range(3, len(NORMS) + 1, 3))  # optimizer steps, not samples
    assert trace.norms == pytest.approx(NORMS[2::3], rel=1e-6)
    assert trace.interval() == 3 and trace.gaps() == len(NORMS) - len(NORMS) // 3 - 2
    assert any("samples" in note for note in trace.notes)
    assert read_trace(str(tmp_path / "tb"), samples_per_step=32).steps == trace.steps
    with pytest.raises(TraceError, match="not multiples of 7"):
        read_trace(str(tmp_path / "tb"), samples_per_step=7)


def test_deepspeed_tensorboard_with_two_jobs_asks_for_one(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("deepspeed")
    for job in ("a", "b"):
        write_like_deepspeed(deepspeed_monitor(str(tmp_path), job, monkeypatch), NORMS[:6], batch=8, steps_per_print=1)
    with pytest.raises(TraceError, match=r"2 TensorBoard runs here \(a, b\); point at one"):
        read_trace(str(tmp_path))
    assert read_trace(str(tmp_path / "b")).steps == list(range(1, 7))


def test_megatron_tensorboard_grad_norm_by_iteration(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))  # Megatron's --tensorboard-dir
    clipper = Clipper(ZClipConfig(warmup_steps=5), device="cpu", cuda_graph=False)
    for iteration, g in enumerate(NORMS, 1):  # as training_log writes them, and our log_metrics
        clipper.step(g)
        writer.add_scalar("lm loss", 3.0, iteration)
        writer.add_scalar("grad-norm", g, iteration)
        writer.add_scalar("grad-norm vs samples", g, iteration * 64)
        for name, value in clipper.metrics().items():
            writer.add_scalar(f"zclip/{name}", float(value), iteration)
    writer.close()
    trace = read_trace(str(tmp_path))
    assert trace.field == "grad-norm" and trace.steps == list(range(1, len(NORMS) + 1)) and not trace.gaps()
    # TensorBoard stores float32: the decisions are those on the float32-rounded norms
    got = replay(trace, ZClipConfig(warmup_steps=5)).zclip
    assert got["clipped"] == simulate_zclip(NORMS, ZClipConfig(warmup_steps=5))["clipped"]
    # the report reads the decisions recorded next to zclip/grad_norm
    assert main(["report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "[zclip/grad_norm]" in text and "[recorded]" in text
    assert f"clipped: {sum(got['clipped'])} of {len(NORMS)} steps" in text


# ---- settings -------------------------------------------------------------------------------------
def _csv_trace(tmp_path, norms=NORMS):
    path = tmp_path / "n.csv"
    path.write_text("iteration,grad-norm\n" + "".join(f"{i},{v}\n" for i, v in enumerate(norms)))
    return str(path)


def test_ds_config_sets_both_caps_and_flags_win(tmp_path):
    trace = read_trace(_csv_trace(tmp_path))
    ds = {"gradient_clipping": 4.0, "zclip": {"alpha": 0.8}}
    s = resolve_settings(trace, ds_config=ds)
    assert s.zclip.alpha == 0.8 and s.zclip.max_grad_norm == 4.0 and s.adagc.max_grad_norm == 4.0
    s = resolve_settings(trace, ds_config={"gradient_clipping": 2.0, "adagc": {"mode": "adagc-global", "beta": 0.9}})
    assert s.adagc.beta == 0.9 and s.adagc.max_grad_norm == 2.0 and s.zclip.max_grad_norm == 2.0
    assert s.reproduces == "adagc"
    s = resolve_settings(trace, ds_config={"gradient_clipping": 3.0}, adagc={"max_grad_norm": None})
    assert s.zclip.max_grad_norm == 3.0 and s.adagc.max_grad_norm is None


def test_replay_flags(tmp_path, capsys):
    path = _csv_trace(tmp_path)
    assert main(["replay", path, "--no-png", "--adagc-max-grad-norm", "none", "--zclip-max-grad-norm", "none"]) == 0
    assert "AdaGC-global (clip_ratio=1.04, beta=0.99, warmup_steps=100, max_grad_norm=None" in capsys.readouterr().out
    for flag in ("--zclip-log-jsonl", "--adagc-log-interval", "--zclip-verify-every", "--no-progress"):
        assert main(["replay", path, flag, "1"]) == 2
        assert "unrecognized arguments" in capsys.readouterr().err


# ---- readers ----------------------------------------------------------------------------------------
def test_jsonl_reader_filters_runs_and_keeps_steps(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [{"run": "zclip", "step": 10 + i, "grad_norm": v} for i, v in enumerate(NORMS)]
    lines += [{"run": "fixed", "step": 10 + i, "grad_norm": 99.0} for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    trace = read_trace(str(path), run="zclip")
    assert trace.steps == list(range(10, 10 + len(NORMS))) and trace.norms == NORMS
    with pytest.raises(TraceError, match="repeat"):
        read_trace(str(path))  # two runs interleaved: refuse rather than mix them


def test_resumed_jsonl_keeps_the_later_lines(tmp_path):
    path = str(tmp_path / "r.jsonl")
    first = ZClip(warmup_steps=3, log_jsonl=path)
    for g in (1.0, 1.1, 0.9):
        first.clipper.step(g)
    checkpoint = first.state_dict()
    for g in (1.0, 1.2):  # logged, then lost: the job dies and resumes from the checkpoint
        first.clipper.step(g)
    first.clipper._sink.close()
    second = ZClip(warmup_steps=3, log_jsonl=path)
    second.load_state_dict(checkpoint)
    for g in (5.0, 1.0):
        second.clipper.step(g)
    trace = read_trace(path)
    assert trace.steps == [1, 2, 3, 4, 5] and trace.norms == [1.0, 1.1, 0.9, 5.0, 1.0]
    assert any("logged twice" in note for note in trace.notes)


def test_csv_reader_finds_the_norm_column(tmp_path):
    trace = read_trace(_csv_trace(tmp_path))
    assert trace.field == "grad-norm" and trace.steps == list(range(len(NORMS)))
    with pytest.raises(TraceError, match="no column 'nope'"):
        read_trace(_csv_trace(tmp_path), field_name="nope")


@pytest.mark.parametrize("content,match", [
    ('{"grad_norm": 1.0}\nnot json\n', "not JSON"),
    ('{"loss": 1.0}\n', "cannot tell which key"),
    ('{"grad_norm": "abc"}\n', "not a number"),
    ('{"grad_norm": -1.0}\n', "never negative"),
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


def test_adagc_global_follows_the_official_rule():
    cfg = AdaGCConfig(mode="adagc-global", warmup_steps=3, max_grad_norm=1.0, clip_ratio=1.04, beta=0.99)
    a = simulate_adagc([2.0, 0.8, 0.9, 0.85, 10.0], cfg)
    # warmup: global clip at 1.0; gamma = running min of min(G, 1.0) = 0.8
    assert a["coef"][0] == pytest.approx(1.0 / (2.0 + 1e-6), rel=1e-6)
    assert a["threshold"][:3] == [1.0, 1.0, 1.0]
    assert a["threshold"][3] == pytest.approx(1.04 * 0.8, rel=1e-6) and a["clipped"][3]  # 0.85 > 0.832
    gamma = 0.99 * 0.8 + 0.01 * 1.04 * 0.8
    assert a["coef"][4] == pytest.approx(1.04 * gamma / (10.0 + 1e-6), rel=1e-5)
    with pytest.raises(ValueError, match="adagc-global"):
        simulate_adagc([1.0], AdaGCConfig())


# ---- the plot of a long trace ---------------------------------------------------------------------
def test_long_trace_plot_keeps_every_event(tmp_path):
    pytest.importorskip("matplotlib")
    from zclip_dist import plotting

    n = 50_000
    gen = torch.Generator().manual_seed(0)
    norms = (1.0 + 0.05 * torch.randn(n, generator=gen, dtype=torch.float64)).abs().tolist()
    for i in range(1000, n, 4999):
        norms[i] *= 40.0  # one-step spikes, far apart
    norms[23_457] = math.nan
    trace = read_trace(_csv_trace(tmp_path, norms))
    result = replay(trace, ZClipConfig(max_grad_norm=None, warmup_steps=25), AdaGCConfig(mode="adagc-global"))
    x, lo, hi = plotting.envelope(trace.steps, trace.norms, plotting.BINS)
    assert len(x) == plotting.BINS and max(hi) == max(v for v in norms if v == v)  # a single step keeps its height
    fig = plotting.figure(result)
    drawn = {c.get_gid(): len(c.get_offsets()) for c in fig.axes[0].collections if c.get_gid()}
    assert sum(result.adagc["clipped"]) > plotting.MANY_EVENTS  # the dense case: every one drawn, the largest marked
    assert drawn["clipped by ZClip"] == sum(result.zclip["clipped"]) > 10
    assert drawn["clipped by AdaGC-global"] == sum(result.adagc["clipped"])
    assert drawn["clipped by AdaGC-global: largest"] == plotting.MANY_EVENTS
    labels = [c.get_label() for c in fig.axes[0].collections]
    assert "non-finite norm (1)" in labels
    lines = [len(line.get_xdata()) for line in fig.axes[0].lines]
    assert max(lines) <= plotting.BINS  # decimated
    png = tmp_path / "long.png"
    plotting.save(fig, str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"
