"""GPU-only checks (skipped without CUDA): CUDA's own sync detector over the step, and CUDA-graph replay."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_step_is_sync_free_under_cuda_sync_debug_mode():
    from bench.gpu_checks import sync_free_steps

    result = sync_free_steps(torch.device("cuda"))
    assert set(result) == {"ZClip", "AdaGC"} and not any(r["raised"] for r in result.values())


def test_zclip_step_captured_in_a_cuda_graph_matches_eager():
    from bench.gpu_checks import cuda_graph_replay

    result = cuda_graph_replay(torch.device("cuda"))
    assert result["mismatches_vs_eager"] == 0 and result["clipped_steps"] >= 1


def test_the_sweep_gpu_variant_runs_and_names_its_device(tmp_path, capsys):
    """The GPU variant of the sweep (docs/sweep.md), on a small budget: pilot, then two methods; the
    results name the device they ran on."""
    import json

    from zclip_dist.cli import main

    assert main(["sweep", "--pilot", "--device", "cuda", "--size", "large", "--steps", "40", "--out", str(tmp_path)]) == 0
    assert "median" in capsys.readouterr().out
    assert main(["sweep", "--device", "cuda", "--size", "large", "--steps", "40", "--lrs", "1e-3", "--seeds", "0",
                 "--methods", "fixed-tight,zclip", "--tight-clip", "1", "--loose-clip", "5", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    with open(tmp_path / "results.json") as f:
        machine = json.load(f)["machine"]
    assert machine["device"] == "cuda" and machine["device_name"] == torch.cuda.get_device_name()
