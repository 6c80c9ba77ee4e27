"""Timing and machine-description helpers shared by the benchmarks."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn`` in seconds, the device drained before and after each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda or ""
    return info


def make_grads(n_params: int, n_tensors: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Parameters of equal-ish sizes summing to ``n_params``, with random gradients."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sizes = [n_params // n_tensors] * n_tensors
    sizes[-1] += n_params - sum(sizes)
    params = []
    for s in sizes:
        p = torch.nn.Parameter(torch.empty(s, dtype=dtype, device=device))
        p.grad = (torch.randn(s, generator=gen) * 1e-3).to(dtype=dtype, device=device)
        params.append(p)
    return params
