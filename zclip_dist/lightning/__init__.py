"""The Lightning front end: ``Trainer(callbacks=[ZClipLightningCallback(alpha=0.97)])``.

Needs the ``lightning`` extra; ``zclip_dist.ZClipLightningCallback`` imports it on first use."""

from .callback import ZClipLightningCallback

__all__ = ["ZClipLightningCallback"]
