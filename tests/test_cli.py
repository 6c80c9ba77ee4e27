"""``zclip-dist``: complete help, and every user error is one line on stderr with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from zclip_dist.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zclip_dist.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_commands_as_a_subprocess():
    top = _run("--help")
    assert top.returncode == 0
    assert all(c in top.stdout for c in ("demo", "replay", "report", "events", "zclip-dist COMMAND --help"))


@pytest.mark.parametrize("command,phrases", [
    ("demo", ["--short", "--spike-step", "corrupted", "gradient_clipping", "--log-interval", "--zclip-alpha",
              "--fixed-clips", "--pilot", "--adagc-clip-ratio"]),
    ("replay", ["TRACE", "JSONL", "CSV", "TensorBoard", "grad-norm", "output_path/job_name", "--ds-config",
                "--zclip-z-thresh", "--adagc-clip-ratio", "--adagc-max-grad-norm N|none", "--png", "header",
                "--samples-per-step", "zclip-dist[plot]"]),
    ("report", ["METRICS", "spikes", "non-finite", "regime shifts", "threshold", "--top", "Train/zclip/*"]),
    ("events", ["METRICS", "--last", "--json", "replicas", "Train/zclip/event/*", "zclip/event/*", "ranks"]),
    ("sweep", ["--short", "--pilot", "--lrs", "--seeds", "--methods", "--tight-clip", "--loose-clip", "--size",
               "--device", "--jobs", "unigram", "--size large"]),
])
def test_every_subcommand_has_complete_help(capsys, command, phrases):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for phrase in phrases:
        assert phrase in text, phrase
    # every option explains itself
    options = [line for line in text.splitlines() if line.startswith("  --")]
    assert options and all(len(line.split(None, 1)) == 2 or line.rstrip().endswith(("}", "X", "N", "N|none"))
                           for line in options)


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("zclip-dist"), err
    assert match in err, err


@pytest.mark.parametrize("argv,match", [
    (["replay", "/no/such/trace.jsonl"], "no such file"),
    (["replay", "x.jsonl", "--zclip-alpha", "1.5"], "zclip.alpha = 1.5 is invalid"),
    (["replay", "x.jsonl", "--zclip-mode", "magic"], "invalid choice"),
    (["replay", "x.jsonl", "--adagc-beta", "abc"], "invalid float value"),
    (["replay"], "required: TRACE"),
    (["demo", "--steps", "10", "--spike-step", "20"], "outside"),
    (["demo", "--zclip-z-thresh", "-1"], "z_thresh"),
    (["demo", "--bogus"], "unrecognized arguments"),
    (["demo", "--fixed-clips", "1,-2"], "'1,-2' is not a comma-separated list of positive numbers"),
    (["demo", "--adagc-clip-ratio", "0.5"], "adagc.clip_ratio = 0.5 is invalid"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_are_one_line_and_exit_2(capsys, argv, match):
    _one_line_error(capsys, argv, match)


def test_bad_files_are_one_line_and_exit_2(tmp_path, capsys):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"grad_norm": 1}\n{oops\n')
    _one_line_error(capsys, ["replay", str(broken)], "not JSON")
    cfg = tmp_path / "ds.json"
    cfg.write_text("{not json")
    good = tmp_path / "good.csv"
    good.write_text("step,grad_norm\n0,1.0\n1,2.0\n")
    _one_line_error(capsys, ["replay", str(good), "--ds-config", str(cfg)], "not JSON")
    cfg.write_text('{"gradient_clipping": 1.0, "zclip": {"alpah": 0.9}}')
    _one_line_error(capsys, ["replay", str(good), "--ds-config", str(cfg)], "alpah")
    _one_line_error(capsys, ["replay", str(tmp_path)], "no TensorBoard event files")


@pytest.mark.parametrize("argv,missing,extra", [
    (["replay", "t.csv"], "matplotlib", "plot"),
    (["demo", "--short"], "deepspeed", "demo"),
    (["demo", "--short"], "tqdm", "demo"),
])
def test_a_missing_optional_dependency_names_the_extra(monkeypatch, capsys, argv, missing, extra):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    _one_line_error(capsys, argv, f'needs {missing}: pip install "zclip-dist[{extra}]"')


def test_no_command_is_exit_2_as_a_subprocess():
    done = _run()
    assert done.returncode == 2 and "usage" in done.stderr


def test_replay_prints_clipped_steps_and_writes_png(tmp_path, capsys):
    trace = tmp_path / "norms.csv"
    norms = [1.0 + 0.01 * (i % 5) for i in range(40)] + [30.0] + [1.0] * 5
    trace.write_text("step,grad_norm\n" + "".join(f"{i},{v}\n" for i, v in enumerate(norms)))
    png = tmp_path / "out.png"
    assert main(["replay", str(trace), "--zclip-max-grad-norm", "none", "--zclip-warmup-steps", "10",
                 "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "ZClip (alpha=0.97, z_thresh=2.5, max_grad_norm=None" in out
    assert "step       40: norm 30 ->" in out
    assert "AdaGC-global" in out and png.read_bytes()[:4] == b"\x89PNG"
