"""Replay a clipper's state update as one CUDA graph.

The statistics are a few dozen scalar kernels; on a GPU their launch cost (microseconds each) is the
clipper's whole overhead beyond the gradient passes. The update is pure and writes its result into
the existing state tensors, so it can be captured once and replayed every step: the new inputs are
copied into fixed buffers, one graph launch runs every kernel, and the decision tensors are the graph's
fixed outputs (overwritten by the next replay).

Used only on CUDA, and never while the caller is itself capturing a graph (nested capture is not
allowed; the outer graph then contains the kernels anyway).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

__all__ = ["GraphedUpdate", "can_graph"]


def can_graph(device: torch.device) -> bool:
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


class GraphedUpdate:
    """``update(*inputs) -> outputs`` captured once; ``__call__`` copies inputs in and replays.

    ``update`` must be a pure function of its inputs and of tensors whose addresses never change
    (the clipper's state, updated in place). The capture itself runs no kernel; the caller replays.
    """

    def __init__(self, update: Callable[..., Any], example_inputs: Sequence[Tensor]) -> None:
        self.inputs = [torch.empty_like(t) for t in example_inputs]
        for buf, t in zip(self.inputs, example_inputs):
            buf.copy_(t)
        self.graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph synchronises once here, at capture: a one-time cost on the first step.
        with torch.cuda.graph(self.graph):
            self.outputs = update(*self.inputs)

    def __call__(self, *inputs: Tensor) -> Any:
        for buf, t in zip(self.inputs, inputs):
            buf.copy_(t, non_blocking=True)
        self.graph.replay()
        return self.outputs
