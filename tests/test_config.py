"""ZClipConfig: reference defaults, and every invalid value rejected with the key and what is allowed."""

from __future__ import annotations

import inspect

import pytest
from zclip import ZClip as ReferenceZClip

from zclip_dist import ZClip
from zclip_dist.config import ConfigError, ZClipConfig


def test_defaults_equal_reference():
    ref = inspect.signature(ReferenceZClip.__init__).parameters
    cfg = ZClipConfig()
    for name, param in ref.items():
        if name == "self":
            continue
        assert getattr(cfg, name) == param.default, name
    # the drop-in keeps the reference's positional order and defaults
    ours = inspect.signature(ZClip.__init__).parameters
    assert [n for n in ours][: len(ref)] == list(ref)
    assert all(ours[n].default == ref[n].default for n in ref if n != "self")


@pytest.mark.parametrize("key,value,allowed", [
    ("alpha", 1.0, "(0, 1)"), ("alpha", 0, "(0, 1)"), ("alpha", "0.9", "(0, 1)"), ("alpha", float("nan"), "(0, 1)"),
    ("z_thresh", -1.0, "(0, inf)"), ("z_thresh", True, "(0, inf)"),
    ("max_grad_norm", 0.0, "(0, inf)"), ("max_grad_norm", "1.0", "(0, inf)"),
    ("eps", -1e-6, "[0, inf)"),
    ("warmup_steps", 0, "integer >= 1"), ("warmup_steps", 2.5, "integer >= 1"),
    ("mode", "z-score", "'zscore', 'percentile'"), ("mode", "median", "'zscore', 'percentile'"),
    ("clip_option", "Mean", "'adaptive_scaling', 'mean'"),
    ("clip_factor", 0.0, "(0, inf)"),
    ("skip_update_on_spike", "yes", "true or false"),
    ("nonfinite", "ignore", "'skip', 'raise', 'propagate'"),
    ("recovery_steps", 0, "integer >= 1"), ("recovery_steps", 2.0, "integer >= 1"),
    ("verify_every", -1, "integer >= 0"),
])
def test_invalid_values_name_key_value_and_allowed(key, value, allowed):
    with pytest.raises(ConfigError) as err:
        ZClipConfig(**{key: value})
    msg = str(err.value)
    assert f"zclip.{key}" in msg and repr(value) in msg and allowed in msg and "\n" not in msg


def test_from_dict_unknown_key_and_engine_default():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'z_threshold'.*allowed keys are .*z_thresh"):
        ZClipConfig.from_dict({"z_threshold": 2.0})
    # an engine cap fills max_grad_norm only when the entry leaves it out
    assert ZClipConfig.from_dict({}, max_grad_norm=5.0).max_grad_norm == 5.0
    assert ZClipConfig.from_dict({"max_grad_norm": None}, max_grad_norm=5.0).max_grad_norm is None
    assert ZClipConfig.from_dict({"enabled": True, "alpha": 0.9}).alpha == 0.9
    with pytest.raises(ConfigError, match=r"--zclip\.alpha|ds\.zclip\.alpha"):
        ZClipConfig.from_dict({"alpha": 2}, source="ds.zclip")


def test_mode_is_lower_cased_as_the_reference_does():
    from zclip import ZClip as ReferenceZClip

    for spelling, mode in (("ZSCORE", "zscore"), ("Percentile", "percentile")):
        assert ZClipConfig(mode=spelling).mode == mode == ReferenceZClip(mode=spelling).mode
        assert ZClipConfig.from_dict({"mode": spelling}) == ZClipConfig(mode=mode)
