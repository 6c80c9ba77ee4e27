"""The "adagc" DeepSpeed config entry: validation by key, gradient_clipping as lambda_abs, refusal of a
config that has both "zclip" and "adagc", and the unchanged-script launcher picking the entry up."""

from __future__ import annotations

import json

import pytest
import torch

from zclip_dist.config import AdaGCConfig, ConfigError, ZClipConfig
from zclip_dist.deepspeed import resolve_config


def test_adagc_entry_gives_adagc_config_with_engine_clip_as_lambda_abs():
    cfg = resolve_config({"gradient_clipping": 0.3, "adagc": {"clip_ratio": 1.05, "beta": 0.98}})
    assert isinstance(cfg, AdaGCConfig)
    assert (cfg.max_grad_norm, cfg.clip_ratio, cfg.beta, cfg.mode) == (0.3, 1.05, 0.98, "adagc")
    assert resolve_config({"gradient_clipping": 0.3, "adagc": {"max_grad_norm": 2.0}}).max_grad_norm == 2.0
    assert resolve_config({"adagc": {}}).max_grad_norm == 1.0  # no engine clip: the official default
    assert resolve_config({"adagc": {"mode": "adagc-global"}}).mode == "adagc-global"
    assert resolve_config({"adagc": {"enabled": False}}) is None


def test_both_entries_are_refused_naming_both_keys():
    with pytest.raises(ConfigError, match=r"'zclip'.*'adagc'"):
        resolve_config({"zclip": {}, "adagc": {}})
    # one of them switched off is not a conflict
    assert isinstance(resolve_config({"zclip": {"enabled": False}, "adagc": {}}), AdaGCConfig)
    assert isinstance(resolve_config({"zclip": {}, "adagc": {"enabled": False}}), ZClipConfig)


@pytest.mark.parametrize("entry,key", [({"clip_ratio": 0.9}, "adagc.clip_ratio"), ({"beta": 1.0}, "adagc.beta"),
                                       ({"mode": "AdaGC"}, "adagc.mode"), ({"enabled": "yes"}, "adagc.enabled")])
def test_invalid_value_names_the_key(entry, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_config({"adagc": entry})


def test_unknown_key_and_non_object_entry():
    with pytest.raises(ConfigError, match="clip_raito"):
        resolve_config({"adagc": {"clip_raito": 1.1}})
    with pytest.raises(ConfigError, match="adagc = 1.04 .*AdaGC settings"):
        resolve_config({"adagc": 1.04})


def test_initialize_refuses_both_entries_before_building_an_engine(monkeypatch):
    from zclip_dist import deepspeed as zds

    def must_not_run(*args, **kwargs):
        raise AssertionError("deepspeed.initialize ran")

    monkeypatch.setattr(zds, "_deepspeed_initialize", must_not_run)
    with pytest.raises(ConfigError, match=r"'zclip'.*'adagc'"):
        zds.initialize(model=torch.nn.Linear(2, 2), config={"zclip": {}, "adagc": {}})


@pytest.mark.slow
def test_launcher_attaches_adagc_from_the_json_config(tmp_path):
    """``torchrun -m zclip_dist.deepspeed.launch`` with an unchanged script and an "adagc" entry in its JSON config."""
    from tests.test_deepspeed_launch import _launch

    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": 2}, "gradient_clipping": 1.0, "steps_per_print": 100,
              "adagc": {"warmup_steps": 2, "clip_ratio": 1.05}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    ranks = _launch("deepspeed_torchrun.sh", tmp_path, "--deepspeed_config", str(path))
    assert all(r["zclip"] for r in ranks)  # the example's report names the attachment "zclip"
    first, second = (r["metrics"] for r in ranks)
    assert first == second, "ranks decided differently"
    assert first["num_clipped_tensors"] > 0 and not first["warmup"], first  # the example's last-step spike
    assert ranks[0]["grad_norm"] == pytest.approx(first["grad_norm"])


BF16_ZERO1 = """
import deepspeed, torch
from torch import nn
cfg = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
       "zero_optimization": {"stage": 1}, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
       "adagc": {}}
deepspeed.init_distributed(dist_backend="gloo")
model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
try:
    deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    print("BUILT")
except Exception as e:
    print("REFUSED", type(e).__name__, e)
"""


@pytest.mark.slow
def test_bf16_optimizer_at_zero1_is_refused_by_name(tmp_path):
    """bf16 ZeRO-1 with fp32 gradient accumulation makes DeepSpeed build its BF16_Optimizer, which AdaGC
    does not hook: refused with the path's name when the engine is built, not an AttributeError mid-step."""
    import os
    import subprocess
    import sys

    script = tmp_path / "bf16_zero1.py"
    script.write_text(BF16_ZERO1)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", str(script)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("REFUSED UnsupportedConfiguration adagc: the BF16_Optimizer path (bf16, ZeRO stage 1) is not supported "
            "yet") in done.stdout, done.stdout[-2000:]
