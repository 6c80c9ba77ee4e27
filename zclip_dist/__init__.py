"""zclip_dist: ZClip and AdaGC adaptive gradient clipping, exact under tensor/pipeline/data/expert parallelism.

Front ends: ``ZClip(...).step(model)`` for plain PyTorch, ``ZClipLightningCallback`` for Lightning,
``zclip_dist.deepspeed`` for a ``"zclip"`` DeepSpeed config entry, ``zclip_dist.megatron`` for
``--zclip*`` flags.
"""

from .clipper import Clipper
from .config import AdaGCConfig, ConfigError, ZClipConfig
from .integrations.torch import AdaGC, ZClip
from .topology import Topology

__version__ = "0.1.0"

__all__ = ["ZClip", "AdaGC", "AdaGCConfig", "ZClipConfig", "ConfigError", "Clipper", "Topology", "ZClipLightningCallback", "__version__"]


def __getattr__(name: str):
    if name == "ZClipLightningCallback":  # Lightning is optional: import on first use only
        from .integrations.lightning import ZClipLightningCallback

        return ZClipLightningCallback
    raise AttributeError(f"module 'zclip_dist' has no attribute {name!r}")
