"""Spike forensics on Megatron: at a clipped, spike or non-finite step, which parameters and which
data-parallel replicas carried the gradient norm (:mod:`zclip_dist.forensics` has the math and the record).

* **Parameters, ZClip.** Megatron's norm is a host float and ZClip decides on the host, so the host knows
  whether a step is an event at no cost. Only then, before the clip, :meth:`MegatronForensics.measure`
  takes the squared norm of every main-gradient piece this rank holds (TP shards, distributed-optimizer
  shards, expert shards; one ``_foreach_norm``), weights it by the counting rule of
  :meth:`Topology.from_groups <zclip_dist.topology.Topology.from_groups>` (a TP duplicate on TP rank 0,
  a DP replica of a non-distributed optimizer on DP rank 0, the tied output copy never), adds it at its
  logical parameter's slot and sums the vector with **one** all-reduce over WORLD. Ordinary steps: no
  kernel, no collective, no host read.
* **Parameters, AdaGC.** AdaGC already reduces every whole tensor's squared norm each step (one
  all-reduce over the stage); that vector is the forensics vector, recorded on the device
  (:class:`~zclip_dist.events.EventRecorder`) and read when the host reads anyway (JSON-lines log step,
  :func:`~zclip_dist.megatron.hook.log_metrics`, ``read_every``). Names are this pipeline stage's.
* **Logical names** (:func:`logical_names`): the model's ``named_parameters`` names without ``module.``
  wrappers, decoder layer indices made global across pipeline stages (Megatron numbers them per stage),
  and the local expert index removed, so that every expert of a layer (on every EP rank) is one
  parameter. The table is the union over all ranks, gathered once at attach.
* **Replicas** (``replicas``, off by default): each rank adds the squared norm of its gradient buffers
  where the DP reduction starts (``_ParamAndGradBucketGroup.start_grad_sync``, where Megatron's rerun
  machinery checks the same buffers), before Megatron scales and reduces them. The replica's slot (one
  float per DP x CP rank) rides in the event step's all-reduce (ZClip) or in AdaGC's per-tensor
  all-reduce: no extra collective. At 4,096 replicas that is 16 KB added to one all-reduce, on event
  steps only for ZClip. Expert gradients mix tokens of several replicas (all-to-all) and name none.
"""

from __future__ import annotations

import collections
import functools
import logging
import re
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..clipper import _host_group, host_list
from ..config import ForensicsConfig
from ..events import EventRecorder
from ..forensics import Event, event_scalars
from ..replicas import ReplicaMeter, replica_ranks
from ..topology import Topology, is_shared_copy
from .hook import write_scalars

__all__ = ["MegatronForensics", "HostRecorder", "logical_names", "expert_logical_name"]

logger = logging.getLogger("zclip_dist.megatron")

_LOCAL_EXPERT = re.compile(r"\.local_experts\.\d+\.")  # SequentialMLP: ...experts.local_experts.<i>.linear_fc1
_GROUPED_EXPERT = re.compile(r"(\.experts\.linear_fc[12]\.(?:weight|bias))\d+$")  # TEGroupedMLP: weight<i>
_LAYER = re.compile(r"(^|\.)layers\.(\d+)$")


def expert_logical_name(name: str) -> str:
    """``...mlp.experts.local_experts.3.linear_fc1.weight`` -> ``...mlp.experts.local_experts.linear_fc1.weight``;
    ``...mlp.experts.linear_fc1.weight3`` -> ``...mlp.experts.linear_fc1.weight``."""
    return _GROUPED_EXPERT.sub(r"\1", _LOCAL_EXPERT.sub(".local_experts.", name))


def _strip_module(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def logical_names(model: Any) -> dict[int, str]:
    """``id(parameter) -> logical name`` over the model chunks (a module or a list of them).

    Megatron numbers ``decoder.layers.<i>`` per pipeline stage and chunk; each layer knows its global
    ``layer_number`` (1-based), which replaces the local index so that names are unique model-wide.
    """
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    out: dict[int, str] = {}
    for chunk in chunks:
        renames = {}
        for name, module in chunk.named_modules():
            number = getattr(module, "layer_number", None)
            m = _LAYER.search(name)
            if m and isinstance(number, int):
                renames[name] = name[:m.start(2)] + str(number - 1)
        for name, p in chunk.named_parameters():
            for old, new in renames.items():
                if name.startswith(old + "."):
                    name = new + name[len(old):]
                    break
            out.setdefault(id(p), expert_logical_name(_strip_module(name)))
    return out


def _world_topology(dist_opt: bool) -> Topology:
    """Megatron's counting rule over every rank: TP duplicates on TP rank 0, DP replicas of a
    non-distributed optimizer on DP rank 0 (DP x CP), experts by their own groups, the tied copy never."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        return Topology.local()
    return Topology.from_groups(
        tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(with_context_parallel=True), dp_sharded=dist_opt,
        expert_tp_group=ps.get_expert_tensor_parallel_group(check_initialized=False),
        expert_dp_group=ps.get_expert_data_parallel_group(check_initialized=False), group=dist.group.WORLD)


def _gathered_names(local: Sequence[str]) -> list[str]:
    """The union of every rank's names, in the same order on every rank (once, at attach, host memory)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(dict.fromkeys(local))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, list(local), group=_host_group(dist.group.WORLD))
    return list(dict.fromkeys(n for names in everyone for n in names))


class HostRecorder(EventRecorder):
    """The recorder of ZClip on Megatron, where the host knows the decision: :meth:`record` (called by
    :meth:`Clipper.step <zclip_dist.clipper.Clipper.step>` every step) only keeps the decision's tensors,
    launching nothing; :meth:`write` writes the row on event steps, with the squares measured then."""

    _last: dict[str, Tensor] | None = None

    def record(self, **row: Any) -> None:
        self._last = row

    def write(self, squares: Tensor, replicas: Tensor | None) -> None:
        super().record(**{**self._last, "squares": squares, "replicas": replicas})


class MegatronForensics:
    """What the optimizer holds for forensics: the recorder, the replica meter, the event vector's layout.

    Args:
        config: the settings.
        method: ``"zclip"`` (host decision: :class:`HostRecorder` on the CPU, measured on event steps) or
            ``"adagc"`` (device recorder fed AdaGC's per-tensor vector every step).
        device: the gradients' device.
        dist_opt: the distributed optimizer shards the gradients over DP (every shard counts).
        model: the model chunks (names; replicas: their DDP bucket groups).
        mains: ZClip: ``[(main parameter, model parameter, uses decoupled_grad)]`` for every piece of the
            non-stub sub-optimizers on this rank.
        step_of: the clipper's current step count (read at writer time only), to place events at iterations;
            default :attr:`steps`, which the AdaGC adapter keeps.
        names: AdaGC: the names of its per-tensor vector's positions (then ``mains`` is unused).
        on_event: called with each :class:`~zclip_dist.forensics.Event` when this rank reads it.
    """

    def __init__(self, *, config: ForensicsConfig, method: str, device: torch.device, dist_opt: bool,
                 model: Any, step_of: Callable[[], int] | None = None,
                 mains: Sequence[tuple[Tensor, Tensor, bool]] = (),
                 names: Sequence[str] | None = None, on_event: Callable[[Event], None] | None = None) -> None:
        self.config, self.method, self.device, self.on_event = config, method, device, on_event
        self.steps = 0  # the clipper's step count kept on the host (AdaGC: set at load, +1 per decision)
        self.step_of = step_of or (lambda: self.steps)
        self.topology = _world_topology(dist_opt)
        if self.topology.group is not None:
            from ..clipper import verify_same_config

            verify_same_config(config)  # the settings size the event all-reduce: the same everywhere
        if names is None:  # ZClip: this rank's pieces, placed in a name table shared by every rank
            table = logical_names(model) if model is not None else {}
            fallback = "param."
            if not table:
                logger.warning("%s forensics: no model chunks given to wrap_optimizer: parameters are named by "
                               "position (param.<k>); pass model=<model chunks> to name them", method)
                if dist.is_initialized():  # positions agree across TP and DP ranks, not across stages
                    from megatron.core import parallel_state as ps

                    fallback = f"stage{ps.get_pipeline_model_parallel_rank()}.param."
            kept = [(m, owner, d) for m, owner, d in mains if not is_shared_copy(owner)]  # the tied copy: never
            self.mains = [m for m, _, _ in kept]
            self.decoupled = [d for _, _, d in kept]
            local = [table.get(id(owner), f"{fallback}{k}") for k, (_, owner, _) in enumerate(kept)]
            self.names = _gathered_names(local)
            slot = {n: i for i, n in enumerate(self.names)}
            self._index = torch.tensor([slot[n] for n in local], dtype=torch.long, device=device)
            counts = [1.0 if self.topology.counts(owner) else 0.0 for _, owner, _ in kept]
            self._weights = torch.tensor(counts, device=device)
            self.recorder: EventRecorder = HostRecorder(config, method=method, device="cpu", on_event=self._deliver)
            self.recorder.host_resident = True
        else:  # AdaGC: its own per-tensor vector, in its order
            self.names = list(names)
            self.recorder = EventRecorder(config, method=method, device=device, on_event=self._deliver)
        self.recorder.bind_names(self.names)
        self.meter: ReplicaMeter | None = None
        if config.replicas and self.topology.replica[1] > 1:
            self.meter = ReplicaMeter(self.topology, device)
            self.recorder.replica_ranks = replica_ranks(self.topology)
            self._meter_buckets(model)
        # Events not yet written to Megatron's TensorBoard / W&B writers (which live on one rank: bounded).
        self._for_writers: collections.deque = collections.deque(maxlen=config.capacity)

    # ---- replicas ---------------------------------------------------------------------------------
    def _meter_buckets(self, model: Any) -> None:
        """Measure each bucket group's gradients where its DP reduction starts (before Megatron scales them)."""
        chunks = list(model) if isinstance(model, (list, tuple)) else [model] if model is not None else []
        groups = [g for c in chunks for attr in ("bucket_groups", "expert_parallel_bucket_groups")
                  for g in getattr(c, attr, None) or ()]
        if not groups:
            from ..config import ConfigError

            raise ConfigError(f"--{self.method}-forensics-replicas needs the model chunks wrapped in megatron-core's "
                              "DistributedDataParallel (their bucket groups start the DP reduction); pass model= "
                              f"to wrap_optimizer, or turn it off with --no-{self.method}-forensics-replicas")
        for group in groups:
            if "start_grad_sync" in vars(group):
                continue  # already metered
            params = [p for b in group.buckets for p in b.params_list]
            group.start_grad_sync = functools.partial(self._metered_sync, group, type(group).start_grad_sync, params)
        self.meter.attached = "megatron"

    def _metered_sync(self, group: Any, original: Callable, params: list, *args: Any, **kwargs: Any) -> Any:
        # The stock method returns at once when the first batch's reduction is already dispatched.
        if self.meter is not None and not (getattr(group, "is_first_batch", False)
                                           and getattr(group, "grad_reduce_handle", None) is not None):
            self.meter.add_grads(params, [p.main_grad for p in params])
        return original(group, *args, **kwargs)

    def end_step(self) -> None:
        """Restart the replica accumulator (a step that read no norm, e.g. an fp16 overflow, included)."""
        if self.meter is not None:
            self.meter.local.zero_()

    # ---- measuring --------------------------------------------------------------------------------
    def local_squares(self) -> Tensor:
        """This rank's weighted squared norms of its main-gradient pieces, at their names' slots (fp32)."""
        sq = torch.zeros(len(self.names), dtype=torch.float32, device=self.device)
        grads = [getattr(p, "decoupled_grad", None) if d else p.grad for p, d in zip(self.mains, self.decoupled)]
        keep = [i for i, g in enumerate(grads) if g is not None]
        if keep:
            norms = torch._foreach_norm([grads[i] for i in keep], 2, dtype=torch.float32)
            ix = torch.tensor(keep, dtype=torch.long, device=self.device) if len(keep) < len(grads) else None
            index = self._index if ix is None else self._index[ix]
            weights = self._weights if ix is None else self._weights[ix]
            sq.index_add_(0, index, torch.stack([n.to(self.device) for n in norms]).square_().mul_(weights))
        return sq

    def with_slots(self, vector: Tensor) -> Tensor:
        """``vector`` with this rank's replica slots appended (nothing without replica attribution)."""
        slots = self.meter.slots() if self.meter is not None else None
        return vector if slots is None else torch.cat([vector, slots.to(vector.dtype)])

    def split(self, vector: Tensor) -> tuple[Tensor, Tensor | None]:
        n = len(self.names)
        return vector[:n], (vector[n:] if vector.numel() > n else None)

    def measure(self) -> tuple[Tensor, Tensor | None]:
        """Event step (ZClip): every logical parameter's and every replica's squared norm, identical on every
        rank: one all-reduce over WORLD, read to the host with the decision."""
        vector = self.topology.all_reduce_sum(self.with_slots(self.local_squares()))
        return self.split(vector.cpu())

    # ---- ZClip: the host decides ------------------------------------------------------------------
    def after_zclip_step(self, clipper: Any) -> bool:
        """After :meth:`Clipper.step`: write and read the event when this step is one; write the JSON line
        (every ``log_interval`` steps and every event step). Returns whether the step was an event."""
        d = clipper.last
        flags = host_list(torch.stack([d.clipped, d.spike, d.nonfinite]))  # CPU-resident: no device sync
        event = any(f and k in self.config.events for f, k in zip(flags, ("clipped", "spike", "nonfinite")))
        if event:
            self.recorder.write(*self.measure())
            self.recorder.read()
        else:
            self.end_step()
        config = clipper.config
        if config.log_jsonl is not None:
            clipper._logged_calls += 1
            due = event or clipper._logged_calls % config.log_interval == 0
            if due and (not dist.is_initialized() or dist.get_rank() == 0):  # the line is rank 0's
                clipper.write_jsonl(clipper._logged_calls, clipper.metrics())
        return event

    # ---- delivery ---------------------------------------------------------------------------------
    def _deliver(self, event: Event) -> None:
        self._for_writers.append(event)
        if self.on_event is not None:
            self.on_event(event)

    def read(self) -> list[Event]:
        """Events recorded since the last read (AdaGC: one host transfer); each reaches ``on_event`` once."""
        return self.recorder.read()

    def write_to(self, iteration: int, writer: Any = None, wandb_writer: Any = None) -> list[Event]:
        """Write the events not yet written to Megatron's writers as ``<method>/event/...`` scalars, each at
        its own iteration (``iteration`` is that of the step just taken)."""
        if self.method != "zclip":
            self.read()
        events = list(self._for_writers)
        self._for_writers.clear()
        now = self.step_of() if events else 0
        for e in events:
            # One optimizer step per iteration: the event's iteration is as far back as its step.
            write_scalars(event_scalars(e, f"{self.method}/event/"), iteration - (now - e.step), writer, wandb_writer)
        return events
