"""Which gradients a rank counts toward the global norm, and the one group their squares are summed over.

The global squared norm is a sum over every gradient element of the *whole* model, each counted once.
A :class:`Topology` expresses that as two facts:

* ``counts(param)``: whether this rank's local copy of ``param``'s gradient is the one that counts.
  A copy that is replicated over some group (DDP replicas, TP-duplicated LayerNorm weights, the tied
  embedding on the last pipeline stage, experts replicated over expert-DP) counts on exactly one rank
  of that group; a shard (TP, ZeRO / FSDP, pipeline stage, expert) counts everywhere.
* ``group``: a process group containing every rank that holds a counting copy. One ``all_reduce(SUM)``
  of the weighted local sums over it gives the exact global squared norm on every rank of it.

Replicas that do not count still contribute ``0 * (their squared norm)``: zero when finite, NaN when not,
so a NaN or Inf on *any* rank makes the norm non-finite on every rank and all of them take the same
action. Ranks of ``group`` receive bitwise-identical results from the all-reduce, so every rank feeds
the same number into the same deterministic statistics: one decision everywhere.

Spike forensics name data-parallel replicas: ``replica`` is this rank's (index, count) among them and
``replica_counts`` the dedup *within* one replica (a TP duplicate counts on TP rank 0 of it), so that
summing the weighted local squares of a replica's ranks gives its whole gradient's squared norm.

Per-tensor norms (AdaGC) need a second fact: ``tensor_group``, the ranks whose parameter lists align
(the same tensors in the same order: TP and DP ranks of one pipeline stage) and ``tensor_counts``, the
dedup within that group. A weighted SUM of the per-tensor vector over it gives every whole tensor's
norm in one bucketed collective. Without pipeline parallelism it is ``group`` itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Union

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Topology", "is_tp_sharded", "is_shared_copy", "is_expert"]

ProcessGroup = dist.ProcessGroup


def is_tp_sharded(param: Tensor) -> bool:
    """Megatron / DeepSpeed convention: TP-sharded parameters carry ``tensor_model_parallel=True``."""
    return bool(getattr(param, "tensor_model_parallel", False))


def is_shared_copy(param: Tensor) -> bool:
    """A non-owner copy of a tied parameter: Megatron ``shared=True``, DeepSpeed ``ds_pipe_replicated``."""
    return bool(getattr(param, "shared", False)) or bool(getattr(param, "ds_pipe_replicated", False))


def is_expert(param: Tensor) -> bool:
    """Megatron and DeepSpeed MoE both mark expert parameters ``allreduce=False``."""
    return getattr(param, "allreduce", True) is False


def _rank_in(group: ProcessGroup | None) -> int:
    return dist.get_rank(group) if group is not None else 0


def _world() -> ProcessGroup:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("this Topology needs torch.distributed to be initialised first")
    return dist.group.WORLD


class _Same:
    """Marker: the per-tensor group is the global-norm group."""

    def __repr__(self) -> str:
        return "SAME"


SAME = _Same()

#: Mesh dimension names that are model parallel, not data parallel (see ``Topology.from_mesh``).
_MODEL_DIM = re.compile(r"(tp|tensor|cp|context|ep|expert|pp|pipe)")


@dataclass(frozen=True)
class Topology:
    """How local gradients combine into the global norm. Build with a constructor below."""

    group: ProcessGroup | None
    counts: Callable[[Tensor], bool] = field(repr=False)
    description: str = "local"
    tensor_group: Union[ProcessGroup, None, _Same] = SAME
    tensor_counts: Callable[[Tensor], bool] | None = field(default=None, repr=False)
    tensor_group_missing: str | None = None  # why per-tensor norms cannot be formed (set by from_groups)
    replica: tuple[int, int] = (0, 1)  # (this rank's data-parallel replica, number of replicas)
    replica_counts: Callable[[Tensor], bool] | None = field(default=None, repr=False)  # dedup within a replica

    # ---- the collectives -------------------------------------------------------------------------
    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """SUM over ``self.group``: the ranks that hold counting copies (see module docstring).

        In place, asynchronous on the device stream; no host synchronisation.
        """
        if self.group is not None:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_reduce_tensor_sum(self, vector: Tensor) -> Tensor:
        """SUM of a per-tensor vector over ``tensor_group``: the ranks holding pieces of the same tensors.

        TP shards (and ZeRO/FSDP shards) of one tensor sit at the same vector position on every rank
        of this group, so one bucketed all-reduce yields every whole tensor's squared norm.
        """
        if self.tensor_group_missing is not None:
            raise ValueError(self.tensor_group_missing)
        group = self.group if self.tensor_group is SAME else self.tensor_group
        if group is not None:
            dist.all_reduce(vector, op=dist.ReduceOp.SUM, group=group)
        return vector

    @property
    def tensor_group_is_group(self) -> bool:
        return self.tensor_group is SAME and self.tensor_group_missing is None

    def counts_in_tensor_group(self, param: Tensor) -> bool:
        return (self.tensor_counts or self.counts)(param)

    def counts_in_replica(self, param: Tensor) -> bool:
        """Whether this rank's copy counts toward its replica's squared norm (before the DP reduction)."""
        return True if self.replica_counts is None else self.replica_counts(param)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if self.group is not None else 1

    # ---- constructors ----------------------------------------------------------------------------
    @classmethod
    def local(cls) -> "Topology":
        """One process holds the whole model: no communication."""
        return cls(group=None, counts=lambda p: True, description="local")

    @classmethod
    def data_parallel(cls, group: ProcessGroup | None = None) -> "Topology":
        """DDP: every rank of ``group`` (default WORLD) holds the full, identical, already-reduced gradient.

        Replica 0 counts; the SUM over ``group`` hands every replica the same bits and carries a
        non-finite value from any replica to all of them.
        """
        group = group if group is not None else _world()
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        return cls(group=group, counts=lambda p: rank == 0, description=f"data_parallel(size={size})",
                   replica=(rank, size))

    @classmethod
    def sharded(cls, group: ProcessGroup | None = None) -> "Topology":
        """Every rank of ``group`` holds a disjoint shard of every gradient (ZeRO, FSDP1 FULL_SHARD)."""
        group = group if group is not None else _world()
        size = dist.get_world_size(group)
        return cls(group=group, counts=lambda p: True, description=f"sharded(size={size})",
                   replica=(dist.get_rank(group), size))

    @classmethod
    def from_groups(
        cls,
        *,
        tp_group: ProcessGroup | None = None,
        pp_group: ProcessGroup | None = None,
        dp_group: ProcessGroup | None = None,
        dp_sharded: bool = False,
        expert_tp_group: ProcessGroup | None = None,
        expert_dp_group: ProcessGroup | None = None,
        group: ProcessGroup | None = None,
        tensor_group: ProcessGroup | None = None,
        tp_sharded: Callable[[Tensor], bool] = is_tp_sharded,
        shared_copy: Callable[[Tensor], bool] = is_shared_copy,
        expert: Callable[[Tensor], bool] = is_expert,
    ) -> "Topology":
        """Explicit tensor / pipeline / data (and expert) parallel groups, Megatron style.

        * A parameter without ``tensor_model_parallel`` is a TP duplicate: it counts on TP rank 0 only.
        * A non-owner copy of a tied parameter (``shared`` / ``ds_pipe_replicated``) never counts.
        * Pipeline stages own disjoint parameters: all count.
        * Gradients are replicated over ``dp_group`` unless ``dp_sharded`` (ZeRO / distributed
          optimizer shards), in which case every DP rank's shard counts.
        * Expert parameters (``allreduce=False``) use ``expert_tp_group`` / ``expert_dp_group``.

        ``group`` (default WORLD) must contain every rank of all these groups; the one SUM is over it.
        ``tensor_group`` (per-tensor norms for AdaGC) is needed only with pipeline parallelism: the TP x
        DP ranks of this rank's stage. Without a pipeline it is ``group``.
        """
        group = group if group is not None else _world()
        tp_rank, dp_rank = _rank_in(tp_group), _rank_in(dp_group)
        etp_rank, edp_rank = _rank_in(expert_tp_group), _rank_in(expert_dp_group)

        def counts_in_stage(p: Tensor) -> bool:
            if expert(p):
                t_rank, d_rank = etp_rank, edp_rank
            else:
                t_rank, d_rank = tp_rank, dp_rank
            if t_rank != 0 and not tp_sharded(p):
                return False
            return dp_sharded or d_rank == 0

        def counts(p: Tensor) -> bool:
            return not shared_copy(p) and counts_in_stage(p)

        def counts_in_replica(p: Tensor) -> bool:
            # Expert gradients hold tokens of other replicas (all-to-all): they name no one replica.
            return not shared_copy(p) and not expert(p) and (tp_rank == 0 or tp_sharded(p))

        sizes = {n: (dist.get_world_size(g) if g is not None else 1)
                 for n, g in (("tp", tp_group), ("pp", pp_group), ("dp", dp_group))}
        desc = "groups(" + ", ".join(f"{k}={v}" for k, v in sizes.items()) + (", dp_sharded" if dp_sharded else "") + ")"
        missing = None
        if tensor_group is None and sizes["pp"] > 1:
            missing = ("per-tensor norms with pipeline parallelism need Topology.from_groups(tensor_group=...): "
                       "the TP x DP ranks of this rank's pipeline stage")
        # A tied copy has its own (already all-reduced) gradient: it counts for its own per-tensor norm.
        return cls(group=group, counts=counts, description=desc,
                   tensor_group=SAME if tensor_group is None else tensor_group,
                   tensor_counts=counts_in_stage, tensor_group_missing=missing,
                   replica=(dp_rank, sizes["dp"]), replica_counts=counts_in_replica)

    @classmethod
    def from_mesh(cls, mesh: "torch.distributed.device_mesh.DeviceMesh") -> "Topology":
        """DTensor parameters on ``mesh`` (FSDP2 ``fully_shard``, DTensor TP, HSDP, 2-D FSDP×TP).

        A DTensor gradient counts when this rank's coordinate is 0 on every mesh dimension where it is
        ``Replicate``; ``Shard`` dimensions count everywhere. A plain tensor is replicated on the whole mesh.
        The SUM runs over all ranks of the mesh. Mesh dimensions named for model parallelism (``tp``,
        ``tensor``, ``cp``, ``context``, ``ep``, ``expert``, ``pp``, ``pipe`` and names starting with
        them) are not data parallel; the other dimensions index the replicas.
        """
        from torch.distributed.tensor import DTensor, Replicate, Shard

        coords = mesh.get_coordinate() or [0] * mesh.ndim
        if mesh.ndim == 1:
            group = mesh.get_group()
        elif mesh.size() == dist.get_world_size():
            group = _world()
        else:
            group = mesh._flatten().get_group()  # DeviceMesh's own way to get the group of all its ranks

        def counts(p: Tensor) -> bool:
            if not isinstance(p, DTensor):
                return all(c == 0 for c in coords)
            if p.device_mesh != mesh:
                raise ValueError(f"parameter on mesh {p.device_mesh} but the Topology was built for {mesh}; "
                                 "build one Topology per mesh")
            for dim, placement in enumerate(p.placements):
                if isinstance(placement, Replicate):
                    if coords[dim] != 0:
                        return False
                elif not isinstance(placement, Shard):
                    raise ValueError(f"unsupported gradient placement {placement} on mesh dim {dim}: "
                                     "expected Shard or Replicate")
            return True

        names = mesh.mesh_dim_names or (None,) * mesh.ndim
        model_dims = [d for d, n in enumerate(names) if n is not None and _MODEL_DIM.match(n.lower())]
        replica, replicas = 0, 1
        for d in range(mesh.ndim):
            if d not in model_dims:
                replica, replicas = replica * mesh.shape[d] + coords[d], replicas * mesh.shape[d]

        def counts_in_replica(p: Tensor) -> bool:
            placements = p.placements if isinstance(p, DTensor) else [Replicate()] * mesh.ndim
            return all(coords[d] == 0 or not isinstance(placements[d], Replicate) for d in model_dims)

        return cls(group=group, counts=counts, description=f"mesh{tuple(mesh.shape)}",
                   replica=(replica, replicas), replica_counts=counts_in_replica)

    @classmethod
    def for_parameters(cls, params: Iterable[Tensor], module: torch.nn.Module | None = None) -> "Topology":
        """Guess the topology the reference package would assume, made exact.

        DTensor parameters -> :meth:`from_mesh`; a ``DistributedDataParallel`` module -> its process
        group; otherwise, with torch.distributed initialised and more than one rank, data parallel over
        WORLD (the gradients are assumed replicated, as under DDP); otherwise local. Model-parallel
        layouts built from explicit groups must pass ``Topology.from_groups(...)``.
        """
        from torch.distributed.tensor import DTensor

        for p in params:
            if isinstance(p, DTensor):
                return cls.from_mesh(p.device_mesh)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls.local()
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            return cls.data_parallel(module.process_group)
        return cls.data_parallel()

