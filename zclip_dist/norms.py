"""Gradient norms: local sums of squares (pure math) and their exact reduction by a Topology.

Local math follows ``torch.nn.utils.clip_grad_norm_``: tensors grouped by device and dtype, one
``torch._foreach_norm`` per group, accumulated in fp32 or wider: the widest gradient dtype promoted with
fp32 (a bf16 model gets an fp32 norm -- the reference package accumulated in the model dtype -- and a
model with fp64 gradients an fp64 one, as ``clip_grad_norm_`` gives). The per-tensor values are kept as a
vector, which AdaGC needs and which lets replicas weight their contribution without a second pass.
Nothing here reads a value on the host.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .topology import Topology

__all__ = ["local_tensor", "NormPlan", "NormCalculator", "ACC_DTYPE"]

ACC_DTYPE = torch.float32


def local_tensor(t: Tensor) -> Tensor:
    """The part of ``t`` this rank holds (DTensor -> its local shard)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class NormPlan(NamedTuple):
    """How one list of gradients is laid out for the norm; built once per parameter set and reused."""

    groups: tuple[tuple[int, ...], ...]  # indices into the gradient list, one tuple per (device, dtype)
    order: tuple[int, ...]  # plan position -> gradient-list index (concatenation of ``groups``)
    weights: Tensor  # 0/1 per plan position on the output device: does this rank's copy count
    tensor_weights: Tensor  # the same for per-tensor norms (dedup within the topology's tensor group)
    device: torch.device
    dtype: torch.dtype  # the accumulation dtype: ACC_DTYPE, or wider when a gradient is wider


class NormCalculator:
    """Global L2 norm of a list of gradients under a :class:`Topology`.

    ``__call__(params, grads)`` returns ``(norm, sq)``: the global norm (0-d, ``plan.dtype``, identical on
    every rank of the topology's group) and this rank's per-tensor squared norms in plan order (``self.plan``).
    The plan (grouping, count weights) is cached and rebuilt only when the set of gradients changes.
    """

    def __init__(self, topology: Topology, device: torch.device | None = None) -> None:
        self.topology = topology
        self.device = device
        self._key: tuple | None = None
        self.plan: NormPlan | None = None

    def _build(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> NormPlan:
        device = self.device or (grads[0].device if grads else torch.device("cpu"))
        by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, g in enumerate(grads):
            by_kind.setdefault((g.device, g.dtype), []).append(i)
        groups = tuple(tuple(ix) for ix in by_kind.values())
        order = tuple(i for ix in groups for i in ix)
        acc = ACC_DTYPE
        for _, dtype in by_kind:
            if dtype.is_floating_point:
                acc = torch.promote_types(acc, dtype)

        def mask(rule) -> Tensor:
            return torch.tensor([1.0 if rule(params[i]) else 0.0 for i in order], dtype=acc, device=device)

        return NormPlan(groups=groups, order=order, weights=mask(self.topology.counts),
                        tensor_weights=mask(self.topology.counts_in_tensor_group), device=device, dtype=acc)

    def local_squares(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
        """Per-tensor squared norms of this rank's local gradients, in ``plan.dtype``, in plan order."""
        # Keyed by the parameters (stable objects), not the gradients (new tensors after zero_grad):
        # a parameter's gradient keeps its device and dtype, and hashing ids costs ~10 ns each.
        key = tuple(map(id, params))
        if key != self._key:
            self.plan, self._key = self._build(params, grads), key
        plan = self.plan
        parts = []
        for ix in plan.groups:
            norms = torch._foreach_norm([grads[i] for i in ix], 2, dtype=plan.dtype)
            parts.append(torch.stack(norms).to(plan.device, non_blocking=True))
        if not parts:
            return torch.zeros(0, dtype=plan.dtype, device=plan.device)
        sq = torch.cat(parts) if len(parts) > 1 else parts[0]
        return sq.square_()

    def __call__(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        sq = self.local_squares(params, grads)
        # 0 * NaN = NaN: a non-finite gradient on a non-counting replica still poisons the sum on purpose.
        total = torch.dot(sq, self.plan.weights) if sq.numel() else torch.zeros((), dtype=self.plan.dtype, device=self.plan.device)
        self.topology.all_reduce_sum(total)
        return total.sqrt(), sq

    def with_squares(self, params: Sequence[Tensor], grads: Sequence[Tensor], extra: Tensor | None = None
                     ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The global norm together with what spike forensics needs, in the same single all-reduce.

        Returns ``(norm, squares, extra)``: ``squares`` is every counted tensor's squared norm summed over
        the group (plan order; TP and ZeRO/FSDP pieces of one tensor add up, replicas count once), so
        ``squares.sum()`` is the global squared norm up to rounding; ``extra`` (any fp32 vector, e.g. the
        per-replica slots of :class:`~zclip_dist.replicas.ReplicaMeter`) comes back SUMmed over the group.
        One buffer ``[squared norm | weighted squares | extra]``: 1 + n_tensors + len(extra) floats instead
        of one; the norm is the one ``__call__`` returns (bitwise in one process: the local sum is the
        same; across ranks, up to the order in which the all-reduce adds the ranks' values).

        With a pipeline, positions do not align over the group (each stage holds other tensors):
        ``squares`` is then None.
        """
        sq = self.local_squares(params, grads)
        plan = self.plan
        # The norm travels as its own scalar, summed locally as ``__call__`` sums it: turning forensics on
        # or off does not change the norm's rounding (a last-bit change is enough to move a chaotic run).
        total = (torch.dot(sq, plan.weights) if sq.numel() else torch.zeros((), dtype=plan.dtype, device=plan.device))
        aligned = self.topology.tensor_group_is_group
        parts = [total.reshape(1)]
        if aligned:
            parts.append(sq * plan.weights)  # 0 * NaN = NaN, as in __call__
        if extra is not None:
            parts.append(extra.to(plan.dtype))
        buf = torch.cat(parts)
        self.topology.all_reduce_sum(buf)
        n = 1 + (sq.numel() if aligned else 0)
        return buf[0].sqrt(), (buf[1:n] if aligned else None), (buf[n:] if extra is not None else None)

    def per_tensor(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Global norm and the squared norms of the *whole* tensors (plan order), identical on every rank.

        One bucketed all-reduce when the per-tensor group is the global group (no pipeline
        parallelism): the global square is the sum of the whole-tensor squares. With a pipeline, a
        second (scalar) all-reduce over the global group adds the other stages.
        """
        norm, full, _ = self.per_tensor_with(params, grads)
        return norm, full

    def per_tensor_with(self, params: Sequence[Tensor], grads: Sequence[Tensor], extra: Tensor | None = None
                        ) -> tuple[Tensor, Tensor, Tensor | None]:
        """:meth:`per_tensor`, plus ``extra`` SUMmed over the global group in a collective it already makes."""
        sq = self.local_squares(params, grads)
        plan = self.plan
        full = sq * plan.tensor_weights  # 0 * NaN = NaN: a bad replica still poisons its tensor's norm
        n = full.numel()
        if self.topology.tensor_group_is_group:
            buf = torch.cat([full, extra.to(plan.dtype)]) if extra is not None else full
            self.topology.all_reduce_tensor_sum(buf)
            full = buf[:n]
            return full.sum().sqrt(), full, (buf[n:] if extra is not None else None)
        total = torch.dot(sq, plan.weights) if sq.numel() else torch.zeros((), dtype=plan.dtype, device=plan.device)
        head = total.reshape(1)
        buf = torch.cat([head, extra.to(plan.dtype)]) if extra is not None else head
        self.topology.all_reduce_tensor_sum(full)
        self.topology.all_reduce_sum(buf)
        return buf[0].sqrt(), full, (buf[1:] if extra is not None else None)
