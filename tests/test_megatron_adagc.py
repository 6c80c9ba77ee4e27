"""AdaGC through ``zclip_dist.megatron.wrap_optimizer`` on real megatron-core models and optimizers, 4 gloo ranks,
on megatron-core 0.16.1 (every layout) and 0.19.2 (TP2xDP2 FP32 and DistributedOptimizer; tests/megatron_versions.py).

Layouts: TP2xDP2 with the FP32 optimizer (DP replicas), TP2xDP2 with the DistributedOptimizer (fp32 DP
shards of TP shards), TP2xPP2 with tied embeddings and the DistributedOptimizer (fp32 and bf16), TP2xDP2
bf16 with Float16OptimizerWithFloat16Params (fp32 main copies). Each runs 210 steps of analytic gradients
(tests/megatron_fixtures.py) written into ``main_grad`` with spikes in single tensors on single ranks: a
TP shard, one element (one DistributedOptimizer shard), a replicated LayerNorm weight, one shard of the
tied embedding, and a lasting 3x rise gamma has to follow. Checked in this (parent) process:

* every main gradient the optimizer applied equals, on its piece of the tensor, what
  tests/adagc_reference.py (official-patch semantics, one process) does to the *full-model* gradient,
  rel <= 1e-5; the returned norm and gamma (by global name) agree with it too;
* gamma is bitwise identical on every rank holding the tensor (the tied copies included);
* collectives inside ``optimizer.step()``: stock Megatron's plus exactly one all-reduce over the ranks of
  the pipeline stage (plus the scalar agreement where Megatron's own norm does not span the world);
  host reads: stock Megatron's (plus that agreement's one);
* a NaN written on one rank skips the step on every rank with gamma and the parameters untouched;
* a run resumed from a Megatron checkpoint (torch_dist with the state as a per-stage ShardedObject, and
  the legacy torch format) makes bitwise the same decisions as the uninterrupted run;
* the metrics reach Megatron's writers with one host transfer.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

from tests.adagc_reference import AdaGCReference
from tests.megatron_fixtures import Layout, full_gradient, merged_shapes
from tests.megatron_versions import CORES, run_ranks_on

STEPS, SAVE_AT = 210, 160
LAMBDA_ABS = 60.0  # the warmup's global clip: bites on the larger warmup steps (norms ~45-75)
ADAGC = dict(warmup_steps=30, clip_ratio=1.3, beta=0.9)  # gamma can follow a rise within ~40 steps
NAN_STEP, NAN_RANK = 100, 3
RISE = (130, "decoder.layers.0.self_attention.linear_proj.weight", 3.0)  # lasting from step 130 on
#: step -> [(global name, region, factor)]; region ("chunk", dim, k) is TP rank k's shard of a TP-sharded
#: tensor, ("element", i) one element (one DistributedOptimizer shard), ("all",) the whole tensor.
SPIKES = {
    45: [("decoder.layers.0.mlp.linear_fc1.weight", ("chunk", 0, 1), 30.0)],
    46: [("decoder.layers.0.mlp.linear_fc1.weight", ("chunk", 0, 1), 30.0)],
    75: [("decoder.layers.1.self_attention.linear_qkv.weight", ("element", 5), 400.0)],
    120: [("decoder.final_layernorm.weight", ("all",), 20.0)],  # replicated on the TP ranks
    150: [("embedding.word_embeddings.weight", ("chunk", 0, 0), 25.0)],  # tied: both pipeline copies
}
#: (layout, checkpoint format of the resume check or None). The optimizers: FP32Optimizer (model params),
#: Float16OptimizerWithFloat16Params (bf16 model, fp32 main copies), DistributedOptimizer over fp32 and bf16
#: parameters (fp32 shards). bf16 DistOpt is not resumed: megatron-core 0.16.1's torch_dist save of it fails
#: on CPU without AdaGC too (an Adam-state shape assert in sharded_param_state_dp_reshardable).
LAYOUTS = [
    (Layout("tp2dp2", tp=2), "torch"),
    (Layout("tp2dp2_distopt", tp=2, dist_opt=True), "torch_dist"),
    (Layout("tp2pp2_tied_distopt", tp=2, pp=2, tied=True, dist_opt=True), "torch_dist"),
    (Layout("tp2dp2_bf16", tp=2, bf16=True), None),
    (Layout("tp2pp2_tied_bf16_distopt", tp=2, pp=2, tied=True, bf16=True, dist_opt=True), None),
]
#: The layouts run on megatron-core 0.19.2 as well (the hook is the same; the release's step() differs).
LAYOUTS_019 = ("tp2dp2", "tp2dp2_distopt")
#: Megatron's own norm reduction does not span the world (non-distributed optimizer, DP > 1): one scalar agreement.
AGREEING = {"tp2dp2", "tp2dp2_bf16"}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "reduce", "barrier", "all_to_all_single")


def scale_at(step: int) -> float:
    return 1.0 + 0.3 * math.sin(0.7 * step)


def full_grad(gname: str, shape: tuple[int, ...], step: int) -> torch.Tensor:
    """The full-model gradient of one tensor at ``step``, spikes included (float64)."""
    g = full_gradient(gname, shape, step) * scale_at(step)
    spikes = list(SPIKES.get(step, []))
    if step >= RISE[0]:
        spikes.append((RISE[1], ("all",), RISE[2]))
    for name, region, factor in spikes:
        if name != gname:
            continue
        if region[0] == "chunk":
            g.chunk(2, dim=region[1])[region[2]].mul_(factor)
        elif region[0] == "element":
            g.view(-1)[region[1]] *= factor
        else:
            g.mul_(factor)
    return g


# ---- inside a rank --------------------------------------------------------------------------------
def _write(entries, step: int) -> None:
    """Each rank writes its slice of the spiked full gradient into ``main_grad`` (replicas agree, as
    after Megatron's DP all-reduce; the tied output copy gets the embedding's gradient)."""
    for p, gname, shape, size, rank, dim in entries:
        full = full_grad(gname, shape, step)
        local = full if dim is None else full.chunk(size, dim=dim)[rank]
        p.main_grad.copy_(local.to(p.main_grad.dtype))


def _pieces(opt, entries) -> list[tuple]:
    """For every main gradient AdaGC clips: (global name, TP split size, TP rank, dim, flat start, end)."""
    from zclip_dist.megatron.hook import sub_optimizers

    ranges = {}
    for sub in sub_optimizers(opt):
        if hasattr(sub, "shard_fp32_groups"):  # DistributedOptimizer: the DP shard of the TP-local tensor
            for model in [p for g in sub.model_float16_groups + sub.model_fp32_groups for p in g]:
                r = sub._get_model_param_range_map(model)["param"]
                ranges[id(model)] = (r.start, r.end)
    by_id = {id(p): (gname, size, rank, dim) for p, gname, _, size, rank, dim in entries}
    return [(*by_id[id(o)], *ranges.get(id(o), (0, o.numel()))) for o in opt._adagc_tensors.owners]


class _CountCollectives:
    """Records (function, ranks of its group) for every torch.distributed collective while active."""

    def __enter__(self):
        import torch.distributed as dist

        self.calls, self._originals = [], {fn: getattr(dist, fn) for fn in COLLECTIVES}
        for fn, original in self._originals.items():
            setattr(dist, fn, self._wrap(fn, original))
        return self

    def _wrap(self, fn, original):
        import torch.distributed as dist

        def wrapper(*args, **kwargs):
            group = kwargs.get("group")
            ranks = dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size())
            self.calls.append((fn, tuple(ranks)))
            return original(*args, **kwargs)
        return wrapper

    def __exit__(self, *exc):
        import torch.distributed as dist

        for fn, original in self._originals.items():
            setattr(dist, fn, original)


def _counted_step(opt):
    from tests.megatron_fixtures import SyncCounter

    with _CountCollectives() as calls, SyncCounter() as reads:
        result = opt.step()
    return result, calls.calls, reads.count


def _grads_now(opt) -> np.ndarray:
    return np.concatenate([g.detach().float().reshape(-1).numpy() for g in opt._adagc_tensors.grads()])


def _params(ddp) -> list[bytes]:
    return [p.detach().float().numpy().tobytes() for p in ddp.module.parameters()]


def _wrapped(layout: Layout, seed: int):
    from tests.megatron_fixtures import AnalyticGrads, build
    from zclip_dist import megatron as zmeg
    from zclip_dist.config import AdaGCConfig

    ddp, opt = build(layout, seed=seed, clip_grad=LAMBDA_ABS)
    grads = AnalyticGrads(ddp, layout)
    return ddp, opt, grads, lambda: zmeg.wrap_optimizer(opt, AdaGCConfig(max_grad_norm=LAMBDA_ABS, **ADAGC),
                                                         model=ddp)


def _train(ddp, opt, grads, steps, rank: int, out: dict) -> None:
    """Steps with analytic gradients; per step: success, norm, the applied gradients, gamma, costs."""
    for step in steps:
        _write(grads.entries, step)
        if step == NAN_STEP and rank == NAN_RANK:  # a TP shard: Megatron's own norm sees it
            shard = next(p for p in ddp.module.parameters() if getattr(p, "tensor_model_parallel", False))
            shard.main_grad.view(-1)[0] = float("nan")
        if step == NAN_STEP:
            out["nan_before"] = (opt.adagc.state.gamma.clone(), _params(ddp))
        (ok, norm, _), calls, reads = _counted_step(opt)
        if step == NAN_STEP:
            gamma, params = out.pop("nan_before")
            out["nan"] = dict(gamma_same=torch.equal(gamma, opt.adagc.state.gamma), params_same=params == _params(ddp))
        out["steps"].append(dict(step=step, ok=ok, norm=norm, applied=_grads_now(opt),
                                 gamma=opt.adagc.state.gamma.numpy().copy(), calls=calls, reads=reads))


def _run_layout(rank: int, layout: Layout, fmt: str, path: str) -> dict:
    import torch.distributed as dist

    from tests.megatron_fixtures import _global_name, load_checkpoint, save_checkpoint

    ddp, opt, grads, wrap = _wrapped(layout, seed=1)
    # Stock Megatron first (--clip-grad clipping): its collectives and host reads per step.
    stock = []
    for step in range(2):
        _write(grads.entries, step)
        stock.append(_counted_step(opt)[1:])
    wrap()
    names = {n: _global_name(n, p, layout) for n, p in ddp.module.named_parameters()}
    out = {"shapes": grads.shapes(), "stock": stock, "steps": [], "pieces": _pieces(opt, grads.entries),
           "units": [names[n] for n in opt.adagc.names]}
    _train(ddp, opt, grads, range(SAVE_AT + 1), rank, out)
    if fmt is not None:
        save_checkpoint(fmt, path, ddp, opt)
        dist.barrier()
    _train(ddp, opt, grads, range(SAVE_AT + 1, STEPS), rank, out)
    out["num_nonfinite"] = int(opt.adagc.state.num_nonfinite)
    out["metrics"] = _metrics(rank, opt)
    out["resumed"] = []
    if fmt is None:
        return out

    ddp, opt, grads, wrap = _wrapped(layout, seed=2)  # other weights; gamma empty until loaded
    # One stock step, as before the uninterrupted run: megatron-core 0.19 probes once, at its first step,
    # whether any rank has a separately clipped parameter group (a collective of its own). The load
    # below replaces what this step changed.
    _write(grads.entries, 0)
    opt.step()
    wrap()
    load_checkpoint(fmt, path, ddp, opt)
    resumed = {"steps": []}
    _train(ddp, opt, grads, range(SAVE_AT + 1, STEPS), rank, resumed)
    out["resumed"] = resumed["steps"]
    return out


class _Writer:
    def __init__(self) -> None:
        self.scalars: dict[str, tuple[float, int]] = {}

    def add_scalar(self, key, value, step) -> None:
        self.scalars[key] = (value, step)


def _metrics(rank: int, opt) -> dict:
    from tests.megatron_fixtures import SyncCounter
    from zclip_dist import megatron as zmeg

    writer = _Writer() if rank == 3 else None  # Megatron-LM: writers on the last rank only
    with SyncCounter() as syncs:
        written = zmeg.log_metrics(zmeg.attached_optimizer(), STEPS, writer)
    return {"syncs": syncs.count, "written": written, "scalars": writer.scalars if writer else {},
            "metrics": opt.adagc.metrics()}


def layouts_of(core: str) -> list[tuple[Layout, str | None]]:
    return [(lay, fmt) for lay, fmt in LAYOUTS if core == "core0.16" or lay.name in LAYOUTS_019]


def _cases(resumable: bool = False) -> list:
    return [pytest.param(core, lay.name, id=f"{core}-{lay.name}") for core in CORES
            for lay, fmt in layouts_of(core) if fmt is not None or not resumable]


def _worker(rank: int, world: int, path: str, core: str) -> list[dict]:
    warnings.filterwarnings("ignore")
    from tests import megatron_cpu_shim

    megatron_cpu_shim.apply()
    return [_run_layout(rank, layout, fmt, f"{path}/{layout.name}") for layout, fmt in layouts_of(core)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(core)``: ``{layout name: per-rank results}``, computed once per core."""
    cache: dict = {}

    def get(core: str) -> dict:
        if core not in cache:
            path = tmp_path_factory.mktemp(f"megatron_adagc_{core}")
            for layout, _ in layouts_of(core):
                (path / layout.name).mkdir()
            try:
                per_rank = run_ranks_on(core, _worker, 4, str(path), core)
                cache[core] = {layout.name: [r[i] for r in per_rank] for i, (layout, _) in enumerate(layouts_of(core))}
            except BaseException as err:  # noqa: BLE001 - a failed or skipped run: the same for every test
                cache[core] = err
        if isinstance(cache[core], BaseException):
            raise cache[core]
        return cache[core]
    return get


# ---- in the parent: the single-process reference --------------------------------------------------
def _reference_run(shapes: dict) -> list[dict | None]:
    """Per step: the reference's clipped full gradients, returned norm and gamma (None at the NaN step,
    which the engine must skip: the reference never sees it)."""
    ref = AdaGCReference(max_grad_norm=LAMBDA_ABS, **ADAGC)
    out = []
    for step in range(STEPS):
        if step == NAN_STEP:
            out.append(None)
            continue
        full = {n: full_grad(n, s, step) for n, s in shapes.items()}
        pre = {n: float(g.norm()) for n, g in full.items()}
        norm = ref(full)
        out.append(dict(grads=full, norm=norm, gamma=dict(ref.gamma),
                        coef={n: float(g.norm()) / pre[n] for n, g in full.items()}))
    return out


def _expected_piece(full: torch.Tensor, piece: tuple) -> torch.Tensor:
    _, size, rank, dim, start, end = piece
    local = full if dim is None else full.chunk(size, dim=dim)[rank]
    return local.reshape(-1)[start:end]


@pytest.fixture(scope="module")
def references(runs):
    """``references(core, name)``: the single-process reference for that run's shapes, computed once."""
    cache: dict = {}

    def get(core: str, name: str) -> list:
        if (core, name) not in cache:
            cache[core, name] = _reference_run(merged_shapes([r["shapes"] for r in runs(core)[name]]))
        return cache[core, name]
    return get


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.mark.parametrize("core, name", _cases())
def test_clipped_gradients_equal_the_reference(runs, references, core, name):
    worst = 0.0
    for rank, r in enumerate(runs(core)[name]):
        sizes = [end - start for *_, start, end in r["pieces"]]
        for record, ref in zip(r["steps"], references(core, name)):
            if ref is None:
                continue
            assert record["ok"] and record["norm"] == pytest.approx(ref["norm"], rel=1e-5), (name, rank, record["step"])
            for piece, applied in zip(r["pieces"], np.split(record["applied"], np.cumsum(sizes)[:-1])):
                rel = _rel(torch.from_numpy(applied), _expected_piece(ref["grads"][piece[0]], piece))
                assert rel <= 1e-5, (name, rank, record["step"], piece[0], rel)
                worst = max(worst, rel)
            for unit, gamma in zip(r["units"], record["gamma"]):
                assert float(gamma) == pytest.approx(ref["gamma"][unit], rel=1e-5), (name, record["step"], unit)
    print(f"{name}: worst rel error of an applied gradient piece {worst:.2e}")


def test_spikes_were_clipped_and_the_rise_followed(references):
    ref = references("core0.16", "tp2dp2")
    for step, spikes in SPIKES.items():
        for gname, _, _ in spikes:
            assert ref[step]["coef"][gname] < 0.2, (step, gname, ref[step]["coef"][gname])
    assert ref[RISE[0]]["coef"][RISE[1]] < 0.6  # clipped when the rise starts...
    late = [ref[s]["coef"][RISE[1]] for s in range(STEPS - 10, STEPS)]
    assert sum(c == 1.0 for c in late) >= 7 and min(late) > 0.85, late  # ...and followed by gamma later
    typical = [c for s in range(ADAGC["warmup_steps"] + 20, STEPS) if ref[s] is not None and s not in SPIKES
               for n, c in ref[s]["coef"].items() if n != RISE[1]]
    # Ordinary steps: the 0.7-1.3x modulation peaks are clipped now and then (gamma is an EMA of clipped
    # norms), most pass: both branches of the rule are exercised on every layout.
    assert 0 < sum(c < 1 for c in typical) < 0.3 * len(typical)


@pytest.mark.parametrize("core, name", _cases())
def test_gamma_identical_on_every_rank_holding_the_tensor(runs, core, name):
    results = runs(core)
    for step in range(STEPS):
        by_name: dict[str, set] = {}
        for r in results[name]:
            for unit, gamma in zip(r["units"], r["steps"][step]["gamma"]):
                by_name.setdefault(unit, set()).add(gamma.tobytes())
        assert all(len(v) == 1 for v in by_name.values()), (name, step)
    if name.startswith("tp2pp2_tied"):  # the output copy on the last stage is a unit of its own, equal to the embedding
        assert sum(u == "embedding.word_embeddings.weight" for u in results[name][3]["units"]) == 1


@pytest.mark.parametrize("core, name", _cases())
def test_one_bucketed_all_reduce_per_step_and_no_host_read(runs, core, name):
    results = runs(core)
    layout = next(lay for lay, _ in LAYOUTS if lay.name == name)
    stage_size = 4 // layout.pp
    for rank, r in enumerate(results[name]):
        stage = tuple(range(rank // stage_size * stage_size, (rank // stage_size + 1) * stage_size))
        stock_calls, stock_reads = r["stock"][-1]
        added = [("all_reduce", stage)] + ([("all_reduce", (0, 1, 2, 3))] if name in AGREEING else [])
        for record in r["steps"] + r["resumed"]:
            assert Counter(record["calls"]) == Counter(stock_calls) + Counter(added), (name, rank, record["step"])
            if record["step"] != NAN_STEP:  # Megatron's fallback l2norm reads per tensor, fewer once NaN
                assert record["reads"] == stock_reads + (1 if name in AGREEING else 0), (name, rank, record["step"])


@pytest.mark.parametrize("core, name", _cases())
def test_nan_on_one_rank_skips_everywhere_with_gamma_untouched(runs, core, name):
    for r in runs(core)[name]:
        assert not r["steps"][NAN_STEP]["ok"] and not math.isfinite(r["steps"][NAN_STEP]["norm"])
        assert r["nan"] == dict(gamma_same=True, params_same=True)
        assert r["num_nonfinite"] == 1
        assert all(s["ok"] for s in r["steps"] if s["step"] != NAN_STEP)


@pytest.mark.parametrize("core, name", _cases(resumable=True))
def test_resume_from_a_megatron_checkpoint_equals_the_uninterrupted_run(runs, core, name):
    for r in runs(core)[name]:
        straight = r["steps"][SAVE_AT + 1:]
        assert [s["step"] for s in r["resumed"]] == [s["step"] for s in straight]
        for a, b in zip(straight, r["resumed"]):
            assert a["ok"] == b["ok"] and a["gamma"].tobytes() == b["gamma"].tobytes(), (name, a["step"])
            assert a["applied"].tobytes() == b["applied"].tobytes(), (name, a["step"])


@pytest.mark.parametrize("core", CORES)
def test_metrics_reach_the_writer_with_one_host_transfer(runs, core):
    for rank, r in enumerate(runs(core)["tp2dp2_distopt"]):
        m = r["metrics"]
        if rank == 3:
            assert m["syncs"] == 2  # the metrics and, spike forensics being on, the event buffer
            for key in ("grad_norm", "num_clipped_tensors", "min_coef", "warmup", "skipped"):
                assert m["scalars"][f"adagc/{key}"] == (float(m["metrics"][key]), STEPS)
        else:
            assert m["syncs"] == 0 and m["written"] == {}
