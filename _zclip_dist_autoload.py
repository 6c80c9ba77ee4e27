"""Make every ``deepspeed.initialize`` in this Python environment honour a ``"zclip"`` / ``"adagc"`` entry.

zclip_dist installs ``zclip_dist_autoload.pth`` next to this module; Python's ``site`` runs it at start-up.
Importing this module costs microseconds and imports nothing but ``os`` and ``sys`` (both already
loaded): it puts a finder at the front of ``sys.meta_path`` that waits for ``deepspeed``. Once DeepSpeed's
``__init__`` has run, ``deepspeed.initialize`` is replaced by a function that calls
``zclip_dist.deepspeed.initialize`` (DeepSpeed's own initialize, then ZClip or AdaGC when the config has an
entry; any other config passes through untouched). The swap happens before a script's ``from deepspeed
import initialize`` can bind the old name, so unchanged scripts, HF Trainer and Accelerate (which look the
name up when they call it) and every launcher get it.

``ZCLIP_DIST_AUTO=0`` turns it off; ``zclip_dist.deepspeed.initialize`` / ``attach`` and ``python -m
zclip_dist.deepspeed.launch`` still work. Not covered: ``python -S``, and a zclip_dist that is only on
``PYTHONPATH`` (no ``pip install``), since ``site`` reads ``.pth`` files in site-packages only.

A top-level module, not part of the ``zclip_dist`` package: importing that package imports torch, which
every Python process would then pay for at start-up.
"""

import os
import sys

ENV = "ZCLIP_DIST_AUTO"
_MARK = "__zclip_dist__"  # set on the replacement: patching twice is a no-op


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def patch(module) -> None:
    """Replace ``module.initialize`` (the ``deepspeed`` module); DeepSpeed's own stays reachable as
    ``module._zclip_dist_original_initialize``. Idempotent."""
    import functools

    original = module.initialize
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def initialize(*args, **kwargs):
        from zclip_dist.deepspeed import initialize as initialize_with_clipping

        return initialize_with_clipping(*args, **kwargs)

    setattr(initialize, _MARK, True)
    module._zclip_dist_original_initialize = original
    module.initialize = initialize


class _PatchAfterExec:
    """Loader proxy: runs the real loader, then :func:`patch`."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self._loader  # resources and reloads see the real one
        self._loader.exec_module(module)
        patch(module)


class _DeepSpeedFinder:
    """Meta-path finder for ``deepspeed`` only: the other finders locate it, the loader gets wrapped."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "deepspeed":
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchAfterExec(spec.loader)
                return spec
        return None


def install() -> None:
    """Patch ``deepspeed`` now if it is imported, else when it is (unless ``ZCLIP_DIST_AUTO=0``)."""
    if not enabled():
        return
    module = sys.modules.get("deepspeed")
    if module is not None and hasattr(module, "initialize"):
        patch(module)
    elif not any(isinstance(f, _DeepSpeedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeepSpeedFinder())


install()
