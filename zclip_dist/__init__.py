"""zclip_dist: ZClip and AdaGC adaptive gradient clipping, exact under tensor/pipeline/data/expert parallelism.

Front ends, one subpackage each: :mod:`zclip_dist.pytorch` (``ZClip(...).step(model)``, also exported
here), :mod:`zclip_dist.lightning` (``ZClipLightningCallback``), :mod:`zclip_dist.deepspeed` (a
``"zclip"`` / ``"adagc"`` DeepSpeed config entry) and :mod:`zclip_dist.megatron` (``--zclip*`` /
``--adagc*`` flags). The engine subpackages are imported on first attribute access, so ``import
zclip_dist`` never imports DeepSpeed, Megatron or Lightning.
"""

import importlib
from typing import Any

from ._version import __version__
from .clipper import Clipper
from .config import AdaGCConfig, ConfigError, ForensicsConfig, ZClipConfig
from .pytorch import AdaGC, ZClip
from .topology import Topology

__all__ = ["ZClip", "AdaGC", "AdaGCConfig", "ZClipConfig", "ForensicsConfig", "ConfigError", "Clipper", "Topology",
           "ZClipLightningCallback", "__version__"]

# Optional front ends: importing them needs their engine, so they load on first use only.
_LAZY_SUBMODULES = ("deepspeed", "megatron", "lightning")


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name == "ZClipLightningCallback":
        from .lightning import ZClipLightningCallback

        return ZClipLightningCallback
    raise AttributeError(f"module 'zclip_dist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY_SUBMODULES, "ZClipLightningCallback"])
