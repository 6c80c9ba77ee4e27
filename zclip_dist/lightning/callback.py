"""Lightning callback with the reference package's name: clips in ``on_before_optimizer_step``.

Lightning calls that hook after ``backward`` (and after unscaling under AMP) and before the optimizer
step, once per optimizer step, so gradient accumulation is handled by Lightning. The ZClip state is
saved in Lightning checkpoints through the callback's ``state_dict``. Spike-forensics events are read on
log steps and go to every logger at the step they happened (``zclip/event/*``).
"""

from __future__ import annotations

from typing import Any

try:
    import lightning as L
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("ZClipLightningCallback needs Lightning: pip install 'zclip-dist[lightning]'") from exc

from ..forensics import event_scalars
from ..pytorch import ZClip

__all__ = ["ZClipLightningCallback"]


class ZClipLightningCallback(L.Callback):
    """``Trainer(callbacks=[ZClipLightningCallback(alpha=0.97, z_thresh=2.5)])``; arguments as :class:`ZClip`.

    Metrics are logged with ``pl_module.log`` under ``zclip/`` every ``log_every_n_steps`` steps; the
    events since the last log step (clipped, spike, non-finite steps, with the parameters and replicas
    that carried the norm) go to ``trainer.loggers`` as ``zclip/event/grad_norm``,
    ``zclip/event/param/<name>`` and ``zclip/event/replica/<index>`` at their own global step.
    """

    def __init__(self, *, log_metrics: bool = True, **zclip_kwargs: Any) -> None:
        super().__init__()
        self.zclip = ZClip(**zclip_kwargs)
        self.log_metrics = log_metrics

    def on_before_optimizer_step(self, trainer: "L.Trainer", pl_module: "L.LightningModule", optimizer) -> None:
        self.zclip.step(pl_module)
        if self.log_metrics and trainer.log_every_n_steps and trainer.global_step % trainer.log_every_n_steps == 0:
            metrics = self.zclip.metrics()
            for name, value in metrics.items():
                pl_module.log(f"zclip/{name}", float(value), on_step=True, on_epoch=False)
            self._log_events(trainer, trainer.global_step, metrics["step"])

    def on_train_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if self.log_metrics and self.zclip.last is not None:  # the events after the last log step
            self._log_events(trainer, trainer.global_step - 1, self.zclip.metrics()["step"])

    def _log_events(self, trainer: "L.Trainer", global_step: int, clipper_step: int) -> None:
        """Read the events (one small transfer, on a step that reads anyway) and log each at its own
        global step: ``global_step`` is the step whose clipper step count is ``clipper_step``."""
        for event in self.zclip.events():
            for logger in trainer.loggers:
                logger.log_metrics(event_scalars(event), step=global_step - (clipper_step - event.step))

    def state_dict(self) -> dict[str, Any]:
        return self.zclip.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.zclip.load_state_dict(state_dict)

    def on_load_checkpoint(self, trainer: "L.Trainer", pl_module: "L.LightningModule", checkpoint: dict[str, Any]) -> None:
        # Lightning calls load_state_dict only when the checkpoint holds this callback's entry: without
        # one (a run that had no ZClip) it would start from warmup silently.
        if self.state_key not in checkpoint.get("callbacks", {}):
            self.zclip.load_state_dict(None)
