"""Test-only entry for the end-to-end runs: Megatron-LM's stock ``pretrain_gpt.py`` through the launcher, on CPU.

    python -m torch.distributed.run --nproc-per-node 2 -m tests.megatron_stock_run <pretrain_gpt.py> <args>

It prepares the process, then hands over to ``zclip_dist.megatron.launch.main`` unchanged:

* applies the CPU shim (tests/megatron_cpu_shim.py) and tells Megatron-LM that CUDA is there; skips
  the build of the dataset helpers (the wheel ships them compiled; the fixture has no Makefile) and,
  up to core_v0.17, the nvcc build of the legacy fused kernels (none is used on CPU);
* ``ZCLIP_TEST_SPIKE=<iteration>:<factor>``: multiplies this rank's gradients by ``factor`` at that
  iteration, before Megatron reduces them (``finalize_model_grads``; the reduction is linear);
* with ``--load`` and the distributed optimizer, gives torch's Adam fallback the state megatron-core
  expects when it builds the template to load into (:func:`_fresh_adam_state`);
* ``ZCLIP_TEST_TRACE=<path>``: rank 0 appends one line per iteration: ``true_norm``, the norm of the
  whole model's gradient computed here from every rank's ``main_grad`` before Megatron's reduction
  (the average over data-parallel ranks of the full tensors, every TP shard of a split tensor once),
  knowing nothing of Megatron's or zclip_dist's norm code; and ``post_clip_norm``, Megatron's own norm
  of the gradients the update then uses.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.distributed as dist

_TRACE: dict[int, dict] = {}


def _iteration() -> int:
    from megatron.training.global_vars import get_args

    return int(get_args().curr_iteration) + 1  # the number Megatron-LM logs for this train step


def _true_norm(params: list) -> float:
    """Norm of the full gradient: DP-averaged, each TP-split tensor from all its shards, replicas once."""
    from megatron.core import parallel_state as ps

    tp_group, dp_group = ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group()
    tp, dp = dist.get_world_size(tp_group), dist.get_world_size(dp_group)
    total = 0.0
    for p in params:
        grad = p.main_grad.detach().double().clone()
        dist.all_reduce(grad, group=dp_group)
        grad /= dp
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            shards = [torch.empty_like(grad) for _ in range(tp)]
            dist.all_gather(shards, grad, group=tp_group)
            grad = torch.cat(shards, dim=p.partition_dim)
        total += float(grad.square().sum())
    return math.sqrt(total)


def _write(iteration: int, **values) -> None:
    entry = _TRACE.setdefault(iteration, {"iteration": iteration})
    entry.update(values)
    if "true_norm" in entry and "post_clip_norm" in entry and dist.get_rank() == 0:
        with open(os.environ["ZCLIP_TEST_TRACE"], "a") as f:
            f.write(json.dumps(_TRACE.pop(iteration)) + "\n")


def _wrap_finalize(training) -> None:
    spike = os.environ.get("ZCLIP_TEST_SPIKE")
    at, factor = (int(spike.split(":")[0]), float(spike.split(":")[1])) if spike else (None, 1.0)
    original = training.finalize_model_grads

    def finalize_model_grads(model, *args, **kwargs):
        params = [p for chunk in model for p in chunk.parameters() if getattr(p, "main_grad", None) is not None]
        iteration = _iteration()
        if iteration == at:
            for p in params:
                p.main_grad.mul_(factor)
        if os.environ.get("ZCLIP_TEST_TRACE"):
            _write(iteration, true_norm=_true_norm(params))
        return original(model, *args, **kwargs)

    training.finalize_model_grads = finalize_model_grads


def _fresh_adam_state(optimizer) -> None:
    """Without Apex/TE (CPU), megatron-core's DistributedOptimizer reads Adam's ``step`` from the state of
    the torch.optim fallback while it builds the template a checkpoint is loaded into, before any step has
    made that state: give it the state a first step would (zeros; the load then overwrites it)."""
    from megatron.training.global_vars import get_args

    if not get_args().load:
        return
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(sub, "init_state_fn", None) is not None and hasattr(sub, "shard_fp32_groups"):
            sub.init_state_fn(sub.optimizer, sub.config)
            for state in sub.optimizer.state.values():
                state.setdefault("step", torch.zeros(()))


def _wrap_optimizer_factory(training) -> None:
    """After the launcher's own wrap: read Megatron's norm of the gradients the update is about to use."""
    original = training.get_megatron_optimizer

    def factory(*args, **kwargs):
        optimizer = original(*args, **kwargs)
        _fresh_adam_state(optimizer)
        step_with_ready_grads = optimizer.step_with_ready_grads

        def traced():
            if os.environ.get("ZCLIP_TEST_TRACE"):
                _write(_iteration(), post_clip_norm=float(optimizer.get_grad_norm()))
            return step_with_ready_grads()

        optimizer.step_with_ready_grads = traced  # instance attribute: stock step() calls it by name
        return optimizer

    training.get_megatron_optimizer = factory


def main() -> None:
    from tests import megatron_cpu_shim

    script = os.path.abspath(sys.argv[1])
    sys.path.insert(0, os.path.dirname(script))  # the checkout: megatron.training, megatron.legacy
    megatron_cpu_shim.apply()
    torch.cuda.is_available = lambda: True  # initialize_megatron asserts it; the shim serves the calls
    import megatron.core.datasets.utils as dataset_utils
    import megatron.training.training as training

    dataset_utils.compile_helpers = lambda: None
    if hasattr(training, "fused_kernels") or os.path.isdir(os.path.join(os.path.dirname(script), "megatron",
                                                                         "legacy", "fused_kernels")):
        import megatron.legacy.fused_kernels as fused_kernels

        fused_kernels.load = lambda args: None
    from zclip_dist.megatron import launch

    launch.install()  # idempotent: main() below finds it done
    _wrap_finalize(training)
    _wrap_optimizer_factory(training)
    launch.main(sys.argv[1:])


if __name__ == "__main__":
    main()
