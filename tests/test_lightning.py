"""ZClipLightningCallback with a real Lightning Trainer on CPU, against the reference package's callback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")
from zclip.zclip_lightning_callback import ZClipLightningCallback as ReferenceCallback  # noqa: E402

from zclip_dist import ZClipLightningCallback  # noqa: E402

CFG = dict(max_grad_norm=None, warmup_steps=5)


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.norms = []

    def training_step(self, batch, idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_before_optimizer_step(self, optimizer):
        self.norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.parameters()])).item())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(80, 4, generator=gen)
    y = torch.randn(80, 1, generator=gen)
    y[56:64] *= 60.0  # one corrupted batch: a spike at steps 7 and 17 (10 steps per epoch)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def fit(callback, max_steps=20, ckpt_path=None, tmp_path=None):
    model = Tiny()
    trainer = L.Trainer(max_steps=max_steps, callbacks=[callback], accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, default_root_dir=tmp_path)
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
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
