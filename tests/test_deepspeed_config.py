"""The "zclip" DeepSpeed config entry: validation by key, and gradient_clipping as the cap."""

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
