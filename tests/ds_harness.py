"""DeepSpeed test harness: tiny models, deterministic data, engines run inside spawned gloo ranks, and the
single-process oracle (full model, reference ``zclip`` statistics fed the true full-model norm).

Every model is the same function, ``mlp``: ``y = l2(tanh(l1(x)))`` (4 -> 8 -> 4), or for the pipeline
``tied(l2(tanh(l1(tied(x)))))`` with one 4x4 weight used twice; the TP model is ``mlp`` split
column/row-parallel. Ranks return full fp32 master weights by global name after every step; the oracle
recomputes each step's full gradient at the engine's own weights and clips it with the reference package.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BATCH = 4
SPIKE = 30.0


@dataclass
class Case:
    """One engine configuration of the matrix."""

    name: str
    ds: dict[str, Any]  # DeepSpeed config entries besides batch sizes
    kind: str = "mlp"  # "mlp" | "pipe" | "tp"
    dp: int = 2
    gas: int = 1
    steps: int = 6
    spike_step: int | None = 4  # 0-based optimizer step whose batch on the last DP rank is scaled by SPIKE
    zclip: dict[str, Any] | None = field(default_factory=lambda: {"alpha": 0.9, "z_thresh": 2.5, "warmup_steps": 3})
    gradient_clipping: float = 50.0
    bf16: bool = False
    nan_step: int | None = None  # step whose batch on the last DP rank gets a NaN
    ckpt_dir: str | None = None  # with save_at: save there after that many steps, or (resume) load and go on
    save_at: int | None = None
    resume: bool = False
    fp16: dict[str, Any] | None = None  # the "fp16" section: fp16 weights, DeepSpeed's loss scaler
    fused: bool = False  # a FusedAdam-typed SGD: fp16 ZeRO-0 builds FP16_Optimizer instead of FP16_Unfused
    experts: int = 0  # kind="moe": experts in total, over an expert-parallel group of ep_size ranks
    ep_size: int = 2
    entry: str = "zclip_dist"  # or "deepspeed": plain deepspeed.initialize (zclip_dist's import hook)
    attach_after_load: bool = False  # with resume: a plain engine loads, then attach(engine, case.zclip)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.fp16 is not None else torch.bfloat16 if self.bf16 else torch.float32


# ---- data --------------------------------------------------------------------------------------------
def batch(case: Case, step: int, dp_rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * dp_rank + micro)
    x = torch.randn(BATCH, 4, generator=g)
    y = torch.randn(BATCH, 4, generator=g)
    if step == case.spike_step and dp_rank == case.dp - 1:
        x, y = x * SPIKE, y * SPIKE
    if step == case.nan_step and dp_rank == case.dp - 1:
        x[0, 0] = float("nan")
    return x, y


# ---- models ---------------------------------------------------------------------------------------
def mlp(hidden: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 4))


def mlp_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return F.linear(torch.tanh(F.linear(x, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"])


def moe_forward(p: dict[str, torch.Tensor], x: torch.Tensor, experts: int) -> torch.Tensor:
    """``MoEMLP`` with every expert in one process: top-1 gate, softmax weight, no token dropped."""
    h = torch.tanh(F.linear(x, p["inp.weight"], p["inp.bias"]))
    gates = torch.softmax(F.linear(h, p["gate.weight"]), dim=1)
    chosen = gates.argmax(dim=1)
    outs = torch.stack([F.linear(h, p[f"experts.{e}.weight"], p[f"experts.{e}.bias"]) for e in range(experts)], 1)
    picked = outs[torch.arange(h.shape[0]), chosen] * gates.gather(1, chosen[:, None])
    return F.linear(picked, p["out.weight"], p["out.bias"])


class MoEMLP(nn.Module):
    """4 -> 8, a DeepSpeed MoE layer (top-1, ``experts`` Linear(8, 8) experts over ``ep_size`` ranks,
    capacity never binding, no random token selection), 8 -> 4. Each expert's initial weights depend on
    its global index only, so the oracle can rebuild them."""

    GLOBAL_NAMES = {"inp": "inp", "moe.deepspeed_moe.gate.wg": "gate", "out": "out"}

    def __init__(self, experts: int, ep_size: int) -> None:
        from deepspeed.moe.layer import MoE

        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = nn.Linear(4, 8), nn.Linear(8, 4)
        self.moe = MoE(hidden_size=8, expert=nn.Linear(8, 8), num_experts=experts, ep_size=ep_size, k=1,
                       min_capacity=BATCH, use_rts=False, drop_tokens=True)
        self.first = torch.distributed.get_rank() % ep_size * (experts // ep_size)  # DeepSpeed's EP layout
        for i, expert in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
            g = torch.Generator().manual_seed(100 + self.first + i)
            with torch.no_grad():
                expert.weight.copy_(torch.randn(8, 8, generator=g) * 0.5)
                expert.bias.copy_(torch.randn(8, generator=g) * 0.1)
        with torch.no_grad():
            self.moe.deepspeed_moe.gate.wg.weight.mul_(4.0)  # decisive routing: the oracle picks the same expert

    def forward(self, x):
        h, _, _ = self.moe(torch.tanh(self.inp(x)))
        return self.out(h)

    def global_name(self, name: str) -> str:
        prefix, _, leaf = name.removeprefix("module.").rpartition(".")
        if ".deepspeed_experts." in prefix:
            return f"experts.{self.first + int(prefix.rpartition('.')[2])}.{leaf}"
        return f"{self.GLOBAL_NAMES[prefix]}.{leaf}"


def fused_sgd(params, lr: float):
    """SGD typed as DeepSpeed's FusedAdam (no op is built): fp16 ZeRO-0 then builds FP16_Optimizer."""
    from deepspeed.ops.adam import FusedAdam

    class FusedSGD(FusedAdam):
        def __init__(self, params, lr):
            torch.optim.Optimizer.__init__(self, params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])

    return FusedSGD(params, lr)


def pipe_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    t = p["tied_modules.t.weight"]
    h = torch.tanh(F.linear(F.linear(x, t), p["1.weight"], p["1.bias"]))
    return F.linear(F.linear(h, p["3.weight"], p["3.bias"]), t)


def pipe_module(case: Case):
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    torch.manual_seed(0)
    layers = [TiedLayerSpec("t", nn.Linear, 4, 4, bias=False), LayerSpec(nn.Linear, 4, 8), LayerSpec(nn.Tanh),
              LayerSpec(nn.Linear, 8, 4), TiedLayerSpec("t", nn.Linear, 4, 4, bias=False)]
    return PipelineModule(layers=layers, topology=PipeDataParallelTopology(num_pp=2, num_dp=case.dp),
                          loss_fn=F.mse_loss, partition_method="uniform")


class _ReduceFromTP(torch.autograd.Function):
    """Megatron's row-parallel output: SUM over the TP group forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class TPMLP(nn.Module):
    """``mlp`` with l1 column-parallel and l2 row-parallel over the TP group; l2.bias replicated."""

    def __init__(self, tp_rank: int, tp_size: int, group) -> None:
        super().__init__()
        full = dict(mlp().named_parameters())
        rows = slice(tp_rank * 8 // tp_size, (tp_rank + 1) * 8 // tp_size)
        self.w1 = nn.Parameter(full["0.weight"].detach()[rows].clone())
        self.b1 = nn.Parameter(full["0.bias"].detach()[rows].clone())
        self.w2 = nn.Parameter(full["2.weight"].detach()[:, rows].clone())
        self.b2 = nn.Parameter(full["2.bias"].detach().clone())
        for p in (self.w1, self.b1, self.w2):
            p.tensor_model_parallel = True
        self.group = group

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.w1, self.b1))
        return _ReduceFromTP.apply(F.linear(h, self.w2), self.group) + self.b2


# ---- running one case inside a rank -----------------------------------------------------------------
def ds_config(case: Case) -> dict[str, Any]:
    cfg = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": case.gas,
           "train_batch_size": BATCH * case.gas * case.dp, "steps_per_print": 10**6,
           "gradient_clipping": case.gradient_clipping, "zero_allow_untested_optimizer": True,
           "zero_force_ds_cpu_optimizer": False, **case.ds}
    if case.bf16:
        cfg["bf16"] = {"enabled": True}
    if case.fp16 is not None:
        cfg["fp16"] = {"enabled": True, **case.fp16}
    if case.zclip is not None:
        cfg["zclip"] = case.zclip
    return cfg


def allow_fp16_on_cpu() -> None:
    """DeepSpeed's CPU accelerator refuses fp16; torch's CPU fp16 arithmetic is all these tests need."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True


def master_weights(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights the optimizer updates, by name (collective under ZeRO: every rank calls it)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param

    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    opt = engine.optimizer
    named = list(engine.module.named_parameters())
    rename = getattr(engine.module, "global_name", lambda n: n)
    if isinstance(opt, FP16_UnfusedOptimizer):
        fp32 = {id(lo): hi for los, his in zip(opt.fp16_groups, opt.fp32_groups) for lo, hi in zip(los, his)}
        return {rename(n): fp32[id(p)].detach().float().clone() for n, p in named}
    if isinstance(opt, FP16_Optimizer):
        from torch._utils import _unflatten_dense_tensors

        fp32 = {id(lo): hi for los, flat in zip(opt.fp16_groups, opt.fp32_groups_flat)
                for lo, hi in zip(los, _unflatten_dense_tensors(flat, los))}
        return {rename(n): fp32[id(p)].detach().float().clone() for n, p in named}
    out = {}
    for n, p in named:
        full = safe_get_full_fp32_param(p)
        out[rename(n)] = (full if full is not None else p).detach().float().clone()
    return out


def _loss_scale(engine) -> float:
    opt = engine.optimizer
    config = getattr(opt, "loss_scale_config", None)
    return float(config.cur_scale if config is not None else getattr(opt, "loss_scale", 1.0))


def run_case(case: Case, rank: int) -> dict[str, Any]:
    """Build the engine through ``zclip_dist.deepspeed.initialize`` (or ``deepspeed.initialize``, see
    ``Case.entry``), train, return per step the full master weights, the metrics, whether DeepSpeed
    skipped the step and its loss scale, and the final clipper state."""
    import deepspeed
    import deepspeed.utils.groups

    from zclip_dist import deepspeed as zds

    deepspeed.utils.groups.mpu = None  # notes §9.2: a previous engine's mpu leaks into the next
    if case.fp16 is not None:
        allow_fp16_on_cpu()
    mpu = None
    params = None
    if case.kind == "moe":
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        model = MoEMLP(case.experts, case.ep_size)
        params = split_params_into_different_moe_groups_for_optimizer(
            {"params": list(model.parameters()), "name": "dense"})
        dp_rank = torch.distributed.get_rank()
    elif case.kind == "tp":
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(tensor_model_parallel_size=2)
        mpu = zds.MegatronMPU(ps)
        model = TPMLP(ps.get_tensor_model_parallel_rank(), 2, ps.get_tensor_model_parallel_group())
        dp_rank = ps.get_data_parallel_rank()
    elif case.kind == "pipe":
        model = pipe_module(case)
    else:
        model = mlp()
    params = params if params is not None else model.parameters()
    optimizer = fused_sgd(params, lr=1.0) if case.fused else torch.optim.SGD(params, lr=1.0)
    config = ds_config(case)
    if case.attach_after_load:
        config.pop("zclip")
    init = deepspeed.initialize if case.entry == "deepspeed" else zds.initialize
    engine, *_ = init(model=model, optimizer=optimizer, mpu=mpu, config=config)
    if case.kind == "pipe":
        dp_rank = engine.grid.get_data_parallel_rank()
    elif case.kind == "mlp":
        dp_rank = engine.global_rank if case.dp > 1 else 0
    start = 0
    if case.resume:
        engine.load_checkpoint(case.ckpt_dir)
        start = case.save_at
    if case.attach_after_load:
        zds.attach(engine, case.zclip)
    snaps, decisions, skipped, scales = [master_weights(engine)], [], [], []
    for step in range(start, case.steps):
        micro = [tuple(t.to(case.dtype) for t in batch(case, step, dp_rank, m)) for m in range(case.gas)]
        scales.append(_loss_scale(engine))
        before = engine.skipped_steps
        if case.kind == "pipe":
            engine.train_batch(data_iter=iter(micro))
        else:
            for x, y in micro:
                engine.backward(F.mse_loss(engine(x), y))
                engine.step()
        skipped.append(engine.skipped_steps > before)
        snaps.append(master_weights(engine))
        zc = getattr(engine, "_zclip", None)
        decisions.append(zc.metrics() if zc is not None else None)
        if case.save_at == step + 1 and not case.resume:
            engine.save_checkpoint(case.ckpt_dir)
    zc = getattr(engine, "_zclip", None)
    out = {"snaps": snaps, "decisions": decisions, "rank": rank, "optimizer": type(engine.optimizer).__name__,
           "skipped_steps": engine.skipped_steps, "skipped": skipped, "scales": scales,
           "state": zc.state_dict()["state"] if zc is not None else None}
    if case.kind == "tp":
        out["tp_rank"] = mpu.get_model_parallel_rank()
    deepspeed.utils.groups.mpu = None
    return out


class Monitor:
    """Stands in for DeepSpeed's monitor: records what the attachment writes (``engine.monitor = Monitor()``)."""

    enabled = True

    def __init__(self) -> None:
        self.events: list[tuple[str, float, int]] = []

    def write_events(self, events) -> None:
        self.events.extend(events)


def train_counting_reads(engine, case: Case, rank: int, steps: int) -> int:
    """Train ``steps`` steps on ``case``'s data (rank ``rank``'s batches); return the host reads of tensor
    values inside ``engine.step()`` (tests/sync_guard.py: reads of host memory through ``host_value``
    do not count)."""
    from tests.sync_guard import count_host_reads

    total = 0
    for step in range(steps):
        x, y = batch(case, step, rank, 0)
        engine.backward(F.mse_loss(engine(x), y))
        with count_host_reads() as counts:
            engine.step()
        total += sum(counts.values())
    return total


# ---- assembling and the oracle ------------------------------------------------------------------------
def full_params(case: Case, per_rank: list[dict[str, torch.Tensor]], tp_ranks: list[int] | None = None) -> dict:
    """One full set of weights from every rank's named local weights (pipeline stages, TP shards)."""
    if case.kind == "tp":
        shard = {r: per_rank[tp_ranks.index(r)] for r in (0, 1)}
        return {"0.weight": torch.cat([shard[0]["w1"], shard[1]["w1"]]),
                "0.bias": torch.cat([shard[0]["b1"], shard[1]["b1"]]),
                "2.weight": torch.cat([shard[0]["w2"], shard[1]["w2"]], dim=1),
                "2.bias": shard[0]["b2"]}
    merged: dict[str, torch.Tensor] = {}
    for d in per_rank:
        for k, v in d.items():
            merged.setdefault(k.removeprefix("module."), v)
    return merged


def trajectory(case: Case, results: list[dict]) -> list[dict[str, torch.Tensor]]:
    tp_ranks = [r.get("tp_rank") for r in results]
    return [full_params(case, [r["snaps"][t] for r in results], tp_ranks) for t in range(case.steps + 1)]


def true_loss(case: Case, params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
    """The loss whose gradient DeepSpeed applies: mean over DP ranks and micro-batches of the batch MSE."""
    if case.kind == "moe":
        def forward(p, x):
            return moe_forward(p, x, case.experts)
    else:
        forward = pipe_forward if case.kind == "pipe" else mlp_forward
    dtype = next(iter(params.values())).dtype
    losses = [F.mse_loss(forward(params, x.to(dtype)), y.to(dtype)) for d in range(case.dp) for m in range(case.gas)
              for x, y in [batch(case, step, d, m)]]
    return torch.stack(losses).mean()


def oracle_updates(case: Case, traj: list[dict[str, torch.Tensor]], zclip_kwargs: dict[str, Any],
                   skipped: list[bool] | None = None, dtype: torch.dtype = torch.float32):
    """Per step: (expected update, true norm), from the engine's weights at that step and reference ZClip.
    A step DeepSpeed skipped (loss-scale overflow) expects no update and leaves the reference untouched."""
    from zclip import ZClip

    ref = ZClip(**zclip_kwargs)
    out = []
    for step in range(case.steps):
        params = {k: nn.Parameter(v.clone().to(dtype)) for k, v in traj[step].items()}
        module = nn.Module()
        for i, (k, p) in enumerate(params.items()):
            module.register_parameter(f"p{i}", p)
        true_loss(case, params, step).backward()
        if skipped is not None and skipped[step]:
            norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params.values()))
            out.append(({k: torch.zeros_like(p) for k, p in params.items()}, norm))
            continue
        norm = ref.step(module)  # the reference computes the full-model norm and clips in place
        out.append(({k: -p.grad.detach() for k, p in params.items()}, float(norm)))
    return out


def same_metrics(a: dict, b: dict) -> bool:
    """Equal metrics, NaN equal to NaN (z is NaN during warmup)."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)


def check_against_oracle(case: Case, optimizer: str, results: list[dict], tol: float) -> list[tuple]:
    """Every step's update and pre-clip norm equal the float64 oracle's (a step DeepSpeed skipped: no
    update, reference untouched); returns per step (true norm, decision) for further checks."""
    assert {r["optimizer"] for r in results} == {optimizer}, "the configuration did not build the intended path"
    traj = trajectory(case, results)
    skipped = results[0]["skipped"]
    assert all(r["skipped"] == skipped for r in results)
    expected = oracle_updates(case, traj, reference_kwargs(case), skipped=skipped, dtype=torch.float64)
    seen = []
    for step, (update, true_norm) in enumerate(expected):
        got = {k: traj[step + 1][k] - traj[step][k] for k in traj[step]}
        decision = results[0]["decisions"][step]
        if skipped[step]:
            assert all(float(v.abs().max()) == 0 for v in got.values()), f"{case.name}: skipped step {step} moved"
        else:
            assert rel_diff(got, {k: v.float() for k, v in update.items()}) <= tol, \
                f"{case.name}: step {step} update differs from the oracle"
            assert abs(decision["grad_norm"] - true_norm) <= tol * true_norm, f"{case.name}: step {step} norm"
        assert all(same_metrics(r["decisions"][step], decision) for r in results[1:]), "ranks decided differently"
        seen.append((true_norm, decision))
    spike = seen[case.spike_step][1]
    assert spike["spike"] and spike["clipped"], f"{case.name}: the injected spike was not clipped"
    return seen


def reference_kwargs(case: Case) -> dict[str, Any]:
    """The reference's settings: the entry's, with DeepSpeed's gradient_clipping as the cap (0: none)."""
    from tests.oracle import REFERENCE_KEYS

    kw = {k: v for k, v in case.zclip.items() if k in REFERENCE_KEYS}
    kw.setdefault("max_grad_norm", case.gradient_clipping if case.gradient_clipping > 0 else None)
    return kw


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = math.sqrt(sum(float((a[k] - b[k]).double().pow(2).sum()) for k in b))
    den = math.sqrt(sum(float(b[k].double().pow(2).sum()) for k in b))
    return num / max(den, 1e-30)


def update_norm(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((after[k] - before[k]).double().pow(2).sum()) for k in before))


# ---- rank set-up ----------------------------------------------------------------------------------------
def init_rank() -> None:
    """gloo through DeepSpeed, without compiling the shm inference op (notes §9.1)."""
    import sys

    import deepspeed
    import deepspeed.comm.torch  # noqa: F401 - make sure the module object exists in sys.modules

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")


def finish_rank() -> None:
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def call_in_rank(rank: int, world_size: int, fn, *args):
    """Target for ``run_ranks(call_in_rank, n, fn, ..., init=False)``: DeepSpeed init, ``fn``, orderly shutdown.

    ``fn`` must be a module-level function (it is pickled by reference into the spawned rank).
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_rank()
    try:
        return fn(rank, world_size, *args)
    finally:
        finish_rank()


# ---- AdaGC: the gradient every rank's optimizer applies, per tensor -------------------------------------
@dataclass
class AdaGCCase:
    """One AdaGC run. Spikes and NaNs are written into single tensors' gradients on single ranks by a
    tensor hook (before DeepSpeed's DP reduction), so the oracle knows every rank's contribution."""

    name: str
    ds: dict[str, Any]
    adagc: dict[str, Any]
    gradient_clipping: float
    steps: int
    lr: float = 0.05
    dp: int = 2
    hidden: int = 7  # 67 elements: ZeRO partitions end in padding on the last rank
    bf16: bool = False
    fp16: dict[str, Any] | None = None  # the "fp16" section, as for Case
    spikes: dict[tuple[int, int, str], float] = field(default_factory=dict)  # (step, rank, name) -> factor
    nan: tuple[int, int, str] | None = None  # (step, rank, name) whose gradient gets a NaN
    ckpt_dir: str | None = None
    save_at: int | None = None  # save after this many steps; with resume: load there and go on
    resume: bool = False
    module_only: bool = False  # resume with load_module_only (another DP size: ZeRO partitions differ)


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps (param, weight, gradient) of every parameter it updates: the gradient DeepSpeed
    hands the optimizer after clipping, in whatever form the engine keeps it (flat ZeRO partitions)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.seen.append((p, p.detach().float().clone(), p.grad.detach().float().clone()))
        return super().step(closure)

    def take(self):
        seen, self.seen = self.seen, []
        return seen


def _pieces_by_name(engine, seen) -> dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """(start in the flattened tensor, weight piece, gradient piece) per parameter name, located through
    DeepSpeed's public mappings: ZeRO-1/2 ``_hp_mapping`` fragments, ZeRO-3 ``grad_position`` and the
    rank's partition, FP16_Unfused master copies, or the module parameters themselves."""
    import torch.distributed as dist

    opt = engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    by_id = {id(p): (w.reshape(-1), g.reshape(-1)) for p, w, g in seen}
    out: dict[str, list] = {}
    stage = engine.zero_optimization_stage()
    if stage in (1, 2):
        for i, group in enumerate(opt.bit16_groups):
            flat = by_id.get(id(opt.single_partition_of_fp32_groups[i]))
            for lp in group:
                frag = getattr(lp, "_hp_mapping", None)
                if flat is None or frag is None:
                    continue
                hp, lp_addr = frag.hp_fragment_address, frag.lp_fragment_address
                out.setdefault(names[id(lp)], []).append(
                    (lp_addr.start, *(t.narrow(0, hp.start, hp.numel) for t in flat)))
    elif stage == 3:
        rank = dist.get_rank(group=opt.dp_process_group)
        for i, group in enumerate(opt.fp16_groups):
            flat = by_id.get(id(opt.fp32_partitioned_groups_flat[i]))
            for lp in group:
                _, offset, numel = opt.grad_position[opt.get_param_id(lp)]
                start = rank * lp.partition_numel()
                real = max(0, min(numel, lp.ds_numel - start))  # the last rank's partition is padded
                if flat is not None and real:
                    out.setdefault(names[id(lp)], []).append((start, *(t.narrow(0, offset, real) for t in flat)))
    else:
        masters = {}
        if hasattr(opt, "fp32_groups"):  # FP16_UnfusedOptimizer: fp32 master copies of the module params
            masters = {id(hi): names[id(lo)] for los, his in zip(opt.fp16_groups, opt.fp32_groups)
                       for lo, hi in zip(los, his)}
        for p, (w, g) in by_id.items():
            out.setdefault(masters.get(p, names.get(p)), []).append((0, w, g))
    return out


def _spike_hooks(engine, case: AdaGCCase, rank: int, clock: list[int]) -> None:
    def make(name):
        def hook(grad):
            step = clock[0]
            factor = case.spikes.get((step, rank, name))
            if factor is not None:
                grad = grad * factor
            if case.nan == (step, rank, name):
                grad = grad.clone()
                grad.view(-1)[0] = float("nan")
            return grad

        return hook

    for name, p in engine.module.named_parameters():
        p.register_hook(make(name))


def adagc_config(case: AdaGCCase) -> dict[str, Any]:
    cfg = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
           "train_batch_size": BATCH * case.dp, "steps_per_print": 10**6,
           "gradient_clipping": case.gradient_clipping, "zero_allow_untested_optimizer": True, **case.ds}
    if case.bf16:
        cfg["bf16"] = {"enabled": True}
    if case.fp16 is not None:
        cfg["fp16"] = {"enabled": True, **case.fp16}
    if case.adagc is not None:
        cfg["adagc"] = case.adagc
    return cfg


def adagc_batch(step: int, dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7919 * step + dp_rank)
    return torch.randn(BATCH, 4, generator=g), torch.randn(BATCH, 4, generator=g)


def run_adagc_case(case: AdaGCCase, rank: int) -> dict[str, Any]:
    """Train through ``zclip_dist.deepspeed.initialize``; per step: the applied pieces by name (None when
    the step was skipped) and gamma. Resumed runs load ``ckpt_dir`` and start at ``save_at``."""
    from zclip_dist import deepspeed as zds

    if case.fp16 is not None:
        allow_fp16_on_cpu()
    model = mlp(case.hidden)
    optimizer = RecordingSGD(model.parameters(), lr=case.lr)
    engine, *_ = zds.initialize(model=model, optimizer=optimizer, config=adagc_config(case))
    clock = [0]
    _spike_hooks(engine, case, rank, clock)
    start = 0
    if case.resume:
        engine.load_checkpoint(case.ckpt_dir, load_module_only=case.module_only)
        start = case.save_at
    dtype = torch.float16 if case.fp16 is not None else torch.bfloat16 if case.bf16 else torch.float32
    applied, gammas = [], []
    for step in range(start, case.steps):
        clock[0] = step
        x, y = (t.to(dtype) for t in adagc_batch(step, rank))
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()
        seen = optimizer.take()  # DeepSpeed steps the client optimizer itself (flat partitions under ZeRO)
        applied.append(_pieces_by_name(engine, seen) if seen else None)
        gammas.append(engine._zclip.clipper.state.gamma.tolist())
        if case.save_at == step + 1 and not case.resume:
            engine.save_checkpoint(case.ckpt_dir)
    hook = engine._zclip
    return {"applied": applied, "gammas": gammas, "names": list(hook.clipper.names), "rank": rank,
            "optimizer": type(engine.optimizer).__name__, "skipped_steps": engine.skipped_steps,
            "state": hook.state_dict()}


def assemble(per_rank: list[dict[str, list]], shapes: dict[str, torch.Size]) -> dict[str, tuple]:
    """Full (weight, gradient) per tensor from every rank's pieces; each element must be covered, and
    overlapping pieces (replicas) must agree exactly."""
    out = {}
    for name, shape in shapes.items():
        n = math.prod(shape)
        w, g, hit = torch.zeros(n), torch.zeros(n), torch.zeros(n, dtype=torch.bool)
        for pieces in per_rank:
            for start, wp, gp in pieces.get(name, []):
                sl = slice(start, start + wp.numel())
                if hit[sl].any():
                    assert torch.equal(g[sl], gp) and torch.equal(w[sl], wp), f"{name}: ranks disagree"
                w[sl], g[sl], hit[sl] = wp, gp, True
        assert hit.all(), f"{name}: elements no rank applied"
        out[name] = (w.reshape(shape), g.reshape(shape))
    return out


def adagc_oracle_grads(case: AdaGCCase, step: int, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full-model gradient DeepSpeed reduces at ``weights``: the mean over DP ranks of each rank's
    gradient, with that rank's injected spikes."""
    total = {k: torch.zeros_like(v) for k, v in weights.items()}
    for d in range(case.dp):
        params = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
        x, y = adagc_batch(step, d)
        F.mse_loss(mlp_forward(params, x), y).backward()
        for k, p in params.items():
            total[k] += p.grad * case.spikes.get((step, d, k), 1.0)
    return {k: v / case.dp for k, v in total.items()}
