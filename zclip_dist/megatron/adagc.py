"""Megatron-core adapter for AdaGC: per-tensor clipping on the norm of each *whole* tensor.

Attached like ZClip (:mod:`zclip_dist.megatron.hook`: same class swap; :mod:`~zclip_dist.megatron.intercept`:
the release's own ``step()`` runs, AdaGC decides on the norm it reads and replaces its clip call); what
differs is the clip:

* **Units.** One gamma per model parameter of this pipeline stage (all model chunks), keyed by its
  name. Each sub-optimizer's parameters are *main* parameters: the model parameters themselves
  (FP32Optimizer), fp32 copies (Float16OptimizerWithFloat16Params) or fp32 DP shards
  (DistributedOptimizer); :func:`_main_to_model` maps each back to its model parameter through the
  optimizer's own ``model_*_groups`` / ``shard_*_groups`` (megatron-core 0.16.1 ``distrib_optimizer.py``
  ``_build_model_and_main_param_groups``, ``optimizer.py`` ``Float16OptimizerWithFloat16Params.__init__``).
* **Whole-tensor norms.** This rank's squared norms of its main gradients (one ``_foreach_norm``) are
  placed at their model parameter's position in a vector over all units of the stage, weighted so that
  each element of a tensor counts once (TP-duplicated tensors on TP rank 0 only; DP replicas on DP rank
  0 only; DistributedOptimizer shards everywhere, they are disjoint), and summed with **one** all-reduce
  over the stage's TP x DP(x CP) group. Every rank of the stage then holds every whole tensor's squared
  norm, bitwise the same. Pipeline stages own disjoint tensors; the tied output embedding on the last
  stage has its own unit, whose gradient Megatron has already made equal to the first stage's
  embedding gradient, so both copies are clipped alike.
* **Decision.** :class:`~zclip_dist.clipper.AdaGCClipper` on the training device, fed the vector and
  Megatron's own global norm (as a device scalar made by ``torch.full``: no copy, no sync); exactly once
  per step. Gamma and the coefficients stay on the device: no host read beyond Megatron's own.
* **Clip.** The coefficients are applied with ``torch._foreach_mul_`` to exactly the gradients stock
  Megatron would clip (every parameter of every non-stub sub-optimizer), in place of its first
  ``clip_grad_by_total_norm_fp32`` call of the step (the later ones, one per sub-optimizer, find them done). AdaGC multiplies every step (a coefficient of 1 included): deciding
  whether to multiply would be a host read.
* **Non-finite.** A non-finite Megatron norm returns ``(False, norm, None)`` on every rank (Megatron-LM
  skips the update and counts a skipped iteration); the clipper records it and gamma does not move.
  Known edge: a NaN only in a copy Megatron's norm leaves out (a TP-duplicated tensor on TP rank > 0)
  keeps Megatron's norm finite; the vector sees it (``0 * NaN``), so gamma still does not move and every
  coefficient is 0 (``skip``), but the update runs: telling Megatron to skip would take a host read.
* **Checkpoints.** ``state_dict`` carries the state (gamma by name) under ``"adagc"``;
  ``sharded_state_dict`` carries it as a ``ShardedObject`` with one shard per pipeline stage (each stage
  holds other tensors), written by TP/DP rank 0 of the stage. ``load_state_dict`` removes it before
  Megatron sees the dict. The state survives a change of DP size (names, not positions).
* **Refused** by name rather than clipped wrongly: expert (MoE) sub-optimizers, Megatron-FSDP, the
  layer-wise (Muon) optimizer, several distributed-optimizer instances, parameters with a separate
  gradient-norm group (megatron-core 0.19's detached multi-token-prediction heads).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..clipper import AdaGCClipper
from ..config import AdaGCConfig
from ..topology import Topology
from .hook import (_is_expert, attach_forensics, pop_entries, prepare, register, sub_optimizers, uses_decoupled_grad,
                   with_entry)

__all__ = ["attach", "UnsupportedConfiguration", "STATE_KEY", "LOG_METRICS", "SHARDED_KEY"]

logger = logging.getLogger("zclip_dist.megatron")

#: Key of the AdaGC entry in the optimizer's (sharded) state dict.
STATE_KEY = "adagc"
#: ``ShardedObject`` key of the AdaGC state in ``torch_dist`` checkpoints (one shard per pipeline stage).
SHARDED_KEY = "zclip_dist.adagc_state"
#: Metrics written to Megatron's TensorBoard / W&B writers, as ``adagc/<name>``.
LOG_METRICS = ("grad_norm", "num_clipped_tensors", "min_coef", "warmup", "skipped", "nonfinite")


class UnsupportedConfiguration(ValueError):
    """AdaGC cannot be applied correctly to this Megatron optimizer; the message says why."""


# ---- which model parameter each main parameter belongs to -----------------------------------------
def _is_distributed(sub: Any) -> bool:
    return hasattr(sub, "shard_fp32_groups")


def _main_to_model(sub: Any) -> dict[int, Tensor]:
    """``id(main parameter) -> model parameter`` for every parameter ``sub`` steps (read once, at attach)."""
    if getattr(sub, "is_stub_optimizer", False):
        return {}
    pairs: list[tuple[Sequence, Sequence]] = []
    if _is_distributed(sub):  # fp32 DP shards: model_*_groups[g][k] <-> shard_*_groups[g][k]
        shards16 = sub.shard_float16_groups if uses_decoupled_grad(sub) else sub.shard_fp32_from_float16_groups
        pairs = [*zip(sub.model_float16_groups, shards16), *zip(sub.model_fp32_groups, sub.shard_fp32_groups)]
    elif hasattr(sub, "fp32_from_float16_groups"):  # Float16OptimizerWithFloat16Params: fp32 copies
        pairs = [*zip(sub.float16_groups, sub.fp32_from_float16_groups),
                 *zip(sub.fp32_from_fp32_groups, sub.fp32_from_fp32_groups)]
    else:  # FP32Optimizer: the model parameters themselves
        params = sub.get_parameters()
        pairs = [(params, params)]
    mapping = {id(main): model for models, mains in pairs for model, main in zip(models, mains)}
    unmapped = [p for p in sub.get_parameters() if id(p) not in mapping]
    if unmapped:
        raise UnsupportedConfiguration(f"adagc: {len(unmapped)} parameter(s) of {type(sub).__name__} have no model "
                                       "parameter in its groups; this optimizer layout is not supported")
    return mapping


def _stage_params(sub: Any, mapping: dict[int, Tensor]) -> list[Tensor]:
    """Every model parameter ``sub`` covers on *any* rank of the stage, in an order all those ranks share.

    A DistributedOptimizer rank steps shards of some parameters only; its grad buffers list all of them.
    """
    if _is_distributed(sub):
        return [p for buffer in sub.buffers for p in buffer.params]
    return list(mapping.values())


def _grad(param: Tensor, decoupled: bool) -> Tensor | None:
    return getattr(param, "decoupled_grad", None) if decoupled else param.grad


# ---- names ----------------------------------------------------------------------------------------
def _strip_wrappers(name: str) -> str:
    """DDP / Float16Module wrap the model as ``module.``: the name without those prefixes."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _names(model: Any) -> dict[int, str]:
    """``id(parameter) -> name`` over the model chunks (a module or a list of them); several chunks
    (virtual pipeline) are prefixed ``chunk<i>.``."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    out = {}
    for i, chunk in enumerate(chunks):
        prefix = f"chunk{i}." if len(chunks) > 1 else ""
        for name, p in chunk.named_parameters():
            out.setdefault(id(p), prefix + _strip_wrappers(name))
    return out


def _model_chunks(optimizer: Any, model: Any) -> Any:
    if model is not None:
        return model
    chunks = getattr(optimizer, "model_chunks", None)  # DistributedOptimizer and ChainedOptimizer keep them
    return chunks or None


# ---- the per-tensor vector ------------------------------------------------------------------------
class _PerTensor:
    """Whole-tensor squared norms of every unit of this stage, and the clip onto the main gradients.

    Built once at attach: ``units`` (model parameters, the order of the clipper's vector), and per
    sub-optimizer the main parameters with their unit index and count weight.
    """

    def __init__(self, subs: list[Any], names: dict[int, str], device: torch.device) -> None:
        self.device = device
        mappings = [_main_to_model(sub) for sub in subs]
        units: list[Tensor] = []
        seen: set[int] = set()
        for sub, mapping in zip(subs, mappings):
            for p in _stage_params(sub, mapping):
                if id(p) not in seen:
                    seen.add(id(p))
                    units.append(p)
        if names:  # the model's order: the same on every rank of the stage by construction
            order = {pid: k for k, pid in enumerate(names)}
            units.sort(key=lambda p: order.get(id(p), len(order)))
        self.names = [names.get(id(p), f"param.{k}") for k, p in enumerate(units)]
        position = {id(p): k for k, p in enumerate(units)}
        self.topology = _stage_topology(any(_is_distributed(s) for s in subs))
        self.mains: list[Tensor] = []  # main parameters whose gradients are measured and clipped
        self.owners: list[Tensor] = []  # the model parameter of each main parameter
        self.decoupled: list[bool] = []
        index, weights = [], []
        for sub, mapping in zip(subs, mappings):
            for main in sub.get_parameters() if mapping else []:
                model = mapping[id(main)]
                self.mains.append(main)
                self.owners.append(model)
                self.decoupled.append(uses_decoupled_grad(sub))
                index.append(position[id(model)])
                # Judged on the model parameter: TP attributes are copied onto mains and shards, but
                # the model parameter is the one Megatron's layers set them on.
                weights.append(1.0 if self.topology.counts_in_tensor_group(model) else 0.0)
        self.n = len(units)
        self.index = torch.tensor(index, dtype=torch.long, device=device)
        self.weights = torch.tensor(weights, dtype=torch.float32, device=device)
        self._key: tuple | None = None
        self._plan: list[tuple[list[int], Tensor, Tensor]] = []

    def grads(self) -> list[Tensor]:
        """This step's main gradients (``prepare_grads`` has just set them: new tensors every step)."""
        grads = [_grad(p, d) for p, d in zip(self.mains, self.decoupled)]
        if any(g is None for g in grads):
            missing = sum(g is None for g in grads)
            raise RuntimeError(f"adagc: {missing} main parameter(s) have no gradient after prepare_grads")
        return grads

    def _groups(self, grads: list[Tensor]) -> list[tuple[list[int], Tensor, Tensor]]:
        """Per (device, dtype) of the gradients: their indices, units and weights (device tensors).

        Built on the first step and whenever the dtypes change, never on the steady path: making index
        tensors on an accelerator is a host-to-device copy.
        """
        key = tuple((g.device, g.dtype) for g in grads)
        if key != self._key:
            by_kind: dict[tuple, list[int]] = {}
            for i, kind in enumerate(key):
                by_kind.setdefault(kind, []).append(i)
            self._plan = [(ix, self.index[ix_t], self.weights[ix_t])
                          for ix in by_kind.values()
                          for ix_t in [torch.tensor(ix, dtype=torch.long, device=self.device)]]
            self._key = key
        return self._plan

    def local_squares(self, grads: list[Tensor]) -> Tensor:
        """Squared norms of this rank's pieces, weighted, at their units' positions (fp32, no sync).

        A non-counting copy contributes ``0 * its square``: zero when finite, NaN when not.
        """
        sq = torch.zeros(self.n, dtype=torch.float32, device=self.device)
        for ix, units, weights in self._groups(grads):
            norms = torch.stack(torch._foreach_norm([grads[i] for i in ix], 2, dtype=torch.float32))
            sq.index_add_(0, units, norms.to(self.device).square_().mul_(weights))
        return sq

    def whole_tensor_squares(self, grads: list[Tensor]) -> Tensor:
        """Every whole tensor's squared norm, bitwise identical on every rank of the stage.

        One all-reduce (SUM) of the per-unit vector over the stage's TP x DP(x CP) group: TP shards of
        a tensor sit on the TP ranks, DistributedOptimizer shards on the DP ranks, at the same vector
        position everywhere; duplicates were weighted to count once. DP replicas of a non-distributed
        optimizer join too (with weight 0) so that every replica gets the same bits by construction.
        """
        return self.topology.all_reduce_tensor_sum(self.local_squares(grads))

    def apply(self, grads: list[Tensor], coefs: Tensor) -> None:
        """Multiply each main gradient by its tensor's coefficient: one ``_foreach_mul_`` per dtype."""
        for ix, units, _ in self._groups(grads):
            group = [grads[i] for i in ix]
            factors = coefs.index_select(0, units).to(device=group[0].device, dtype=group[0].dtype)
            torch._foreach_mul_(group, list(factors.unbind()))


def _stage_topology(dist_opt: bool) -> Topology:
    """Counting rule and reduction group of the per-tensor vector: TP duplicates count on TP rank 0; DP
    replicas on DP rank 0 unless the distributed optimizer shards them; the group is TP x DP x CP of this
    pipeline stage (megatron ``tensor_and_data_parallel_group`` with context parallelism)."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        return Topology.local()
    tp = ps.get_tensor_model_parallel_group()
    dp = ps.get_data_parallel_group(with_context_parallel=True)
    stage = ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
    return Topology.from_groups(tp_group=tp, dp_group=dp, dp_sharded=dist_opt, group=stage)


def _refuse_unsupported(optimizer: Any, subs: list[Any]) -> None:
    from megatron.core import parallel_state as ps

    name = type(optimizer).__name__
    if "LayerWise" in name:
        raise UnsupportedConfiguration("adagc: the layer-wise (Muon) optimizer is not supported yet")
    for sub in subs:
        if _is_expert(sub):
            raise UnsupportedConfiguration("adagc: expert (MoE) parameters are not supported yet: their per-tensor "
                                           "norms need the expert TP x DP group and names per expert rank")
        params = sub.get_parameters() if hasattr(sub, "get_parameters") else []
        if any(getattr(p, "grad_norm_group", None) is not None for p in params):
            raise UnsupportedConfiguration("adagc: parameters with a separate gradient-norm group (megatron-core "
                                           "0.19 multi-token-prediction heads with mtp_detach_heads) are not "
                                           "supported yet")
        ddp_config = getattr(sub, "ddp_config", None)
        if getattr(ddp_config, "use_megatron_fsdp", False):
            raise UnsupportedConfiguration("adagc: Megatron-FSDP is not supported yet")
        if _is_distributed(sub) and not getattr(sub, "is_stub_optimizer", False):
            dp = ps.get_data_parallel_group(with_context_parallel=True)
            if dist.get_world_size(sub.data_parallel_group) != dist.get_world_size(dp):
                raise UnsupportedConfiguration("adagc: several distributed-optimizer instances "
                                               "(--num-distributed-optimizer-instances > 1) are not supported yet")


# ---- the hook -------------------------------------------------------------------------------------
class _AdaGCOverrides:
    """Methods copied into the optimizer's one-level subclass (see ``megatron._Overrides``)."""

    adagc: AdaGCClipper
    _adagc_tensors: _PerTensor
    _zclip_config: AdaGCConfig
    _zclip_base: type
    _adagc_pending: tuple[list[Tensor], Tensor] | None  # this step's (gradients, coefficients) until clipped
    _zclip_forensics: Any  # MegatronForensics or None

    def _zclip_decide(self, norm: float, finite: bool) -> None:
        """Every whole tensor's norm (one all-reduce over the stage) and Megatron's global norm: gamma and
        the coefficients, exactly once per step."""
        tensors = self._adagc_tensors
        grads = tensors.grads()
        # Megatron's norm as a device scalar: a fill kernel, no copy and no sync.
        global_norm = torch.full((), norm, dtype=torch.float32, device=tensors.device)
        fx = self._zclip_forensics
        if fx is None:
            decision = self.adagc.step(tensors.whole_tensor_squares(grads), global_norm)
        else:  # the replicas' slots ride in the same all-reduce; the per-tensor vector is the forensics one
            fx.steps += 1
            vector = fx.with_slots(tensors.local_squares(grads))
            squares, replicas = fx.split(tensors.topology.all_reduce_tensor_sum(vector))
            decision = self.adagc.step(squares, global_norm, squares=squares, replicas=replicas)
        self._adagc_pending = (grads, decision.coefs) if finite else None

    def _zclip_clip(self, params: list, total_norm: float, use_decoupled_grad: bool, stock_clip: Callable) -> None:
        """The per-tensor coefficients on every main gradient, at the step's first clip call."""
        if self._adagc_pending is not None:
            grads, coefs = self._adagc_pending
            self._adagc_pending = None
            self._adagc_tensors.apply(grads, coefs)

    def state_dict(self, *args, **kwargs):
        return with_entry(self._zclip_base.state_dict(self, *args, **kwargs), STATE_KEY, self.adagc.state_dict())

    def sharded_state_dict(self, *args, **kwargs):
        return with_entry(self._zclip_base.sharded_state_dict(self, *args, **kwargs), STATE_KEY,
                          _sharded_state(self.adagc))

    def load_state_dict(self, state_dict, *args, **kwargs):
        state_dict, saved = pop_entries(state_dict, STATE_KEY, "AdaGC")
        if saved is not None:
            saved = getattr(saved, "data", saved)  # a loaded ShardedObject or the dict
            self.adagc.load_state_dict(saved)
            if self._zclip_forensics is not None and saved:  # the clipper's step count, known on the host
                self._zclip_forensics.steps = int(saved["count"]) + int(saved["num_nonfinite"])
        return self._zclip_base.load_state_dict(self, state_dict, *args, **kwargs)


def _sharded_state(clipper: AdaGCClipper) -> Any:
    """The state as one ``ShardedObject`` shard per pipeline stage (the stages hold different tensors);
    TP/DP rank 0 of the stage writes it (replica id 0), the others hold replicas of the same bits."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        SHARDED_KEY, clipper.state_dict(),
        global_shape=(ps.get_pipeline_model_parallel_world_size(),),
        global_offset=(ps.get_pipeline_model_parallel_rank(),),
        replica_id=(ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(with_context_parallel=True)))


def attach(optimizer: Any, config: AdaGCConfig, model: Any = None, forensics: Any = None,
           on_event: Callable[[Any], None] | None = None) -> Any:
    """Attach AdaGC to what ``get_megatron_optimizer`` returned, in place; returns the same object.

    ``model``: the model chunks (a module or a list), whose parameter names key gamma in checkpoints.
    Without it the DistributedOptimizer's own ``model_chunks`` are used; failing that, names are
    positions (``param.<k>``), which resume only into the same model, and a warning says so.
    """
    subs = sub_optimizers(optimizer)
    _refuse_unsupported(optimizer, subs)
    prepare(optimizer, config, "adagc", _AdaGCOverrides)
    chunks = _model_chunks(optimizer, model)
    names = _names(chunks) if chunks is not None else {}
    tensors = _PerTensor([s for s in subs if not getattr(s, "is_stub_optimizer", False)], names,
                         optimizer._zclip_device)
    if not names:
        logger.warning("adagc: no model given to wrap_optimizer: gamma is keyed by position (param.<k>); "
                       "pass model=<model chunks> to key it by parameter name")
    optimizer._adagc_tensors = tensors
    optimizer._adagc_pending = None
    # "raise" is enforced in intercept on the host float; the clipper itself would read its flag every step.
    inner = config.replace(nonfinite="skip") if config.nonfinite == "raise" else config
    optimizer.adagc = AdaGCClipper(inner)
    optimizer.adagc.bind(tensors.names, tensors.device)
    type(optimizer)._zclip_log_metrics = LOG_METRICS
    register(optimizer)
    # Forensics names are AdaGC's units (this pipeline stage's tensors, in its vector's order).
    attach_forensics(optimizer, optimizer.adagc, "adagc", forensics, model, on_event, names=tensors.names)
    return optimizer
