"""The plain-PyTorch front end: ``ZClip(...).step(model)`` / ``AdaGC(...).step(model)`` between
``loss.backward()`` and ``optimizer.step()``, for single process, DDP, FSDP2 / DTensor and explicit
TP/PP/DP groups. Also exported as ``from zclip_dist import ZClip, AdaGC``."""

from .dropin import AdaGC, ZClip

__all__ = ["ZClip", "AdaGC"]
