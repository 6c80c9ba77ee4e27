"""The "zclip" DeepSpeed config entry: validation by key, gradient_clipping as the cap, and DeepSpeed's
conventions (a disabled entry is still validated, near-miss keys warn, null/"none" for no cap)."""

from __future__ import annotations

import pytest

from zclip_dist.config import ConfigError
from zclip_dist.deepspeed import resolve_config


def test_absent_or_disabled_entry_changes_nothing():
    assert resolve_config({"gradient_clipping": 1.0}) is None
    assert resolve_config({"zclip": {"enabled": False, "alpha": 0.9}}) is None


def test_gradient_clipping_is_the_cap_unless_max_grad_norm_is_given():
    assert resolve_config({"gradient_clipping": 0.3, "zclip": {}}).max_grad_norm == 0.3
    assert resolve_config({"gradient_clipping": 0.3, "zclip": {"max_grad_norm": 2.0}}).max_grad_norm == 2.0
    assert resolve_config({"gradient_clipping": 0.3, "zclip": {"max_grad_norm": None}}).max_grad_norm is None
    assert resolve_config({"zclip": {}}).max_grad_norm == 1.0  # no engine clip: the reference default
    assert resolve_config({"gradient_clipping": 0.0, "zclip": {"alpha": 0.9}}).alpha == 0.9


@pytest.mark.parametrize("entry,key", [({"alpha": 1.5}, "zclip.alpha"), ({"warmup_steps": 0}, "zclip.warmup_steps"),
                                       ({"mode": "zsc0re"}, "zclip.mode"), ({"nonfinite": "ignore"}, "zclip.nonfinite"),
                                       ({"enabled": "yes"}, "zclip.enabled")])
def test_invalid_value_names_the_key(entry, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_config({"zclip": entry})


def test_unknown_key_and_non_object_entry():
    with pytest.raises(ConfigError, match="z_threshold"):
        resolve_config({"zclip": {"z_threshold": 2.0}})
    with pytest.raises(ConfigError, match="zclip"):
        resolve_config({"zclip": 2.5})


# ---- DeepSpeed's conventions ---------------------------------------------------------------------
@pytest.mark.parametrize("key", ["zclip", "adagc"])
def test_disabled_entry_is_still_validated(key):
    """A typo in a switched-off entry would otherwise surface only when someone switches it on."""
    with pytest.raises(ConfigError, match=rf"{key}\.eps"):
        resolve_config({key: {"enabled": False, "eps": -1.0}})
    with pytest.raises(ConfigError, match="unknown key.*'z_tresh'"):
        resolve_config({key: {"enabled": False, "z_tresh": 2.0}})
    assert resolve_config({key: {"enabled": False, "eps": 1e-8}}) is None


@pytest.mark.parametrize("config,fragment", [
    ({"zclp": {"alpha": 0.9}}, "'zclp' is not 'zclip'"),
    ({"ZClip": {}}, "'ZClip' is not 'zclip'"),
    ({"AdaGC": {}}, "'AdaGC' is not 'adagc'"),
    ({"zero_optimization": {"stage": 2, "zclip": {}}}, "zero_optimization.zclip is not read"),
    ({"bf16": {"enabled": True, "adagc": {}}}, "bf16.adagc is not read"),
])
def test_near_miss_keys_warn(config, fragment):
    with pytest.warns(UserWarning, match=fragment):
        assert resolve_config(config) is None


def test_a_plain_deepspeed_config_does_not_warn():
    import warnings

    config = {"train_batch_size": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "scheduler": {"type": "WarmupLR"},
              "zero_optimization": {"stage": 2, "overlap_comm": True}, "bf16": {"enabled": True},
              "fp16": {"enabled": False, "loss_scale_window": 1000}, "steps_per_print": 10,
              "wall_clock_breakdown": False, "zclip": {"alpha": 0.97}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_config(config).alpha == 0.97


@pytest.mark.parametrize("spelling", [None, "none", "None", "NULL", " null "])
def test_no_cap_spellings(spelling):
    for clip in ({}, {"gradient_clipping": 1.0}):
        assert resolve_config({**clip, "zclip": {"max_grad_norm": spelling}}).max_grad_norm is None


@pytest.mark.parametrize("value", ["off", 0, -1.0, float("inf"), True, [1.0]])
def test_invalid_cap_names_every_accepted_spelling(value):
    with pytest.raises(ConfigError, match=r'zclip\.max_grad_norm = .* allowed a number in \(0, inf\), or null / "none"'):
        resolve_config({"zclip": {"max_grad_norm": value}})


def test_gradient_clipping_zero_means_no_cap_not_one():
    """DeepSpeed's gradient_clipping 0 is "no fixed clip": ZClip gets no cap, not the 1.0 default."""
    assert resolve_config({"gradient_clipping": 0, "zclip": {}}).max_grad_norm is None
    assert resolve_config({"gradient_clipping": 0.0, "zclip": {"max_grad_norm": 3.0}}).max_grad_norm == 3.0
    assert resolve_config({"gradient_clipping": "auto", "zclip": {}}).max_grad_norm == 1.0  # unfilled placeholder
