"""Run Megatron-LM's stock training script with ``--zclip*`` or ``--adagc*`` flags, without editing Megatron-LM.

    torchrun --nproc-per-node 8 -m zclip_dist.megatron.launch $MEGATRON_LM_PATH/pretrain_gpt.py \\
        <Megatron-LM arguments> --zclip --zclip-z-thresh 2.5
    torchrun ... -m zclip_dist.megatron.launch pretrain_gpt.py <arguments> --adagc --adagc-clip-ratio 1.04

Works with the stock script of Megatron-LM core_v0.16.1 to core_v0.19.0 (megatron-core 0.16.1 to 0.19.2;
other megatron-core releases are refused by name before the script runs). What it patches before
running the script with ``runpy`` (docs/internals/megatron.md), all by name in the modules that look
them up at call time:

* ``megatron.training.arguments.parse_args`` -- called by ``parse_and_validate_args`` (the script's
  entry from core_v0.18.0 on) and by ``initialize_megatron`` before that, where ``initialize`` binds
  its own ``parse_args`` at import (patched too where it exists): chain
  :func:`zclip_dist.megatron.add_arguments` onto whatever ``extra_args_provider`` the script passes,
  then validate the ZClip / AdaGC settings at once, so a bad value (or ``--zclip`` with ``--adagc``)
  stops the run before any model is built, naming the flag;
* ``megatron.training.training.get_megatron_optimizer`` (and the Muon factory when present): wrap
  the returned optimizer when ``--zclip`` or ``--adagc`` is on (AdaGC keys gamma by the names of the
  model chunks the factory was given);
* ``megatron.training.training.training_log``: after Megatron's own logging, write the ``zclip/*`` or
  ``adagc/*`` metrics to its TensorBoard / W&B writers at ``--tensorboard-log-interval``.
"""

from __future__ import annotations

import functools
import os
import runpy
import sys
from typing import Any, Callable, Sequence

from .. import megatron as zmeg
from .intercept import UnsupportedMegatronCore

__all__ = ["install", "main", "TRAINING_INSTALL"]

#: What ``megatron.training`` imports beyond megatron-core (Megatron-LM has no package of its own).
TRAINING_INSTALL = "pip install six regex pyyaml pydantic triton"

_STATE: dict[str, Any] = {"installed": False}


def _chain_provider(provider: Callable | None) -> Callable:
    def both(parser):
        if provider is not None:
            parser = provider(parser) or parser
        # Not twice: a patched fork already has the flags (one patched before AdaGC has only --zclip*).
        present = {s for a in parser._actions for s in a.option_strings}
        missing = [m for m in ("zclip", "adagc") if f"--{m}" not in present]
        if missing:
            zmeg.add_arguments(parser, methods=missing)
        return parser
    return both


def _patched_parse_args(original: Callable) -> Callable:
    @functools.wraps(original)
    def parse_args(extra_args_provider=None, ignore_unknown_args=False, *args, **kwargs):
        parsed = original(_chain_provider(extra_args_provider), ignore_unknown_args, *args, **kwargs)
        if zmeg.clipping_enabled(parsed):
            try:
                zmeg.clipping_config(parsed)  # fail before training, naming the flag
            except ValueError as err:
                print(f"zclip_dist.megatron.launch: error: {err}", file=sys.stderr)
                raise SystemExit(2) from None
        return parsed
    return parse_args


def _patched_factory(original: Callable) -> Callable:
    @functools.wraps(original)
    def factory(*args, **kwargs):
        optimizer = original(*args, **kwargs)
        from megatron.training.global_vars import get_args

        margs = get_args()
        config = zmeg.clipping_config(margs)
        if config is not None:
            # get_megatron_optimizer(config, model_chunks, ...): the chunks name AdaGC's tensors.
            model = kwargs.get("model_chunks", args[1] if len(args) > 1 else None)
            optimizer = zmeg.wrap_optimizer(optimizer, config, model=model, forensics=zmeg.forensics_config(margs))
        return optimizer
    return factory


def _patched_training_log(original: Callable) -> Callable:
    @functools.wraps(original)
    def training_log(*args, **kwargs):
        result = original(*args, **kwargs)
        from megatron.training.global_vars import (
            get_args,
            get_tensorboard_writer,
            get_wandb_writer,
        )

        margs = get_args()
        if zmeg.clipping_enabled(margs):
            # Same condition as Megatron's own TensorBoard block in training_log; writers exist on the last rank only.
            iteration = kwargs.get("iteration", args[3] if len(args) > 3 else None)
            interval = getattr(margs, "tensorboard_log_interval", 1) or 1
            if iteration is not None and iteration % interval == 0:
                zmeg.log_metrics(zmeg.attached_optimizer(), iteration, get_tensorboard_writer(), get_wandb_writer())
        return result
    return training_log


def install() -> None:
    """Patch Megatron-LM's argument parsing, optimizer factory and training log (idempotent).

    Raises :class:`~zclip_dist.megatron.intercept.UnsupportedMegatronCore` for a megatron-core outside
    the supported range, before anything is patched.
    """
    if _STATE["installed"]:
        return
    from .intercept import check_core_version

    check_core_version()
    import megatron.training.arguments as arguments
    import megatron.training.initialize as initialize
    import megatron.training.training as training

    for module in (arguments, initialize):  # initialize binds its own name up to core_v0.17
        if hasattr(module, "parse_args"):
            module.parse_args = _patched_parse_args(module.parse_args)
    for name in ("get_megatron_optimizer", "get_megatron_muon_optimizer"):
        if hasattr(training, name):
            setattr(training, name, _patched_factory(getattr(training, name)))
    training.training_log = _patched_training_log(training.training_log)
    _STATE["installed"] = True


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    script = os.path.abspath(argv[0])
    if not os.path.isfile(script):
        raise SystemExit(f"zclip_dist.megatron.launch: {script} not found (point it at Megatron-LM's pretrain_gpt.py)")
    # The script's directory is the Megatron-LM checkout: megatron.training, gpt_builders, model_provider.
    sys.path.insert(0, os.path.dirname(script))
    try:
        install()
    except ImportError as err:
        raise SystemExit(f"zclip_dist.megatron.launch: cannot import megatron.training from {os.path.dirname(script)} "
                         f"({err}); it needs a Megatron-LM checkout and: {TRAINING_INSTALL}") from None
    except UnsupportedMegatronCore as err:
        raise SystemExit(f"zclip_dist.megatron.launch: {err}") from None
    sys.argv = [script] + argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
