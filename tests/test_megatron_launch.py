"""The ``--zclip*`` flags, the launcher, the supported megatron-core range and the source patch.

Tests that need Megatron-LM run on both fixture tags (``../shared/megatron-lm/<tag>`` beside the
repository; skipped with the reason where absent): core_v0.16.1 with this environment's megatron-core
0.16.1, core_v0.19.0 with the second environment's 0.19.2 (tests/megatron_versions.py). Subprocesses run
that interpreter, and skip with the install line when it lacks what ``megatron.training`` imports.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import textwrap
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from tests.megatron_versions import REPO, TAGS, checkout, python_for, require, subprocess_env
from zclip_dist import megatron as zmeg
from zclip_dist.config import ConfigError, ZClipConfig

PATCHES = REPO / "patches"
#: What megatron.training imports beyond megatron-core (module: pip name); triton has a test stand-in.
TRAINING = {"six": "six", "regex": "regex", "yaml": "pyyaml", "pydantic": "pydantic"}


@dataclass(frozen=True)
class MegatronLM:
    tag: str
    path: Path  # the checkout: pretrain_gpt.py, megatron/training
    python: str  # an interpreter whose megatron-core pairs with it


def megatron_lm(tag: str) -> MegatronLM:
    """The fixture at ``tag`` and its interpreter; skips with the reason (and install line) where absent."""
    path = checkout(tag)
    python = python_for(TAGS[tag])
    require(python, TRAINING)
    return MegatronLM(tag, path, python)


@pytest.fixture(params=list(TAGS))
def mlm(request) -> MegatronLM:
    return megatron_lm(request.param)


def run_python(code: str, *args: str, mlm: MegatronLM, paths: tuple = ()) -> subprocess.CompletedProcess:
    """``mlm.python -c code args`` (or ``mlm.python args`` without code) with the checkout on its path."""
    env = subprocess_env(*paths, mlm.path)
    env["PYTHONWARNINGS"] = "ignore"
    cmd = [mlm.python, *args] if not code else [mlm.python, "-c", code, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def patched_copy(tag: str, tmp_path: Path) -> Path:
    """A copy of the ``tag`` fixture's megatron/training with its shipped patch applied (``git apply --check`` first)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    copy = tmp_path / "mlm"
    shutil.copytree(checkout(tag) / "megatron" / "training", copy / "megatron" / "training")
    patch = PATCHES / f"megatron-lm-{tag}-zclip.patch"
    for check in (["--check"], []):
        proc = subprocess.run(["git", "apply", *check, str(patch)], cwd=copy, capture_output=True, text=True)
        assert proc.returncode == 0, f"git apply {' '.join(check)} {patch.name}: {proc.stderr}"
    return copy


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


def test_log_jsonl_flags_take_a_path():
    args = _parser().parse_args(["--zclip", "--zclip-log-jsonl", "runs/zclip.jsonl", "--adagc-log-jsonl", "a.jsonl",
                                 "--zclip-log-interval", "10"])
    assert zmeg.config_from_args(args).log_jsonl == "runs/zclip.jsonl"
    assert zmeg.config_from_args(args).log_interval == 10
    assert args.adagc_log_jsonl == "a.jsonl"


def test_optimizer_cuda_graph_is_refused_with_zclip():
    parser = _parser()
    parser.add_argument("--optimizer-cuda-graph", action="store_true")  # Megatron-LM core_v0.19.0 has it
    with pytest.raises(ConfigError, match="--optimizer-cuda-graph"):
        zmeg.clipping_config(parser.parse_args(["--zclip", "--optimizer-cuda-graph"]))


# ---- the supported megatron-core range -------------------------------------------------------------
@pytest.mark.parametrize("version", [(0, 16, 0), (0, 20, 0), (0, 15, 3), (1, 0, 0)])
def test_megatron_core_outside_the_range_is_refused_by_name(version):
    from zclip_dist.megatron.intercept import UnsupportedMegatronCore, check_core_version

    found = "found megatron-core " + r"\.".join(map(str, version))
    with pytest.raises(UnsupportedMegatronCore, match=r"supports megatron-core 0\.16\.1 to 0\.19\.2.*" + found):
        check_core_version(version)


@pytest.mark.parametrize("version", [(0, 16, 1), (0, 17, 0), (0, 18, 2), (0, 19, 2)])
def test_megatron_core_inside_the_range_is_accepted(version):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed: pip install -e '.[megatron]'")
    from zclip_dist.megatron.intercept import check_core_version

    assert check_core_version(version) == version


def test_launcher_refuses_an_unsupported_megatron_core_before_the_script_runs():
    python = python_for("core0.16")
    code = textwrap.dedent("""
        import sys
        from megatron.core import package_info
        package_info.MINOR = 20
        from zclip_dist.megatron import launch
        launch.main([sys.argv[1], '--zclip'])
    """)
    proc = subprocess.run([python, "-c", code, str(REPO / "pyproject.toml")], capture_output=True, text=True,
                          env=subprocess_env(), cwd=REPO, timeout=300)
    assert proc.returncode != 0
    assert "supports megatron-core 0.16.1 to 0.19.2" in proc.stderr and "found megatron-core 0.20.1" in proc.stderr


# ---- Megatron-LM's real parser, the launcher, the patch ------------------------------------------
# One process per tag answers every question that needs no exit of its own (megatron.training takes
# seconds to import): the stock parser on --zclip, then with the launcher installed the name
# initialize_megatron calls (up to core_v0.17) or the module's, which parse_and_validate_args calls
# (core_v0.18 on), with a provider of the script's own; the module-level one; --adagc; and the patched
# get_megatron_optimizer handing AdaGC the model chunks.
_PROBE = textwrap.dedent("""
    import argparse, contextlib, io, json, sys
    import megatron.training.arguments as arguments
    out = {}
    sys.argv, err = ['pretrain_gpt.py', '--zclip'], io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            arguments.parse_args()
            out['stock_exit'] = 0
        except SystemExit as exc:
            out['stock_exit'] = exc.code
    out['stock_names_zclip'] = '--zclip' in err.getvalue()

    from zclip_dist import megatron as zmeg
    from zclip_dist.megatron import launch
    launch.install()
    import megatron.training.initialize as initialize
    parse = getattr(initialize, 'parse_args', arguments.parse_args)
    def extra(parser):
        parser.add_argument('--my-extra', type=int, default=0)
        return parser
    sys.argv = ['pretrain_gpt.py', '--zclip', '--zclip-alpha', '0.9', '--clip-grad', '2.0', '--my-extra', '3',
                '--zclip-log-jsonl', 'z.jsonl']
    a = parse(extra, False)
    cfg = zmeg.config_from_args(a)
    out['zclip'] = dict(zclip=a.zclip, extra=a.my_extra, alpha=cfg.alpha, cap=cfg.max_grad_norm,
                        clip_grad=a.clip_grad, log_jsonl=cfg.log_jsonl)
    sys.argv = ['pretrain_gpt.py', '--zclip']
    out['module_level_zclip'] = arguments.parse_args().zclip
    sys.argv = ['pretrain_gpt.py', '--adagc', '--adagc-clip-ratio', '1.05', '--adagc-mode', 'adagc-global',
                '--clip-grad', '2.0']
    out['adagc'] = zmeg.clipping_config(parse(None, False)).to_dict()

    import megatron.training.global_vars as gv
    calls = []
    zmeg.wrap_optimizer = lambda opt, cfg, model=None, forensics=None: calls.append(
        [opt, type(cfg).__name__, model]) or opt
    gv.set_args(argparse.Namespace(adagc=True, zclip=False, clip_grad=1.0))
    factory = launch._patched_factory(lambda config, model_chunks, **kw: 'optimizer')
    factory('config', ['chunk0'], config_overrides=None)
    factory('config', model_chunks=['chunk1'])
    out['factory'] = calls
    print(json.dumps(out))
""")
_PROBES: dict[str, dict] = {}


def probe(mlm: MegatronLM) -> dict:
    """What ``_PROBE`` found with ``mlm``'s interpreter and checkout (run once per tag)."""
    if mlm.tag not in _PROBES:
        proc = run_python(_PROBE, mlm=mlm)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _PROBES[mlm.tag] = json.loads(proc.stdout.strip().splitlines()[-1])
    return _PROBES[mlm.tag]


def test_stock_parser_rejects_zclip_without_the_launcher(mlm):
    """Why the launcher exists: the stock parser exits 2 on --zclip."""
    got = probe(mlm)
    assert got["stock_exit"] == 2 and got["stock_names_zclip"]


def test_flags_parse_with_megatron_lm_parser(mlm):
    got = probe(mlm)
    assert got["zclip"] == dict(zclip=True, extra=3, alpha=0.9, cap=2.0, clip_grad=2.0, log_jsonl="z.jsonl")
    assert got["module_level_zclip"] is True


def test_launcher_stops_stock_pretrain_gpt_on_an_invalid_value(mlm):
    proc = run_python("", "-m", "zclip_dist.megatron.launch", str(mlm.path / "pretrain_gpt.py"),
                      "--zclip", "--zclip-alpha", "1.5", mlm=mlm)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--zclip-alpha = 1.5 is invalid" in proc.stderr


@pytest.mark.parametrize("tag", list(TAGS))
def test_shipped_patch_applies_to_its_tag(tag, tmp_path):
    copy = patched_copy(tag, tmp_path)
    for name in ("arguments.py", "training.py"):
        assert "zclip_dist.megatron" in (copy / "megatron" / "training" / name).read_text()


@pytest.mark.parametrize("tag", list(TAGS))
def test_shipped_patch_is_what_the_generator_makes(tag):
    from zclip_dist.megatron.patch import make_patch

    assert (PATCHES / f"megatron-lm-{tag}-zclip.patch").read_text() == make_patch(checkout(tag))


def test_patch_generator_refuses_a_checkout_without_an_anchor(tmp_path):
    from zclip_dist.megatron.patch import PatchError, make_patch

    source = checkout("core_v0.16.1")
    copy = tmp_path / "megatron" / "training"
    shutil.copytree(source / "megatron" / "training", copy)
    text = (copy / "training.py").read_text()
    (copy / "training.py").write_text(text.replace("opt_param_scheduler = get_optimizer_param_scheduler(optimizer)",
                                                   "scheduler = make_scheduler(optimizer)"))
    with pytest.raises(PatchError, match=r"training\.py: expected one line 'opt_param_scheduler = .*' in "
                                         r"setup_model_and_optimizer\(\), found 0"):
        make_patch(tmp_path)


_PATCHED = textwrap.dedent("""
    import json, sys
    import megatron.training.arguments as a
    assert a.__file__.startswith(sys.argv[1]), a.__file__
    out = []
    for argv in json.loads(sys.argv[2]):
        sys.argv = ['pretrain_gpt.py', *argv]
        args = a.parse_args()
        try:
            a.validate_args(args)
            out.append([argv, 'validated'])
        except ValueError as err:  # zclip_dist's ConfigError, before any of Megatron-LM's own checks
            out.append([argv, str(err)])
    print(json.dumps(out))
""")
#: argv -> what the patched validate_args says (the flags exist natively; the value is refused by name).
PATCHED_CASES = {("--zclip", "--zclip-alpha", "1.5"): "--zclip-alpha = 1.5 is invalid",
                 ("--adagc", "--adagc-beta", "1.5"): "--adagc-beta = 1.5 is invalid",
                 ("--adagc", "--zclip"): "--zclip and --adagc are both given"}
_PATCHED_RESULTS: dict[str, dict] = {}


def patched_validation(mlm: MegatronLM, tmp_path: Path) -> dict[tuple, str]:
    """The shipped patch applied to a copy of megatron/training: ``PATCHED_CASES`` parsed and validated
    there, in one process per tag."""
    if mlm.tag not in _PATCHED_RESULTS:
        copy = patched_copy(mlm.tag, tmp_path)
        # the patched megatron.training first, the checkout's other folders after it
        proc = run_python(_PATCHED, str(copy), json.dumps(list(PATCHED_CASES)), mlm=mlm, paths=(copy,))
        assert proc.returncode == 0, proc.stderr[-3000:]
        _PATCHED_RESULTS[mlm.tag] = {tuple(argv): said for argv, said in json.loads(proc.stdout.splitlines()[-1])}
    return _PATCHED_RESULTS[mlm.tag]


def test_patched_megatron_lm_parses_and_validates(mlm, tmp_path):
    said = patched_validation(mlm, tmp_path)[("--zclip", "--zclip-alpha", "1.5")]
    assert PATCHED_CASES[("--zclip", "--zclip-alpha", "1.5")] in said


def test_local_launch_script_stops_on_an_invalid_value():
    """The script runs ``$PYTHON`` (here the megatron-core 0.19.2 environment's, not the first on PATH)."""
    mlm = megatron_lm("core_v0.19.0")
    env = subprocess_env()
    env.update(MEGATRON_LM_PATH=str(mlm.path), PYTHON=mlm.python, PYTHONWARNINGS="ignore",
               ZCLIP_ARGS="--zclip --zclip-warmup-steps 0")
    proc = subprocess.run(["bash", str(REPO / "launch" / "megatron_local.sh")], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--zclip-warmup-steps = 0 is invalid" in proc.stderr
