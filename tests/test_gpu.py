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
