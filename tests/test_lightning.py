"""ZClipLightningCallback with a real Lightning Trainer on CPU, against the reference package's callback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")
from zclip.zclip_lightning_callback import ZClipLightningCallback as ReferenceCallback  # noqa: E402

from zclip_dist import ZClipLightningCallback  # noqa: E402
from zclip_dist.metrics import METRIC_NAMES  # noqa: E402

from .sync_guard import count_host_reads  # noqa: E402
from .test_skip import assert_same  # noqa: E402

CFG = dict(max_grad_norm=None, warmup_steps=5)


class Tiny(L.LightningModule):
    def __init__(self, make_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05)):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.make_optimizer = make_optimizer

    def training_step(self, batch, idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


def loader():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(80, 4, generator=gen)
    y = torch.randn(80, 1, generator=gen)
    y[56:64] *= 60.0  # one corrupted batch: a spike at steps 7 and 17 (10 steps per epoch)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def fit(callback, max_steps=20, ckpt_path=None, tmp_path=None, model=None, data=None, **trainer_kwargs):
    model = model or Tiny()
    kwargs = dict(logger=False, log_every_n_steps=1, **trainer_kwargs)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[callback], accelerator="cpu", devices=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, **kwargs)
    trainer.fit(model, data or loader(), ckpt_path=ckpt_path)
    return model, trainer


def test_callback_matches_reference_callback(tmp_path):
    ours, _ = fit(ZClipLightningCallback(**CFG), tmp_path=tmp_path)
    ref, _ = fit(ReferenceCallback(**CFG), tmp_path=tmp_path)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    unclipped, _ = fit(L.Callback(), tmp_path=tmp_path)  # sanity: the spike step does change the outcome
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(ours.parameters(), unclipped.parameters()))


def test_callback_state_in_lightning_checkpoint(tmp_path):
    """The ZClip state travels in Lightning's checkpoint: restored bitwise, then training continues from it.

    (Lightning's own mid-run resume of this loader is not step-exact even without a callback, so the
    decision-level resume equivalence is tested on the drop-in in test_dropin.py.)
    """
    first_cb = ZClipLightningCallback(**CFG)
    _, trainer = fit(first_cb, max_steps=10, tmp_path=tmp_path)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    restored_cb = ZClipLightningCallback(**CFG)
    fit(restored_cb, max_steps=10, ckpt_path=str(tmp_path / "half.ckpt"), tmp_path=tmp_path)  # no new steps
    assert int(first_cb.zclip.clipper.state.num_spikes) >= 1
    for x, y in zip(first_cb.zclip.clipper.state, restored_cb.zclip.clipper.state):
        assert torch.equal(x, y)
    continued_cb = ZClipLightningCallback(**CFG)
    fit(continued_cb, max_steps=15, ckpt_path=str(tmp_path / "half.ckpt"), tmp_path=tmp_path)
    assert int(continued_cb.zclip.clipper.state.steps) == 15  # counted on from 10, no new warmup
    assert not bool(continued_cb.zclip.last.warmup)


@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),  # skipped by a host read
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),  # skipped on the device (found_inf)
], ids=["SGD momentum", "AdamW fused"])
def test_skipped_step_is_as_if_the_batch_was_never_seen(tmp_path, make_optimizer):
    """Lightning calls optimizer.step(closure) and clips inside the closure: the step is skipped all the same."""
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(48, 4, generator=gen), torch.randn(48, 1, generator=gen)
    x[0, 0], x[28, 1] = float("nan"), float("inf")  # batches 0 and 3 (of 8 samples) are bad
    good = torch.ones(48, dtype=torch.bool)
    good[:8] = good[24:32] = False

    def data(mask):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[mask], y[mask]), batch_size=8)

    seen_cb = ZClipLightningCallback(warmup_steps=2, log_metrics=False)
    seen, trainer = fit(seen_cb, max_steps=-1, max_epochs=1, model=Tiny(make_optimizer),
                        data=data(torch.ones(48, dtype=torch.bool)), tmp_path=tmp_path)
    never, ref_trainer = fit(ZClipLightningCallback(warmup_steps=2, log_metrics=False), max_steps=-1, max_epochs=1,
                             model=Tiny(make_optimizer), data=data(good), tmp_path=tmp_path)
    assert int(seen_cb.zclip.clipper.state.num_nonfinite) == 2
    assert_same([p.detach() for p in seen.parameters()], [p.detach() for p in never.parameters()], "parameters")
    assert_same(trainer.optimizers[0].state_dict(), ref_trainer.optimizers[0].state_dict(), "optimizer state")


class Recorder(L.Callback):
    """After the ZClip callback, every step: the metrics of that step (host reads here are the test's)."""

    def __init__(self, zclip_callback):
        self.zclip_callback, self.by_step = zclip_callback, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.by_step[trainer.global_step] = self.zclip_callback.zclip.metrics()


class SyncFreeCallback(ZClipLightningCallback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        with count_host_reads(fail=True):
            super().on_before_optimizer_step(trainer, pl_module, optimizer)


class SkipsOneBatch(Tiny):
    def training_step(self, batch, idx):
        return None if idx == 2 else super().training_step(batch, idx)  # Lightning: no backward, nothing to clip


def test_logged_rows_hold_their_own_step_and_no_host_read_between(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    callback = SyncFreeCallback(**CFG)
    recorder = Recorder(callback)
    model = SkipsOneBatch()
    trainer = L.Trainer(max_steps=20, callbacks=[callback, recorder], accelerator="cpu", devices=1,
                        logger=CSVLogger(tmp_path), log_every_n_steps=5, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader())
    with open(trainer.logger.experiment.metrics_file_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("zclip/grad_norm")]
    assert [int(r["step"]) for r in rows] == [4, 9, 14, 19]
    for r in rows:
        expected = recorder.by_step[int(r["step"])]
        for name in METRIC_NAMES:
            assert float(r[f"zclip/{name}"]) == pytest.approx(float(expected[name]), rel=1e-6, nan_ok=True), (r["step"], name)
    assert int(callback.zclip.clipper.state.steps) == 18  # batch 2 of each epoch had nothing to clip


class _Capture(L.pytorch.loggers.Logger):
    name, version = "capture", 0

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def experiment(self):
        return None

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_events_reach_the_loggers_at_their_step(tmp_path):
    logger = _Capture()
    seen = []
    model = Tiny()
    trainer = L.Trainer(max_steps=20, callbacks=[ZClipLightningCallback(**CFG, on_event=seen.append)],
                        accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=5,
                        default_root_dir=tmp_path)
    trainer.fit(model, loader())
    events = {step: m for step, m in logger.rows if "zclip/event/grad_norm" in m}
    assert {7, 17} <= set(events) and [e.step - 1 for e in seen] == sorted(events)  # clipper steps count from 1
    for step, m in events.items():
        shares = [v for k, v in m.items() if k.startswith("zclip/event/param/net.")]
        assert len(shares) == 3 and 0 < sum(shares) <= 1 + 1e-6
        assert m["zclip/event/grad_norm"] > 0
