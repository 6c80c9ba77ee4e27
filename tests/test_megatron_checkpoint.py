"""Megatron checkpoints, the non-finite skip and metrics logging, on 4 gloo ranks in one spawned group, on
megatron-core 0.16.1 and 0.19.2 (tests/megatron_versions.py).

* Resume: a run saved at step 14 and resumed into a freshly built model and optimizer makes the same
  ZClip decisions (and ends with the same parameters) as the uninterrupted run; torch_dist format
  (``dist_checkpointing`` with ``sharded_state_dict``, as Megatron-LM's checkpointing.py does) with the
  DistributedOptimizer, legacy torch format (``state_dict``) with the chained dense + expert optimizer.
* Non-finite: a NaN in one rank's gradient makes every rank return ``update_successful=False``,
  leaves the parameters and the statistics untouched, and training continues.
* Metrics: ``log_metrics`` writes the metrics with one host transfer where a writer exists, none elsewhere.
* ``--clip-grad 0`` (no fixed clip): the release's step still reaches ZClip's clip, a spike is clipped,
  and the optimizer's ``clip_grad`` reads 0 again after the step; ``get_grad_norm()`` outside a step is
  Megatron's own.
"""

from __future__ import annotations

import math
import warnings

import pytest

from tests.megatron_fixtures import Layout, load_checkpoint, save_checkpoint
from tests.megatron_versions import CORES, run_ranks_on

STEPS, SAVE_AFTER = 30, 14
CONFIG = dict(alpha=0.9, z_thresh=2.0, warmup_steps=8, max_grad_norm=None)
RESUME = [("torch_dist", Layout("tp2dp2_distopt", tp=2, dist_opt=True)),
          ("torch", Layout("ep2_experts", ep=2, experts=4))]


def _scale(step: int) -> float:
    return 1.0 + 0.5 * math.sin(1.3 * step) + (4.0 if step in (18, 24) else 0.0)  # spikes after the resume point


def _fresh(layout: Layout, seed: int):
    from tests.megatron_fixtures import AnalyticGrads, build
    from zclip_dist import megatron as zmeg
    from zclip_dist.config import ZClipConfig

    ddp, opt = build(layout, seed=seed)
    zmeg.wrap_optimizer(opt, ZClipConfig(**CONFIG))
    return ddp, opt, AnalyticGrads(ddp, layout)


def _train(opt, grads, steps) -> list[tuple]:
    out = []
    for step in steps:
        grads.write(step, _scale(step))
        ok, _, _ = opt.step()
        d = opt.zclip.last
        out.append((ok, float(d.norm), float(d.coef), bool(d.spike), float(opt.zclip.state.mean)))
    return out


def _params(ddp) -> list[bytes]:
    return [p.detach().float().numpy().tobytes() for p in ddp.module.parameters()]


def _resume(fmt: str, layout: Layout, path: str) -> dict:
    import torch.distributed as dist

    ddp, opt, grads = _fresh(layout, seed=1)
    straight = _train(opt, grads, range(SAVE_AFTER + 1))
    save_checkpoint(fmt, path, ddp, opt)
    dist.barrier()
    straight += _train(opt, grads, range(SAVE_AFTER + 1, STEPS))
    final = _params(ddp)

    ddp, opt, grads = _fresh(layout, seed=2)  # different weights and a clipper in warmup until loaded
    load_checkpoint(fmt, path, ddp, opt)
    resumed = _train(opt, grads, range(SAVE_AFTER + 1, STEPS))
    return {"straight": straight, "resumed": resumed, "same_params": _params(ddp) == final}


def _nonfinite(rank: int) -> dict:
    import torch

    ddp, opt, grads = _fresh(Layout("tp2pp2_tied", tp=2, pp=2, tied=True), seed=3)
    _train(opt, grads, range(10))
    before_state = {k: v.clone() for k, v in opt.zclip.state._asdict().items()}
    before_params = _params(ddp)
    grads.write(10, 1.0)
    if rank == 3:
        # A TP shard: a NaN in a TP-duplicate copy on TP rank > 0 is not in Megatron's norm at all.
        shard = next(p for p in ddp.module.parameters() if getattr(p, "tensor_model_parallel", False))
        shard.main_grad.view(-1)[0] = float("nan")
    ok, norm, _ = opt.step()
    after = opt.zclip.state._asdict()
    unchanged = all(torch.equal(before_state[k], after[k]) for k in ("count", "buffer", "mean", "var", "num_clipped"))
    params_unchanged = _params(ddp) == before_params
    metrics = opt.zclip.metrics()
    next_ok = _train(opt, grads, [11])[0][0]
    return {"ok": ok, "norm_finite": math.isfinite(norm), "stats_unchanged": unchanged,
            "params_unchanged": params_unchanged, "skipped": metrics["skipped"],
            "num_nonfinite": metrics["num_nonfinite"], "next_ok": next_ok}


def _no_fixed_clip(rank: int) -> dict:
    from tests.megatron_fixtures import AnalyticGrads, build
    from zclip_dist import megatron as zmeg
    from zclip_dist.config import ZClipConfig

    ddp, opt = build(Layout("dp4"), seed=5, clip_grad=0.0)
    grads = AnalyticGrads(ddp, Layout("dp4"))
    grads.write(0, 1.0)
    zmeg.wrap_optimizer(opt, ZClipConfig(**CONFIG))
    before = opt.get_grad_norm()  # no step has run yet: Megatron's own read, ZClip untouched
    out = {"read_before_step": math.isfinite(before) and int(opt.zclip.state.steps) == 0}
    records = _train(opt, grads, range(20))  # spike (x5) at step 18
    out["spike"] = records[18][2:4]  # (coef, spike)
    out["post_clip"] = opt.get_grad_norm() / records[-1][1]  # last step: the clipped gradient over its norm
    out["coef_last"] = records[-1][2]
    out["clip_grad_after"] = [sub.config.clip_grad for sub in opt.chained_optimizers]
    return out


class _Writer:
    def __init__(self) -> None:
        self.scalars: dict[str, tuple[float, int]] = {}

    def add_scalar(self, key, value, step) -> None:
        self.scalars[key] = (value, step)

    def log(self, values, step) -> None:
        for key, value in values.items():
            self.scalars["wandb:" + key] = (value, step)


def _metrics(rank: int) -> dict:
    from tests.megatron_fixtures import SyncCounter
    from zclip_dist import megatron as zmeg

    ddp, opt, grads = _fresh(Layout("dp4"), seed=4)
    _train(opt, grads, range(12))
    writer = _Writer() if rank == 3 else None  # Megatron-LM: writers on the last rank only
    with SyncCounter() as syncs:
        written = zmeg.log_metrics(zmeg.attached_optimizer(), 12, writer, writer)
    return {"syncs": syncs.count, "written": written, "scalars": writer.scalars if writer else {},
            "metrics": opt.zclip.metrics()}


def _worker(rank: int, world: int, path: str) -> dict:
    warnings.filterwarnings("ignore")
    from tests import megatron_cpu_shim

    megatron_cpu_shim.apply()
    out = {fmt: _resume(fmt, layout, f"{path}/{fmt}") for fmt, layout in RESUME}
    out["nonfinite"] = _nonfinite(rank)
    out["metrics"] = _metrics(rank)
    out["no_fixed_clip"] = _no_fixed_clip(rank)
    return out


@pytest.fixture(scope="module", params=CORES)
def results(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"megatron_ckpt_{request.param}")
    for fmt, _ in RESUME:
        (path / fmt).mkdir()
    return run_ranks_on(request.param, _worker, 4, str(path))


@pytest.mark.parametrize("fmt", [fmt for fmt, _ in RESUME])
def test_resume_makes_the_same_decisions(results, fmt):
    for r in results:
        run = r[fmt]
        assert run["resumed"] == run["straight"][SAVE_AFTER + 1:]
        assert any(step[3] for step in run["resumed"])  # a spike was clipped after the resume
        if fmt == "torch":
            # torch_dist + DistOpt on megatron-core's torch.optim fallback (CPU, no Apex/TE) does not
            # restore Adam bit-exactly; the ZClip decisions above do not depend on it.
            assert run["same_params"]
    assert all(r[fmt]["straight"] == results[0][fmt]["straight"] for r in results)


def test_nonfinite_norm_skips_the_update_on_every_rank(results):
    for r in results:
        nf = r["nonfinite"]
        assert nf == {"ok": False, "norm_finite": False, "stats_unchanged": True, "params_unchanged": True,
                      "skipped": True, "num_nonfinite": 1, "next_ok": True}


def test_metrics_reach_the_writer_with_one_host_transfer(results):
    for rank, r in enumerate(results):
        m = r["metrics"]
        if rank == 3:
            assert m["syncs"] == 1
            for name in ("grad_norm", "threshold", "coef", "clipped", "skipped"):
                assert m["scalars"][f"zclip/{name}"] == (float(m["metrics"][name]), 12)
                assert m["scalars"][f"wandb:zclip/{name}"] == (float(m["metrics"][name]), 12)
        else:
            assert m["syncs"] == 0 and m["written"] == {}


def test_clip_grad_zero_still_reaches_the_zclip_clip(results):
    for r in results:
        got = r["no_fixed_clip"]
        assert got["read_before_step"]
        coef, spike = got["spike"]
        assert spike and coef < 0.5  # clipped, although Megatron itself would not clip at all
        assert got["post_clip"] == pytest.approx(got["coef_last"], rel=1e-5)
        assert got["clip_grad_after"] == [0.0] * len(got["clip_grad_after"])
