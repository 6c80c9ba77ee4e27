"""Tiny real megatron-core models and optimizers for the multi-rank Megatron tests, plus the analytic oracle.

Everything here runs inside a spawned gloo rank after ``megatron_cpu_shim.apply()``.

Analytic oracle (docs/internals/megatron.md): for every parameter of the *full* model a gradient
``G(global_name, step)`` is drawn from a generator seeded by the name and the step; each rank writes its
own slice of it into ``main_grad`` (TP shards sliced along ``partition_dim``, replicas get the whole
tensor, the tied output copy gets the word-embedding gradient). Ranks report ``global_name -> full
shape`` and the parent computes ``sqrt(sum ||G||^2)`` over *unique* names in one process, knowing
nothing about Megatron's de-duplication rules.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

import torch

VOCAB, SEQ, HIDDEN, HEADS = 32, 8, 16, 2


@dataclass(frozen=True)
class Layout:
    name: str
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    dist_opt: bool = False
    experts: int = 0
    tied: bool = False
    bf16: bool = False
    bias: bool = False  # biases: replicated row-parallel expert biases expose PR #5916
    mtp: bool = False  # megatron-core >= 0.19: one multi-token-prediction layer with its own norm and clip
    bare: bool = False  # attach to the one sub-optimizer itself (what the Megatron-FSDP path returns)


def build(layout: Layout, *, seed: int = 1234, clip_grad: float = 1.0, lr: float = 1e-3):
    """Initialise the layout's groups and return ``(ddp_model, optimizer)`` from ``get_megatron_optimizer``."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp if layout.etp is not None else layout.tp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    dtype = torch.bfloat16 if layout.bf16 else torch.float32
    extra_cfg: dict = {}
    if layout.experts:
        extra_cfg = dict(num_moe_experts=layout.experts, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
                         moe_aux_loss_coeff=0.0)
    if layout.mtp:  # detached heads: megatron-core tags the MTP parameters grad_norm_group="mtp"
        extra_cfg.update(mtp_num_layers=1, mtp_detach_heads=True)
    cfg = TransformerConfig(
        num_layers=2 * layout.pp, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=2 * HIDDEN,
        use_cpu_initialization=True, pipeline_dtype=dtype, params_dtype=dtype, bf16=layout.bf16,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp if layout.etp is not None else layout.tp,
        hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=layout.bias, gradient_accumulation_fusion=False,
        **extra_cfg)
    spec = get_gpt_layer_local_spec(num_experts=layout.experts or None)
    extra = {}
    if layout.mtp:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        extra["mtp_block_spec"] = get_gpt_mtp_block_spec(cfg, spec, use_transformer_engine=False)
    model = GPTModel(cfg, spec, vocab_size=VOCAB, max_sequence_length=SEQ, pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(), share_embeddings_and_output_weights=layout.tied,
                     **extra)
    ddp = DistributedDataParallel(
        cfg, DistributedDataParallelConfig(use_distributed_optimizer=layout.dist_opt, grad_reduce_in_fp32=True),
        model)
    opt_cfg = OptimizerConfig(optimizer="adam", lr=lr, bf16=layout.bf16, params_dtype=dtype,
                              use_distributed_optimizer=layout.dist_opt, clip_grad=clip_grad)
    return ddp, get_megatron_optimizer(opt_cfg, [ddp])


def _global_name(name: str, param, layout: Layout) -> str:
    from megatron.core import parallel_state as ps

    if getattr(param, "shared", False) and name.endswith("output_layer.weight"):
        return "embedding.word_embeddings.weight"  # the tied copy on the last stage: same full gradient
    layers_per_stage = 2
    name = re.sub(r"layers\.(\d+)\.",
                  lambda m: f"layers.{int(m.group(1)) + ps.get_pipeline_model_parallel_rank() * layers_per_stage}.",
                  name)
    if layout.experts:
        local = layout.experts // layout.ep
        offset = ps.get_expert_model_parallel_rank() * local
        name = re.sub(r"local_experts\.(\d+)\.", lambda m: f"local_experts.{int(m.group(1)) + offset}.", name)
    return name


def _tp_split(param) -> tuple[int, int, int | None]:
    """(size, rank, dim) of the tensor-parallel split this parameter is a shard of (dim None: replicated)."""
    from megatron.core import parallel_state as ps

    expert = getattr(param, "allreduce", True) is False
    if expert:
        size, rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    else:
        size, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if getattr(param, "tensor_model_parallel", False) and size > 1:
        return size, rank, param.partition_dim
    return 1, 0, None


def full_gradient(global_name: str, shape: tuple[int, ...], step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(global_name.encode()) * 7919 + step)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


class AnalyticGrads:
    """Writes ``G(global_name, step)`` slices into ``main_grad``; knows each parameter's full shape."""

    def __init__(self, ddp, layout: Layout) -> None:
        self.entries = []
        for name, p in ddp.module.named_parameters():
            size, rank, dim = _tp_split(p)
            shape = list(p.shape)
            if dim is not None:
                shape[dim] *= size
            self.entries.append((p, _global_name(name, p, layout), tuple(shape), size, rank, dim))

    def shapes(self, group: str | None = None) -> dict[str, tuple[int, ...]]:
        """Full shapes of the parameters in gradient-norm ``group`` (None: the main norm's)."""
        return {g: s for p, g, s, *_ in self.entries if getattr(p, "grad_norm_group", None) == group}

    def group_grads(self, group: str) -> list:
        """This rank's ``main_grad`` of the parameters in ``group`` (e.g. megatron-core 0.19's ``"mtp"``)."""
        return [p.main_grad for p, *_ in self.entries if getattr(p, "grad_norm_group", None) == group]

    def write(self, step: int, scale: float = 1.0) -> None:
        for p, gname, shape, size, rank, dim in self.entries:
            full = full_gradient(gname, shape, step) * scale
            local = full if dim is None else full.chunk(size, dim=dim)[rank]
            p.main_grad.copy_(local.to(p.main_grad.dtype))


def oracle_norm(shapes: dict[str, tuple[int, ...]], step: int, scale: float = 1.0) -> float:
    """Norm of the full model's gradient, every parameter once: the single-process reference."""
    return math.sqrt(sum(float((full_gradient(n, s, step) * scale).square().sum()) for n, s in shapes.items()))


def merged_shapes(per_rank: list[dict[str, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for shapes in per_rank:
        for name, shape in shapes.items():
            assert out.setdefault(name, shape) == shape, f"{name}: ranks disagree on the full shape"
    return out


class SyncCounter:
    """Counts host reads of tensor values while active (tests/sync_guard.py's instrumentation)."""

    def __enter__(self):
        from tests.sync_guard import count_host_reads

        self._ctx = count_host_reads()
        self._counts = self._ctx.__enter__()
        return self

    @property
    def count(self) -> int:
        return sum(self._counts.values())

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# ---- checkpoints (as Megatron-LM's checkpointing.py writes and reads them) ----------------------
def save_checkpoint(fmt: str, path: str, ddp, opt) -> None:
    """As Megatron-LM's checkpointing.py: torch_dist through ``sharded_state_dict``, legacy torch per rank."""
    import torch
    from megatron.core import dist_checkpointing

    if fmt == "torch_dist":
        sd = {"model": ddp.module.sharded_state_dict()}
        sd["optimizer"] = opt.sharded_state_dict(sd, metadata=_metadata())
        dist_checkpointing.save(sd, path)
    else:
        torch.save({"model": ddp.module.state_dict(), "optimizer": opt.state_dict()}, f"{path}/rank{_rank()}.pt")


def load_checkpoint(fmt: str, path: str, ddp, opt) -> None:
    """Load what :func:`save_checkpoint` wrote into a freshly built model and optimizer."""
    import torch
    from megatron.core import dist_checkpointing

    if fmt == "torch_dist":
        # megatron-core's torch.optim fallback (no Apex/TE) reads Adam's "step" from the optimizer state
        # while building the template; give the fresh optimizer that state, as a first step would.
        for sub in opt.chained_optimizers:
            sub.init_state_fn(sub.optimizer, sub.config)
            for state in sub.optimizer.state.values():
                state.setdefault("step", torch.zeros(()))
        template = {"model": ddp.module.sharded_state_dict()}
        template["optimizer"] = opt.sharded_state_dict(template, is_loading=True, metadata=_metadata())
        sd = dist_checkpointing.load(template, path)
    else:
        sd = torch.load(f"{path}/rank{_rank()}.pt", weights_only=False)
    ddp.module.load_state_dict(sd["model"])
    with torch.no_grad():  # fp32 DistOpt copies into views of the model's leaf parameters
        opt.load_state_dict(sd["optimizer"])


def _metadata() -> dict:
    from megatron.core import parallel_state as ps

    return {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True, "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()
