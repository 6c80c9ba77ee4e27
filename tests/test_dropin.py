"""The PyTorch drop-in in one process: sync-free step, non-finite handling, state_dict resume, parity."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from zclip import ZClip as ReferenceZClip

from zclip_dist import ZClip

from .sync_guard import count_host_reads


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3)).to(dtype)


def batches(n: int, spike_at: int | None = None, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    for t in range(n):
        x = torch.randn(8, 6, generator=gen)
        y = torch.randn(8, 3, generator=gen)
        yield t, x, y * (40.0 if t == spike_at else 1.0)  # a corrupted target: a gradient spike


def backward(model, x, y):
    model.zero_grad(set_to_none=False)
    nn.functional.mse_loss(model(x.to(next(model.parameters()).dtype)), y.to(next(model.parameters()).dtype)).backward()


@pytest.mark.parametrize("kwargs", [dict(), dict(max_grad_norm=None, warmup_steps=5), dict(mode="percentile", warmup_steps=5)])
def test_step_has_no_host_sync(kwargs):
    model = make_model()
    zclip = ZClip(**kwargs)
    for t, x, y in batches(32, spike_at=28):
        backward(model, x, y)
        with count_host_reads(fail=True):
            norm = zclip.step(model)
        assert isinstance(norm, torch.Tensor) and norm.dim() == 0 and norm.dtype == torch.float32
    assert zclip.metrics()["num_spikes"] >= 1


def test_matches_reference_package_on_a_model():
    """Same model, same data: the reference's own step and ours produce the same gradients each step."""
    ours, ref_model = make_model(), make_model()
    zc, ref = ZClip(max_grad_norm=None, warmup_steps=5), ReferenceZClip(max_grad_norm=None, warmup_steps=5)
    spikes = 0
    for t, x, y in batches(60, spike_at=40):
        backward(ours, x, y)
        backward(ref_model, x, y)
        n_ours = zc.step(ours)
        n_ref = ref.step(ref_model)
        assert math.isclose(float(n_ours), n_ref, rel_tol=1e-5)
        for a, b in zip(ours.parameters(), ref_model.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
        spikes += zc.metrics()["spike"]
    assert spikes >= 1


def test_parameter_iterable_and_bf16_accumulates_in_fp32():
    model = make_model(dtype=torch.bfloat16)
    zc = ZClip(max_grad_norm=None)
    _, x, y = next(batches(1))
    backward(model, x, y)
    expected = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in model.parameters()]))
    norm = zc.step(p for p in model.parameters())
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_skip_keeps_statistics(bad):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    zc = ZClip(warmup_steps=3, optimizer=opt)
    for t, x, y in batches(8):
        backward(model, x, y)
        if t == 5:
            model[0].weight.grad[0, 0] = bad
            before = [s.clone() for s in zc.clipper.state]
            params_before = [p.detach().clone() for p in model.parameters()]
        zc.step(model)
        opt.step()
        if t == 5:
            m = zc.metrics()
            assert m["nonfinite"] and m["skipped"] and m["coef"] == 0.0
            after = zc.clipper.state
            for name in ("count", "buffer", "mean", "var"):
                assert torch.equal(getattr(after, name), before[("count", "buffer", "mean", "var").index(name)])
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params_before)), "update not skipped"
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert zc.metrics()["num_nonfinite"] == 1


def test_nonfinite_raise():
    model = make_model()
    zc = ZClip(nonfinite="raise")
    _, x, y = next(batches(1))
    backward(model, x, y)
    model[0].bias.grad[0] = math.nan
    with pytest.raises(FloatingPointError, match="non-finite gradient norm"):
        zc.step(model)


def test_state_dict_resume_equals_uninterrupted_run():
    cfg = dict(max_grad_norm=None, warmup_steps=10)
    data = list(batches(80, spike_at=50))

    def train(model, zc, ts):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        coefs = []
        for t, x, y in ts:
            backward(model, x, y)
            zc.step(model)
            coefs.append(zc.metrics()["coef"])
            opt.step()
        return coefs

    full_model = make_model()
    full = train(full_model, ZClip(**cfg), data)

    model = make_model()
    zc = ZClip(**cfg)
    first = train(model, zc, data[:25])
    saved = copy.deepcopy(zc.state_dict())
    resumed_zc = ZClip(**cfg)
    resumed_zc.load_state_dict(saved)
    second = train(model, resumed_zc, data[25:])
    assert first + second == full  # exact: same decisions, same coefficients
    assert sum(c < 1 for c in second) >= 1


def test_state_dict_version_and_warmup_change():
    zc = ZClip(warmup_steps=5)
    sd = zc.state_dict()
    future = dict(sd, version=sd["version"] + 1)
    with pytest.raises(ValueError, match="newer than this zclip_dist understands"):
        ZClip().load_state_dict(future)
    with pytest.warns(UserWarning, match="warmup_steps changed during warmup"):
        ZClip(warmup_steps=7).load_state_dict(sd)


@pytest.mark.parametrize("cls", ["ZClip", "AdaGC"])
def test_fused_optimizer_skips_nonfinite_step_on_device(cls):
    """With a fused optimizer the skip is the optimizer's own found_inf: no scrub pass, no sync, no update."""
    import zclip_dist

    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    clip = getattr(zclip_dist, cls)(warmup_steps=3, optimizer=opt)
    for t, x, y in batches(8):
        backward(model, x, y)
        if t == 5:
            model[0].weight.grad[0, 0] = math.nan
            before = [p.detach().clone() for p in model.parameters()]
            steps_before = [opt.state[p]["step"].clone() for p in model.parameters()]
        with count_host_reads(fail=True):
            clip.step(model)
        opt.step()
        if t == 5:
            assert torch.isnan(model[0].weight.grad[0, 0])  # not scrubbed: the optimizer skipped instead
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
            assert all(torch.equal(opt.state[p]["step"], s) for p, s in zip(model.parameters(), steps_before))
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model[0].weight, make_model()[0].weight)  # other steps did update


def test_jsonl_log_interval(tmp_path):
    import json

    path = tmp_path / "sub" / "zclip.jsonl"
    model = make_model()
    zc = ZClip(warmup_steps=3, log_jsonl=str(path), log_interval=4)
    for t, x, y in batches(10, spike_at=7):  # the 8th step: a logged one
        backward(model, x, y)
        zc.step(model)
    header, *lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert header["method"] == "zclip" and header["settings"]["log_interval"] == 4
    assert [r["step"] for r in lines] == [4, 8]  # every 4th step
    assert lines[1]["spike"] and lines[1]["coef"] < 1 and lines[1]["grad_norm"] > lines[0]["grad_norm"]


def test_step_without_gradients_raises_and_leaves_the_statistics():
    """The reference fills its warmup with zeros here and then scales every later gradient to 0."""
    data = list(batches(8, spike_at=6))
    model, ref_model = make_model(), make_model()
    zc, ref = ZClip(warmup_steps=3, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)), ZClip(warmup_steps=3)
    with pytest.raises(RuntimeError, match=r"found no gradients .*after loss.backward\(\)"):
        zc.step(model)  # before any backward
    assert zc.clipper.state is None
    for t, x, y in data:
        backward(model, x, y)
        backward(ref_model, x, y)
        zc.step(model)
        ref.step(ref_model)
        assert repr(zc.metrics()) == repr(ref.metrics())  # repr: NaN (z in warmup) equals NaN
    assert zc.metrics()["coef"] < 1.0 and zc.metrics()["num_spikes"] == 1


@pytest.mark.parametrize("other", [torch.float64, torch.bfloat16])
def test_gradients_of_several_dtypes(other):
    """fp32 with fp64 accumulates in fp64 (the norm clip_grad_norm_ gives), fp32 with bf16 in fp32."""
    model = make_model()
    model[3].to(other)
    _, x, y = next(batches(1))
    out = model[3](model[:3](x).to(other))
    nn.functional.mse_loss(out.float(), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    expected = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads]))
    zc = ZClip(max_grad_norm=0.01, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    norm = zc.step(model)
    assert norm.dtype == (torch.float64 if other == torch.float64 else torch.float32)
    torch.testing.assert_close(norm.double(), expected, rtol=1e-12 if other == torch.float64 else 1e-6, atol=0)
    if other == torch.float64:
        reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
        for r, g in zip(reference, grads):
            r.grad = g.clone()
        # clip_grad_norm_ takes the fp32 tensors' norms in fp32 before promoting: equal to ~1e-9
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(reference, 0.01), rtol=1e-7, atol=0)
    coef = zc.metrics()["coef"]
    assert coef < 1
    for p, g in zip(model.parameters(), grads):  # each gradient scaled in its own dtype
        assert p.grad.dtype == g.dtype
        torch.testing.assert_close(p.grad, g * torch.tensor(coef, dtype=g.dtype), rtol=1e-2 if g.dtype == torch.bfloat16 else 1e-6, atol=0)


def test_one_tensor_as_clip_grad_norm_accepts():
    torch.manual_seed(0)
    w, ref = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(5, 3))
    w.grad = torch.randn(5, 3) * 10
    ref.grad = w.grad.clone()
    norm = ZClip(max_grad_norm=1.0, nonfinite="propagate").step(w)
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(ref, 1.0), rtol=1e-6, atol=0)
    torch.testing.assert_close(w.grad, ref.grad, rtol=1e-6, atol=0)


def test_sparse_gradient_is_a_one_line_error():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1))
    model(torch.tensor([1, 2, 2])).sum().backward()
    with pytest.raises(ValueError) as err:
        ZClip(nonfinite="propagate").step(model)
    msg = str(err.value)
    assert "'0.weight'" in msg and "sparse" in msg and "sparse=False" in msg and "\n" not in msg
