"""The ``--zclip*`` flags, the launcher and the source patch.

Tests that need Megatron-LM (``megatron.training``, ``pretrain_gpt.py``) read the checkout from
``MEGATRON_LM_PATH`` (tag core_v0.16.1) and skip with the reason when it is unset or when
``megatron.training``'s own dependencies (six regex pyyaml pydantic triton) are missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest

from zclip_dist import megatron as zmeg
from zclip_dist.config import ConfigError, ZClipConfig

REPO = Path(__file__).resolve().parents[1]
PATCH = REPO / "patches" / "megatron-lm-core_v0.16.1-zclip.patch"
TRAINING_DEPS = ("six", "regex", "yaml", "pydantic", "triton")


def megatron_lm() -> Path:
    path = os.environ.get("MEGATRON_LM_PATH")
    if not path:
        pytest.skip("MEGATRON_LM_PATH is not set (a Megatron-LM checkout at tag core_v0.16.1)")
    if not (Path(path) / "megatron" / "training" / "arguments.py").is_file():
        pytest.skip(f"MEGATRON_LM_PATH={path} is not a Megatron-LM checkout (no megatron/training/arguments.py)")
    return Path(path)


def training_deps() -> None:
    missing = [m for m in TRAINING_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip("megatron.training needs: pip install " + " ".join("pyyaml" if m == "yaml" else m for m in missing))


def run_python(code: str, *args: str, checkout: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(checkout), str(REPO)]), PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *args] if not code else [sys.executable, "-c", code, *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--clip-grad", type=float, default=1.0)  # as Megatron-LM defines it
    return zmeg.add_arguments(parser)


# ---- flags without Megatron-LM -------------------------------------------------------------------
def test_every_config_field_has_a_flag_with_help():
    parser = _parser()
    by_flag = {s: a for a in parser._actions for s in a.option_strings}
    assert "--zclip" in by_flag
    for f in fields(ZClipConfig):
        if not f.name.startswith("_"):
            action = by_flag[zmeg.flag_name(f.name)]
            assert action.help and action.dest == "zclip_" + f.name


def test_flags_build_the_config_and_clip_grad_is_the_cap():
    args = _parser().parse_args(["--zclip", "--zclip-alpha", "0.9", "--zclip-z-thresh", "3", "--clip-grad", "2.5",
                                 "--zclip-warmup-steps", "7", "--zclip-mode", "percentile",
                                 "--zclip-skip-update-on-spike", "--zclip-nonfinite", "raise"])
    cfg = zmeg.config_from_args(args)
    assert cfg == ZClipConfig(alpha=0.9, z_thresh=3.0, max_grad_norm=2.5, warmup_steps=7, mode="percentile",
                              skip_update_on_spike=True, nonfinite="raise")
    explicit = _parser().parse_args(["--zclip", "--clip-grad", "2.5", "--zclip-max-grad-norm", "4"])
    assert zmeg.config_from_args(explicit).max_grad_norm == 4.0
    assert zmeg.config_from_args(_parser().parse_args(["--zclip", "--zclip-max-grad-norm", "none"])).max_grad_norm is None
    assert zmeg.config_from_args(_parser().parse_args(["--zclip", "--clip-grad", "0"])).max_grad_norm is None


@pytest.mark.parametrize("argv, flag", [
    (["--zclip-alpha", "1.5"], "--zclip-alpha"),
    (["--zclip-z-thresh", "0"], "--zclip-z-thresh"),
    (["--zclip-warmup-steps", "0"], "--zclip-warmup-steps"),
    (["--zclip-eps", "-1"], "--zclip-eps"),
    (["--zclip-clip-factor", "nan"], "--zclip-clip-factor"),
    (["--zclip-max-grad-norm", "-2"], "--zclip-max-grad-norm"),
])
def test_invalid_values_name_the_flag(argv, flag):
    with pytest.raises(ConfigError, match=flag):
        zmeg.config_from_args(_parser().parse_args(["--zclip", *argv]))


def test_invalid_choice_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--zclip", "--zclip-mode", "median"])
    assert "--zclip-mode" in capsys.readouterr().err


# ---- Megatron-LM's real parser, the launcher, the patch ------------------------------------------
_PARSE = textwrap.dedent("""
    import json, sys
    from zclip_dist import megatron as zmeg
    from zclip_dist.megatron import launch as megatron_launch
    megatron_launch.install()
    import megatron.training.initialize as initialize, megatron.training.arguments as arguments
    def extra(parser):
        parser.add_argument('--my-extra', type=int, default=0)
        return parser
    sys.argv = ['pretrain_gpt.py', '--zclip', '--zclip-alpha', '0.9', '--clip-grad', '2.0', '--my-extra', '3']
    a = initialize.parse_args(extra, False)          # the name initialize_megatron calls
    sys.argv = sys.argv[:-2]
    b = arguments.parse_args()                       # the module-level one, no provider
    cfg = zmeg.config_from_args(a)
    print(json.dumps(dict(zclip=a.zclip, extra=a.my_extra, alpha=cfg.alpha, cap=cfg.max_grad_norm,
                          b_zclip=b.zclip, clip_grad=a.clip_grad)))
""")


def test_flags_parse_with_megatron_lm_parser():
    checkout = megatron_lm()
    training_deps()
    proc = run_python(_PARSE, checkout=checkout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == dict(zclip=True, extra=3, alpha=0.9, cap=2.0, b_zclip=True, clip_grad=2.0)


def test_stock_parser_rejects_zclip_without_the_launcher():
    """Why the launcher exists: the stock parser exits 2 on --zclip."""
    checkout = megatron_lm()
    training_deps()
    code = "import sys; sys.argv=['x','--zclip']; import megatron.training.arguments as a; a.parse_args()"
    proc = run_python(code, checkout=checkout)
    assert proc.returncode == 2 and "--zclip" in proc.stderr


def test_launcher_stops_stock_pretrain_gpt_on_an_invalid_value():
    checkout = megatron_lm()
    training_deps()
    proc = run_python("", "-m", "zclip_dist.megatron.launch", str(checkout / "pretrain_gpt.py"),
                      "--zclip", "--zclip-alpha", "1.5", checkout=checkout)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--zclip-alpha = 1.5 is invalid" in proc.stderr


def test_patch_applies():
    checkout = megatron_lm()
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    proc = subprocess.run(["git", "apply", "--check", str(PATCH)], cwd=checkout, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_patched_megatron_lm_parses_and_validates(tmp_path):
    """The patch applied to a copy of megatron/training: the flags exist natively and are validated."""
    checkout = megatron_lm()
    training_deps()
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    copy = tmp_path / "mlm"
    shutil.copytree(checkout / "megatron" / "training", copy / "megatron" / "training")
    proc = subprocess.run(["git", "apply", str(PATCH)], cwd=copy, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # the patched megatron.training first, the checkout's megatron.core after it
    env_path = os.pathsep.join([str(copy), str(checkout)])
    code = textwrap.dedent("""
        import sys
        import megatron.training.arguments as a
        assert a.__file__.startswith(sys.argv[1]), a.__file__
        sys.argv = ['x', '--zclip', '--zclip-alpha', '1.5']
        args = a.parse_args()
        print('parsed', args.zclip, args.zclip_alpha)
        a.validate_args(args)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([env_path, str(REPO)]), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", code, str(copy)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert "parsed True 1.5" in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode != 0 and "--zclip-alpha = 1.5 is invalid" in proc.stderr


def test_local_launch_script_stops_on_an_invalid_value():
    checkout = megatron_lm()
    training_deps()
    env = dict(os.environ, MEGATRON_LM_PATH=str(checkout), PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore",
               ZCLIP_ARGS="--zclip --zclip-warmup-steps 0")
    proc = subprocess.run(["bash", str(REPO / "launch" / "megatron_local.sh")], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--zclip-warmup-steps = 0 is invalid" in proc.stderr
