"""Where each parameter's gradient piece sits in a ZeRO rank's flat fp32 partition (read from DeepSpeed's
own bookkeeping), so per-tensor work can run on the partitions DeepSpeed already holds.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
import torch
from torch import Tensor

from ..topology import Topology
from .config import UnsupportedConfiguration

__all__ = ["Zero12Layout", "Zero3Layout", "PieceSquares"]


class Zero12Layout:
    """Where each parameter's piece sits in this rank's flat fp32 partition, per param group (ZeRO-1/2).

    Read once from DeepSpeed's own bookkeeping (``grad_start_offset`` / ``grad_partition_insertion_offset``,
    the layout its compact gradient buffer uses); the pieces of one group are contiguous and ordered as
    ``params_in_partition``. ``params`` is every parameter of every group, in an order all DP ranks share.
    """

    def __init__(self, opt: Any) -> None:
        self.params = [p for group in opt.round_robin_bit16_groups for p in group]
        position = {id(p): k for k, p in enumerate(self.params)}
        self.spans: list[list[tuple[int, int]]] = []  # per group: (offset in the flat partition, numel)
        self.positions: list[list[int]] = []  # per group: index into ``params`` of each span
        for i, group in enumerate(opt.params_in_partition):
            part = dist.get_rank(group=opt.real_dp_process_group[i])
            spans, positions = [], []
            for p in group:
                pid = opt.get_param_id(p)
                src = int(opt.grad_start_offset[i][part][pid])
                dst = int(opt.grad_partition_insertion_offset[i][part][pid])
                spans.append((dst, int(min(p.numel() - src, opt.partition_size[i] - dst))))
                positions.append(position[id(p)])
            self.spans.append(spans)
            self.positions.append(positions)

    def pieces(self, opt: Any, group: int) -> list[Tensor]:
        """This step's gradient pieces of ``group``, read as DeepSpeed's own norm reads them: the entries of
        ``averaged_gradients`` not marked ``_zero_padding``, paired in order with ``params_in_partition``
        (an unmarked tail of zeros pads the last partition). Once ``step`` has flattened the group into its
        fp32 partition (``averaged_gradients`` released), views of that partition at the same offsets."""
        spans = self.spans[group]
        if opt.averaged_gradients.get(group) is None:
            flat = self.flat_grad(opt, group)
            return [flat.narrow(0, offset, numel) for offset, numel in spans]
        pieces = [g for g in opt.averaged_gradients[group] if not getattr(g, "_zero_padding", False)]
        pieces = pieces[:len(spans)]
        if [g.numel() for g in pieces] != [numel for _, numel in spans]:
            raise RuntimeError(f"adagc: ZeRO group {group}'s gradient pieces do not match DeepSpeed's partition "
                               "offsets; this DeepSpeed layout is not supported")
        return pieces

    @staticmethod
    def flat_grad(opt: Any, group: int) -> Tensor:
        return opt.single_partition_of_fp32_groups[group].grad


class Zero3Layout:
    """ZeRO-3: each parameter's partition (``partition_numel`` elements, zero padded on the last rank) sits
    at ``grad_position`` in its sub-group's flat fp32 partition; every rank lists every parameter."""

    def __init__(self, opt: Any) -> None:
        self.params = [p for group in opt.fp16_groups for p in group]
        dp_ranks = dist.get_process_group_ranks(opt.dp_process_group)
        if any(dist.get_process_group_ranks(opt._get_param_partition_group(p)) != dp_ranks for p in self.params):
            raise UnsupportedConfiguration("adagc: ZeRO-3 parameters partitioned over a group other than the "
                                           "data-parallel group (MiCS) are not supported yet")
        position = {id(p): k for k, p in enumerate(self.params)}
        self.spans, self.positions = [], []
        for group in opt.fp16_groups:
            self.spans.append([tuple(opt.grad_position[opt.get_param_id(p)][1:]) for p in group])
            self.positions.append([position[id(p)] for p in group])

    @staticmethod
    def pieces(opt: Any, group: int) -> list[Tensor]:
        return list(opt.averaged_gradients[group])

    @staticmethod
    def flat_grad(opt: Any, group: int) -> Tensor:
        return opt.fp32_partitioned_groups_flat[group].grad


class PieceSquares:
    """Squared norms of this rank's gradient pieces, scattered into a vector over *all* of a layout's
    parameters (every DP rank lists the same parameters in the same order, so a SUM of this vector over
    the topology's tensor group gives every whole tensor's squared norm). TP duplicates count on one
    tensor rank only (weight 0 elsewhere). Device work only: no host read, no collective."""

    def __init__(self, layout: "Zero12Layout | Zero3Layout", topology: Topology, device: torch.device) -> None:
        self.layout = layout
        self.index = [torch.tensor(pos, dtype=torch.long, device=device) for pos in layout.positions]
        self.all_index = torch.cat(self.index) if self.index else torch.zeros(0, dtype=torch.long, device=device)
        counts = [topology.counts_in_tensor_group(p) for p in layout.params]
        self.weights = None if all(counts) else torch.tensor(counts, dtype=torch.float32, device=device)
        self.zeros = torch.zeros(len(layout.params), dtype=torch.float32, device=device)

    def local(self, opt: Any) -> Tensor:
        """fp32 vector over all parameters: this rank's pieces' squared norms, zero elsewhere."""
        pieces = [g for i in range(len(self.index)) for g in self.layout.pieces(opt, i)]
        if not pieces:
            return self.zeros.clone()
        norms = torch.stack(torch._foreach_norm(pieces, 2, dtype=torch.float32)).to(self.zeros.device)
        sq = self.zeros.index_copy(0, self.all_index, norms.square_())
        return sq if self.weights is None else sq.mul_(self.weights)  # 0 * NaN stays NaN on purpose
