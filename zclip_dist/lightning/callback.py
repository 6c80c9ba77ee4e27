"""Lightning callback with the reference package's name: clips in ``on_before_optimizer_step``.

Lightning calls that hook after ``backward`` (and after unscaling under AMP) and before the optimizer
step, once per optimizer step, so gradient accumulation is handled by Lightning. The ZClip state is
saved in Lightning checkpoints through the callback's ``state_dict``.
"""

from __future__ import annotations

from typing import Any

try:
    import lightning as L
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("ZClipLightningCallback needs Lightning: pip install 'zclip-dist[lightning]'") from exc

from ..pytorch import ZClip

__all__ = ["ZClipLightningCallback"]


class ZClipLightningCallback(L.Callback):
    """``Trainer(callbacks=[ZClipLightningCallback(alpha=0.97, z_thresh=2.5)])``; arguments as :class:`ZClip`.

    Metrics are logged with ``pl_module.log`` under ``zclip/`` every ``log_every_n_steps`` steps.
    """

    def __init__(self, *, log_metrics: bool = True, **zclip_kwargs: Any) -> None:
        super().__init__()
        self.zclip = ZClip(**zclip_kwargs)
        self.log_metrics = log_metrics

    def on_before_optimizer_step(self, trainer: "L.Trainer", pl_module: "L.LightningModule", optimizer) -> None:
        self.zclip.step(pl_module)
        if self.log_metrics and trainer.log_every_n_steps and trainer.global_step % trainer.log_every_n_steps == 0:
            for name, value in self.zclip.metrics().items():
                pl_module.log(f"zclip/{name}", float(value), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return self.zclip.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.zclip.load_state_dict(state_dict)

    def on_load_checkpoint(self, trainer: "L.Trainer", pl_module: "L.LightningModule", checkpoint: dict[str, Any]) -> None:
        # Lightning calls load_state_dict only when the checkpoint holds this callback's entry: without
        # one (a run that had no ZClip) it would start from warmup silently.
        if self.state_key not in checkpoint.get("callbacks", {}):
            self.zclip.load_state_dict(None)
