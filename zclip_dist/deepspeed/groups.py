"""Process groups of a DeepSpeed engine: where every gradient element is counted once.

DeepSpeed's own norm is used where it is exact; these topologies serve the paths where zclip_dist computes
the norm itself (no optimizer wrapper, FP16_UnfusedOptimizer under TP or with MoE experts) and AdaGC's
per-tensor norms.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from ..topology import Topology, is_expert

__all__ = ["MegatronMPU", "engine_topology", "sharded_topology", "moe_topology"]


class MegatronMPU:
    """megatron-core ``parallel_state`` presented through DeepSpeed's ``mpu`` interface.

    DeepSpeed calls ``get_model_parallel_rank/world_size/group``, which parallel_state lacks. The model
    parallel rank is the tensor rank (DeepSpeed uses it to skip TP duplicates) and the model parallel
    group is the TP x PP group (DeepSpeed sums partial norms over it). Everything else is forwarded.
    """

    def __init__(self, parallel_state: Any = None) -> None:
        if parallel_state is None:
            from megatron.core import parallel_state
        self._ps = parallel_state

    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._ps.get_model_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._ps.get_data_parallel_group()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ps, name)


def _group_if_split(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    return group if group is not None and dist.get_world_size(group) > 1 else None


def moe_topology() -> Topology:
    """DeepSpeed MoE without an mpu or a pipeline. A dense parameter is replicated on every rank: it counts
    on rank 0. An expert (``allreduce=False``) lives on one expert-parallel rank and is replicated over
    its expert-data-parallel group (``group_name``): it counts on that group's rank 0. SUM over WORLD."""
    from deepspeed.utils import groups

    first: dict[str, bool] = {}

    def counts(p) -> bool:
        if not is_expert(p):
            return dist.get_rank() == 0
        name = p.group_name
        if name not in first:
            first[name] = dist.get_rank(group=groups._get_expert_data_parallel_group(name)) == 0
        return first[name]

    return Topology(group=dist.group.WORLD, counts=counts, description="deepspeed_moe")


def engine_topology(engine: Any) -> Topology:
    """Where every gradient element of ``engine``'s module is counted once (no-wrapper, TP and MoE paths).

    Pipeline engines: the grid's slice (tensor) group, pipe group and data group. An ``mpu``: its tensor
    group (``get_tensor_model_parallel_group`` if it has one, else ``get_model_parallel_group``) and its
    data group. MoE: :func:`moe_topology`. Otherwise data parallel over WORLD. The one SUM runs over
    WORLD, which contains them all.
    """
    if getattr(engine, "has_moe_layers", False):
        return moe_topology()  # with an mpu or a pipeline: refused at attach
    grid = getattr(engine, "grid", None)
    if grid is not None:
        return Topology.from_groups(tp_group=_group_if_split(grid.get_slice_parallel_group()),
                                    pp_group=_group_if_split(grid.get_pipe_parallel_group()),
                                    dp_group=_group_if_split(grid.get_data_parallel_group()))
    mpu = engine.mpu
    if mpu is not None:
        tp_get = getattr(mpu, "get_tensor_model_parallel_group", None) or mpu.get_model_parallel_group
        pp_get = getattr(mpu, "get_pipeline_model_parallel_group", None)
        return Topology.from_groups(tp_group=_group_if_split(tp_get()),
                                    pp_group=_group_if_split(pp_get()) if pp_get else None,
                                    dp_group=_group_if_split(mpu.get_data_parallel_group()))
    return Topology.data_parallel(dist.group.WORLD)


def sharded_topology(engine: Any, dp_group: dist.ProcessGroup) -> Topology:
    """ZeRO: every DP rank holds a disjoint piece of every tensor it lists, so all pieces count; with an
    ``mpu``, TP-duplicated tensors count on tensor rank 0 only and the SUM runs over WORLD (TP x DP)."""
    mpu = engine.mpu
    if mpu is None:
        return Topology.sharded(dp_group)
    tp_get = getattr(mpu, "get_tensor_model_parallel_group", None) or mpu.get_model_parallel_group
    return Topology.from_groups(tp_group=_group_if_split(tp_get()), dp_group=_group_if_split(dp_group),
                                dp_sharded=True)
