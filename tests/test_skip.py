"""A skipped step is a skip: parameters and optimizer state bitwise unchanged, and the run continues
exactly as a run that never saw the bad batch -- for every kind of optimizer, through the drop-in's
natural call (``ZClip(..., optimizer=opt)``, ``zclip.step(model)``, ``opt.step()``).

The host reads are counted: none in ``zclip.step``; at ``opt.step()`` none for a fused optimizer once it
has run (it skips on the device through ``found_inf``) and exactly one otherwise (GradScaler's price).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from zclip_dist import AdaGC, ZClip

from .sync_guard import count_host_reads


class Lion(torch.optim.Optimizer):
    """An optimizer the plugin has never heard of (sign of an interpolated momentum, decoupled decay)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.99), weight_decay: float = 0.1):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["updates"] = torch.zeros_like(p), 0
                state["updates"] += 1
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(state["exp_avg"].lerp(p.grad, 1 - b1).sign_(), alpha=-group["lr"])
                state["exp_avg"].lerp_(p.grad, 1 - b2)
        return loss


OPTIMIZERS = {
    "SGD momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01, foreach=False),
    "SGD momentum foreach": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01, foreach=True),
    "SGD momentum fused": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01, fused=True),
    "Adam for-loop": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False),
    "Adam foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "Adam fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "AdamW for-loop": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False),
    "AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    "AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, weight_decay=0.01),
    "Adagrad fused": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, weight_decay=0.01, fused=True),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9, centered=True, weight_decay=0.01),
    "unknown (Lion)": lambda ps: Lion(ps, lr=1e-3),
}
N_STEPS = 8
BAD = {0: math.nan, 4: math.inf}  # the very first step (the optimizer has no state yet) and a later one


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))


def batch(t: int, bad: float | None = None):
    gen = torch.Generator().manual_seed(100 + t)
    x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
    if bad is not None:
        x[0, 0] = bad  # a corrupted sample: a NaN/Inf loss, non-finite gradients
    return x, y


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def assert_same(a, b, where: str) -> None:
    """Bitwise equality of parameters and of an optimizer state_dict (tensors, counters, hyperparameters)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def train(make_opt, clip_cls, batches, *, skip: bool):
    """Run the natural loop; per step, the host reads made in opt.step() and whether the step was bad."""
    model = make_model()
    opt = make_opt(list(model.parameters()))
    kwargs = dict(warmup_steps=3) if clip_cls is ZClip else dict(warmup_steps=3, max_grad_norm=5.0)
    # The never-seen run has nothing to skip: "propagate" there gives the same finite steps, ungated.
    clip = clip_cls(**kwargs, optimizer=opt) if skip else clip_cls(**kwargs, nonfinite="propagate")
    reads = []
    for t, (x, y, bad) in enumerate(batches):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        with count_host_reads(fail=True):
            clip.step(model)
        before = snapshot(model, opt) if bad else None
        with count_host_reads() as counts:
            opt.step()
        reads.append(sum(counts.values()))
        if before is not None:
            assert bool(clip.last.skipped)
            assert_same(before, snapshot(model, opt), f"step {t} (bad) changed the model or optimizer state")
    return model, opt, reads


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_skipped_step_is_as_if_the_batch_was_never_seen(name):
    make_opt = OPTIMIZERS[name]
    seen = [(*batch(t, BAD.get(t)), t in BAD) for t in range(N_STEPS)]
    never = [(*batch(t), False) for t in range(N_STEPS) if t not in BAD]
    model, opt, reads = train(make_opt, ZClip, seen, skip=True)
    ref_model, ref_opt, ref_reads = train(make_opt, ZClip, never, skip=False)
    assert_same(snapshot(model, opt), snapshot(ref_model, ref_opt), f"{name}: differs from the never-seen run")
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), make_model().parameters()))

    # Host reads at opt.step(): the optimizer's own (CPU step counters' .item()) plus the gate's.
    own = ref_reads[0]
    assert ref_reads == [own] * len(ref_reads)
    device_skip = "fused" in name
    # A fused optimizer flags on the device once it has state: after its first real step (Adagrad
    # creates its state in the constructor).
    has_state_after = -1 if name.startswith("Adagrad") else min(t for t in range(N_STEPS) if t not in BAD)
    expected = []
    for t in range(N_STEPS):
        gate = 0 if device_skip and t > has_state_after else 1
        ran = t not in BAD or gate == 0  # the host path does not call a skipped step at all
        expected.append(gate + (own if ran else 0))
    assert reads == expected


def test_adagc_skips_the_optimizer_step_too():
    make_opt = OPTIMIZERS["AdamW foreach"]
    seen = [(*batch(t, BAD.get(t)), t in BAD) for t in range(N_STEPS)]
    never = [(*batch(t), False) for t in range(N_STEPS) if t not in BAD]
    model, opt, _ = train(make_opt, AdaGC, seen, skip=True)
    ref_model, ref_opt, _ = train(make_opt, AdaGC, never, skip=False)
    assert_same(snapshot(model, opt), snapshot(ref_model, ref_opt), "AdaGC: differs from the never-seen run")


def test_without_optimizer_warns_once_and_zeroes():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    zc = ZClip(warmup_steps=3)
    with pytest.warns(UserWarning, match=r"without optimizer=.*optimizer still steps") as caught:
        for t in range(4):
            x, y = batch(t, math.nan if t == 3 else None)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            zc.step(model)
            opt.step()
    assert len([w for w in caught if "optimizer=" in str(w.message)]) == 1
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())  # NaN cleared too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ZClip(nonfinite="propagate").step(model)  # nothing claimed: no warning


def test_lr_scheduler_before_or_after_and_closure():
    """The gate keeps LRScheduler's own wrapping working in either order, and takes a closure."""
    for scheduler_first in (True, False):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if scheduler_first else None
        zc = ZClip(warmup_steps=3, optimizer=opt)
        sched = sched or torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "optimizer.step() has been overridden" would fail here
            for t in range(3):
                x, y = batch(t, math.nan if t == 2 else None)

                def closure():
                    opt.zero_grad()
                    loss = nn.functional.mse_loss(model(x), y)
                    loss.backward()
                    zc.step(model)  # inside the closure, as Lightning does
                    return loss

                before = snapshot(model, opt)
                loss = opt.step(closure)
                assert isinstance(loss, torch.Tensor) and (torch.isfinite(loss) == (t != 2))
                if t == 2:
                    assert_same(before, snapshot(model, opt), "closure step not skipped")
                sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)


def test_grad_scaler_with_a_fused_optimizer_keeps_both_flags():
    """GradScaler hands fused optimizers its own found_inf: ours is combined with it, and restored after."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    zc = ZClip(warmup_steps=3, optimizer=opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    for t in range(6):
        x, y = batch(t)
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        scaler.unscale_(opt)
        if t == 4:  # non-finite only after the scaler's own check: ZClip alone sees it
            model[0].weight.grad[0, 0] = math.nan
        zc.step(model)
        before = snapshot(model, opt)
        scaler.step(opt)
        scaler.update()
        assert not hasattr(opt, "found_inf")
        if t == 4:
            assert_same(before[0], snapshot(model, opt)[0], "GradScaler step not skipped")
    assert scaler.get_scale() == 2.0 ** 4  # the scaler itself never saw an overflow


def _fsdp_seen_and_never(rank: int, world: int) -> dict[str, bool]:
    from torch.distributed.fsdp import fully_shard

    def run(make_opt, seen: bool):
        model = make_model()
        fully_shard(model)
        opt = make_opt(list(model.parameters()))
        zc = ZClip(warmup_steps=2, optimizer=opt)
        for t in range(6):
            if t == 3 and not seen:
                continue
            x, y = batch(10 * t + rank)
            if t == 3 and rank == 1:
                x[0, 0] = math.nan  # on one rank only: every rank must skip
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            zc.step(model)
            opt.step()
        full = [p.full_tensor() for p in model.parameters()]
        state = {k: {n: v.full_tensor() if hasattr(v, "full_tensor") else v for n, v in s.items()}
                 for k, s in opt.state_dict()["state"].items()}
        return full, state

    out = {}
    for name in ("AdamW fused", "SGD momentum"):
        try:
            assert_same(run(OPTIMIZERS[name], True), run(OPTIMIZERS[name], False), name)
            out[name] = True
        except AssertionError:
            out[name] = False
    return out


def test_fsdp2_skip_on_every_rank_as_if_never_seen():
    """FSDP2 x2, the NaN on rank 1 only: fused (found_inf on DTensor shards) and host-read paths."""
    from .distributed import run_ranks

    for r, res in enumerate(run_ranks(_fsdp_seen_and_never, 2)):
        assert res == {"AdamW fused": True, "SGD momentum": True}, (r, res)
