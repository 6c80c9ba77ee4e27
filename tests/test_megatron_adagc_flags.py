"""The ``--adagc*`` flags: through ``zclip_dist.megatron.add_arguments`` always, and with Megatron-LM's real
parser, the launcher and the source patch on both fixture tags (see tests/test_megatron_launch.py)."""

from __future__ import annotations

from dataclasses import fields

import pytest

from tests.megatron_versions import TAGS
from tests.test_megatron_launch import PATCHED_CASES, _parser, megatron_lm, patched_validation, probe, run_python
from zclip_dist import megatron as zmeg
from zclip_dist.config import AdaGCConfig, ConfigError, ZClipConfig


@pytest.fixture(params=list(TAGS))
def mlm(request):
    return megatron_lm(request.param)


def _config(*argv: str):
    return zmeg.clipping_config(_parser().parse_args(list(argv)))


def test_every_adagc_field_has_a_flag_with_help():
    by_flag = {s: a for a in _parser()._actions for s in a.option_strings}
    assert "--adagc" in by_flag and "--zclip" in by_flag
    for f in fields(AdaGCConfig):
        if not f.name.startswith("_"):
            action = by_flag["--adagc-" + f.name.replace("_", "-")]
            assert action.help and action.dest == "adagc_" + f.name
            assert zmeg.adagc_flag_name(f.name) == "--adagc-" + f.name.replace("_", "-")


def test_flags_build_the_config_and_clip_grad_is_lambda_abs():
    cfg = _config("--adagc", "--adagc-clip-ratio", "1.05", "--adagc-beta", "0.98", "--adagc-warmup-steps", "50",
                  "--adagc-mode", "adagc-global", "--adagc-eps", "1e-8", "--adagc-nonfinite", "raise",
                  "--adagc-recovery-steps", "20", "--clip-grad", "2.5")
    assert cfg == AdaGCConfig(mode="adagc-global", clip_ratio=1.05, beta=0.98, warmup_steps=50, max_grad_norm=2.5,
                              eps=1e-8, nonfinite="raise", recovery_steps=20)
    assert _config("--adagc", "--clip-grad", "2.5", "--adagc-max-grad-norm", "4").max_grad_norm == 4.0
    assert _config("--adagc", "--clip-grad", "0").max_grad_norm == AdaGCConfig().max_grad_norm  # no fixed clip
    assert _config("--adagc", "--adagc-recovery-steps", "none").recovery_steps is None
    assert _config("--adagc") == AdaGCConfig(max_grad_norm=1.0)  # the defaults, Megatron's --clip-grad 1.0
    assert _config() is None
    assert isinstance(_config("--zclip"), ZClipConfig)


@pytest.mark.parametrize("argv, flag", [
    (["--adagc-clip-ratio", "0.5"], "--adagc-clip-ratio = 0.5"),
    (["--adagc-beta", "1.0"], "--adagc-beta = 1.0"),
    (["--adagc-warmup-steps", "-1"], "--adagc-warmup-steps = -1"),
    (["--adagc-max-grad-norm", "0"], "--adagc-max-grad-norm = 0.0"),
    (["--adagc-eps", "nan"], "--adagc-eps = nan"),
    (["--adagc-recovery-steps", "0"], "--adagc-recovery-steps = 0"),
    (["--clip-grad", "inf"], "--adagc-max-grad-norm = inf"),
])
def test_invalid_values_name_the_flag(argv, flag):
    with pytest.raises(ConfigError, match=flag.replace("(", r"\(")) as err:
        _config("--adagc", *argv)
    assert ("taken from --clip-grad" in str(err.value)) == ("--clip-grad" in argv)


def test_invalid_choice_and_type_are_refused_by_the_parser(capsys):
    for argv, flag in ((["--adagc-mode", "shard"], "--adagc-mode"), (["--adagc-warmup-steps", "2.5"],
                                                                     "--adagc-warmup-steps")):
        with pytest.raises(SystemExit):
            _parser().parse_args(["--adagc", *argv])
        assert flag in capsys.readouterr().err


def test_zclip_and_adagc_together_are_refused_naming_both():
    with pytest.raises(ConfigError, match="--zclip and --adagc"):
        _config("--zclip", "--adagc")


def test_settings_without_the_switch_warn():
    with pytest.warns(UserWarning, match="--adagc-beta given without --adagc"):
        zmeg.adagc_config_from_args(_parser().parse_args(["--adagc-beta", "0.9"]))


def test_wrap_optimizer_refuses_what_is_not_a_megatron_optimizer():
    import torch

    with pytest.raises(TypeError, match="lacks prepare_grads"):
        zmeg.wrap_optimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), AdaGCConfig())


# ---- Megatron-LM's real parser, the launcher, the patch (both tags; see tests/test_megatron_launch.py) ----
def test_flags_parse_with_megatron_lm_parser(mlm):
    assert probe(mlm)["adagc"] == AdaGCConfig(clip_ratio=1.05, mode="adagc-global", max_grad_norm=2.0).to_dict()


@pytest.mark.parametrize("argv, message", [
    (["--adagc", "--adagc-beta", "1.5"], "--adagc-beta = 1.5 is invalid"),
    (["--zclip", "--adagc"], "--zclip and --adagc are both given"),
])
def test_launcher_stops_stock_pretrain_gpt(mlm, argv, message):
    proc = run_python("", "-m", "zclip_dist.megatron.launch", str(mlm.path / "pretrain_gpt.py"), *argv, mlm=mlm)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr


def test_patched_megatron_lm_parses_and_validates_adagc(mlm, tmp_path):
    """The shipped patch applied to a copy of megatron/training: --adagc exists natively and is validated."""
    said = patched_validation(mlm, tmp_path)
    for argv in (("--adagc", "--adagc-beta", "1.5"), ("--adagc", "--zclip")):
        assert PATCHED_CASES[argv] in said[argv]


def test_launcher_wraps_with_the_model_chunks(mlm):
    """The patched get_megatron_optimizer hands AdaGC the model chunks it was given (names for gamma)."""
    assert probe(mlm)["factory"] == [["optimizer", "AdaGCConfig", ["chunk0"]],
                                     ["optimizer", "AdaGCConfig", ["chunk1"]]]
