"""Run an unchanged DeepSpeed training script with ZClip or AdaGC: ``deepspeed.initialize`` attaches the
method named by the config's ``"zclip"`` or ``"adagc"`` entry.

    deepspeed --module zclip_dist.deepspeed.launch train.py [script args]
    torchrun --nproc_per_node N -m zclip_dist.deepspeed.launch train.py [script args]
    python -m zclip_dist.deepspeed.launch [-m package.module | train.py] [script args]   (mpirun, srun)

With zclip_dist installed this already happens without the module (``_zclip_dist_autoload``); the module
makes it explicit, and works with ``ZCLIP_DIST_AUTO=0`` or a zclip_dist that is only on ``PYTHONPATH``.
The script runs as ``__main__`` with ``sys.argv`` as if started directly. DeepSpeed's launcher puts
``--local_rank=N`` before the script name; it is moved behind it, where the script would have seen it.
Configs with neither entry train exactly as before.
"""

from __future__ import annotations

import os
import runpy
import sys

import deepspeed

import _zclip_dist_autoload

__all__ = ["install", "main"]


def install() -> None:
    """Make ``deepspeed.initialize`` attach ZClip / AdaGC (idempotent, whatever ``ZCLIP_DIST_AUTO`` says).
    Scripts that did ``from deepspeed import initialize`` before this call keep the original."""
    _zclip_dist_autoload.patch(deepspeed)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = []
    while argv and argv[0].startswith("--local_rank"):
        passthrough.append(argv.pop(0))
        if passthrough[-1] == "--local_rank" and argv:
            passthrough.append(argv.pop(0))
    if not argv:
        raise SystemExit("usage: python -m zclip_dist.deepspeed.launch [-m module | script.py] [args...]")
    install()
    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit("zclip_dist.deepspeed.launch: -m needs a module name")
        module, rest = argv[1], argv[2:]
        sys.argv = [module, *passthrough, *rest]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        script, rest = argv[0], argv[1:]
        sys.argv = [script, *passthrough, *rest]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script.py` would
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
