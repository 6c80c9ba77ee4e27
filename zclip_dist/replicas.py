"""Each data-parallel replica's squared gradient norm *before* the reduction, for spike forensics.

The reduced gradient no longer says whose micro-batches it came from; the gradient before the
data-parallel (DP) reduction does. A :class:`ReplicaMeter` keeps this rank's part of its replica's squared
norm in one fp32 device scalar, filled where the DP reduction starts:

* **DDP**: a comm hook wrapping the default all-reduce hook (or the user's own, :meth:`ReplicaMeter.ddp_hook`)
  adds each bucket's squared norm before the bucket is all-reduced;
* **FSDP2** (``fully_shard``): a reduce-scatter (``FSDPModule.set_custom_reduce_scatter``) adds the squared
  norm of its input -- this rank's unsharded gradient of that module -- before reducing it;
* **anything else** (explicit groups with a reduction of one's own): :meth:`ReplicaMeter.observe` before it.

Cost: one more read of each gradient, during backward (hence the ``replicas`` setting), and a Python
call per DDP bucket. No host read.

Communication: :meth:`ReplicaMeter.slots` puts the scalar in slot ``replica`` of a vector with one slot per
replica, which rides in the norm's own all-reduce (SUM over the topology's group; see
:meth:`NormCalculator.with_squares <zclip_dist.norms.NormCalculator.with_squares>`). Every rank receives
every replica's squared norm with no extra collective, for 4 bytes per replica (8 KB at 2,048 replicas).
The TP and PP ranks of one replica add into the same slot, each counting only what
:meth:`Topology.counts_in_replica <zclip_dist.topology.Topology.counts_in_replica>` says (a TP duplicate
on TP rank 0), so the slot holds the replica's whole gradient.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .norms import ACC_DTYPE, local_tensor
from .topology import Topology

__all__ = ["ReplicaMeter", "replica_ranks"]

CommHook = Callable[[object, "dist.GradBucket"], "torch.futures.Future[Tensor]"]


def replica_ranks(topology: Topology) -> list[tuple[int, ...]]:
    """Replica index -> its global ranks. One all-gather of one int per rank, in host memory (a gloo
    group): no device sync. Collective over the topology's group: call it on every rank, once."""
    if topology.group is None or not dist.is_initialized():
        return [(dist.get_rank() if dist.is_initialized() else 0,)] * topology.replica[1]
    from .clipper import _host_group, host_list  # the clipper's gloo twin of a device group, shared

    group = _host_group(topology.group)
    mine = torch.tensor([dist.get_rank(), topology.replica[0]], dtype=torch.int64)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    table: list[list[int]] = [[] for _ in range(topology.replica[1])]
    for rank, replica in host_list(torch.stack(everyone)):
        table[replica].append(rank)
    return [tuple(sorted(r)) for r in table]


class ReplicaMeter:
    """This rank's squared gradient norm before the DP reduction, and its slot in the per-replica vector."""

    def __init__(self, topology: Topology, device: torch.device | str) -> None:
        self.topology = topology
        self.replica, self.replicas = topology.replica
        self.local = torch.zeros((), dtype=ACC_DTYPE, device=device)
        self._mine = torch.arange(self.replicas, device=device) == self.replica
        self._zeros = torch.zeros(self.replicas, dtype=ACC_DTYPE, device=device)
        self._counts: dict[int, bool] = {}  # id(param) -> counts in this replica (cached rule)
        self.attached: str | None = None  # "ddp", "fsdp2", "observe", or a hook the user registered

    # ---- measuring -------------------------------------------------------------------------------
    def add_flat(self, flat: Tensor) -> None:
        """Add the squared norm of a flat gradient buffer (fp32 accumulation whatever its dtype)."""
        self.local.add_(torch.linalg.vector_norm(flat, dtype=ACC_DTYPE).square())

    def _count(self, p: Tensor) -> bool:
        c = self._counts.get(id(p))
        if c is None:
            c = self._counts[id(p)] = self.topology.counts_in_replica(p)
        return c

    def add_tensors(self, grads: Sequence[Tensor | None]) -> None:
        """Add the squared norms of gradient tensors that all count in this replica (None skipped)."""
        keep = [local_tensor(g) for g in grads if g is not None]
        if keep:
            norms = torch._foreach_norm(keep, 2, dtype=ACC_DTYPE)
            self.local.add_(torch.stack([n.to(self.local.device) for n in norms]).square().sum())

    def add_grads(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """Add ``params``' gradients, each counted once per replica (a TP duplicate on one tensor rank)."""
        self.add_tensors([g for p, g in zip(params, grads) if g is not None and self._count(p)])

    def observe(self, params: Iterable[Tensor]) -> None:
        """Record ``params``' local gradients: call before a data-parallel reduction of one's own."""
        params = list(params)
        self.add_grads(params, [p.grad for p in params])
        self.attached = self.attached or "observe"

    def ddp_hook(self, inner: CommHook | None = None) -> CommHook:
        """A DDP comm hook that measures each bucket, then runs ``inner`` (default: DDP's all-reduce).

        For a DDP module that gets its own hook: ``model.register_comm_hook(state, meter.ddp_hook(my_hook))``.
        """
        if inner is None:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook as inner

        def hook(state, bucket):  # no annotations: DDP checks them, and this module's are strings
            if self.topology.replica_counts is not None:  # TP duplicates may sit in the bucket
                self.add_grads(bucket.parameters(), bucket.gradients())
            else:
                self.add_flat(bucket.buffer())
            return inner(state, bucket)

        self.attached = self.attached or "hook"
        return hook

    def attach(self, model: nn.Module) -> bool:
        """Measure where ``model``'s DP reduction starts: DDP comm hook or FSDP2 reduce-scatter.

        Returns False when ``model`` is neither (then call :meth:`observe` before one's own reduction).
        """
        if self.attached is not None:
            return True
        if isinstance(model, nn.parallel.DistributedDataParallel):
            try:
                model.register_comm_hook(model.process_group, self.ddp_hook())
            except RuntimeError as err:  # a hook is registered already; DDP takes one
                raise RuntimeError(
                    "zclip_dist forensics: this DDP module already has a comm hook; pass it to "
                    "zclip.attach(model, comm_hook=your_hook, comm_state=state) instead of registering it, or "
                    f"turn replica attribution off with forensics={{'replicas': False}} ({err})") from err
            self.attached = "ddp"
            return True
        from torch.distributed.fsdp import FSDPModule

        fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
        if fsdp:
            comm = _metered_reduce_scatter(self)
            for m in fsdp:
                try:
                    m.set_custom_reduce_scatter(comm)
                except ValueError as err:  # several parameter groups (per-parameter meshes) in one module
                    raise RuntimeError(f"zclip_dist forensics: cannot measure this FSDP2 module's replicas ({err}); "
                                       "turn replica attribution off with forensics={'replicas': False}") from err
            self.attached = "fsdp2"
            return True
        return False

    # ---- the slots -------------------------------------------------------------------------------
    def slots(self) -> Tensor:
        """This step's per-replica vector (this rank's value in its own slot, NaN kept there only) for the
        norm's all-reduce; the accumulator restarts for the next step."""
        out = torch.where(self._mine, self.local, self._zeros)
        self.local.zero_()
        return out


def _metered_reduce_scatter(meter: ReplicaMeter):
    """FSDP2's default reduce-scatter, measuring its input first (torch >= 2.8: set_custom_reduce_scatter)."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    class MeteredReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group: dist.ProcessGroup, op,
                     async_op: bool = False):
            meter.add_flat(input_tensor)  # this rank's unsharded gradient (padding is zeros)
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    return MeteredReduceScatter()
