"""Lightning callback with the reference package's name: clips in ``on_before_optimizer_step``.

Lightning calls that hook after ``backward`` (and after unscaling under AMP) and before the optimizer
step, once per optimizer step, so gradient accumulation is handled by Lightning. A non-finite step is
skipped as in the drop-in: the trainer's optimizers are attached at ``on_fit_start``, and their
``step()`` -- which Lightning calls with the training closure, or through its GradScaler -- then leaves
the parameters and the optimizer state untouched. The ZClip state is saved in Lightning checkpoints
through the callback's ``state_dict``.
Spike-forensics events are read on the steps Lightning writes a row and go to every logger at the step
they happened (``zclip/event/*``).
"""

from __future__ import annotations

from typing import Any

try:
    import lightning as L
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("ZClipLightningCallback needs Lightning: pip install 'zclip-dist[lightning]'") from exc

from ..forensics import event_scalars
from ..metrics import METRIC_NAMES
from ..pytorch import ZClip

__all__ = ["ZClipLightningCallback"]


class ZClipLightningCallback(L.Callback):
    """``Trainer(callbacks=[ZClipLightningCallback(alpha=0.97, z_thresh=2.5)])``; arguments as :class:`ZClip`.

    Metrics are logged with ``pl_module.log`` under ``zclip/``; each row the logger writes (every
    ``log_every_n_steps`` steps) holds the values of the step it is written for.
    The events since the last written row (clipped, spike, non-finite steps, with the parameters and
    replicas that carried the norm) go to ``trainer.loggers`` as ``zclip/event/grad_norm``,
    ``zclip/event/param/<name>`` and ``zclip/event/replica/<index>`` at their own global step.
    """

    def __init__(self, *, log_metrics: bool = True, **zclip_kwargs: Any) -> None:
        super().__init__()
        self.zclip = ZClip(**zclip_kwargs)
        self.log_metrics = log_metrics
        self._events_due = False

    def on_fit_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        for optimizer in trainer.optimizers:
            self.zclip.attach_optimizer(optimizer)

    def on_before_optimizer_step(self, trainer: "L.Trainer", pl_module: "L.LightningModule", optimizer) -> None:
        if not any(p.grad is not None for p in pl_module.parameters()):
            return  # Lightning skipped the backward (training_step returned None): nothing to clip
        self.zclip.step(pl_module)
        if self.log_metrics and _row_written_after_this_step(trainer):
            # Device tensors, read by Lightning when it writes the row: no host read here. Only on those
            # steps: self.log costs about a millisecond per metric, and the latest value is what is written.
            values = self.zclip.clipper.metrics_tensor().unbind()
            for name, value in zip(METRIC_NAMES, values):
                pl_module.log(f"zclip/{name}", value, on_step=True, on_epoch=False)
            self._events_due = self.zclip._forensics is not None

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The events are read after the optimizer step of a step whose row is written (a step that reads
        # anyway), outside the clipping hook: one small transfer, none on the other steps.
        if self._events_due:
            self._events_due = False
            self._log_events(trainer, trainer.global_step - 1, int(self.zclip.clipper.state.steps))

    def on_train_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if self.log_metrics and self.zclip.last is not None:  # the events after the last log step
            self._log_events(trainer, trainer.global_step - 1, self.zclip.metrics()["step"])

    def _log_events(self, trainer: "L.Trainer", global_step: int, clipper_step: int) -> None:
        """Log each event read now at its own global step: ``global_step`` is the step whose clipper
        step count is ``clipper_step``."""
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


def _row_written_after_this_step(trainer: "L.Trainer") -> bool:
    """Will Lightning write a row of logged metrics at the end of this batch? Its own test, which counts
    the batches that stepped (not ``global_step``, which counts every optimizer's steps)."""
    return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)
