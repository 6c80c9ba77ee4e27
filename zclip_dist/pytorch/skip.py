"""The true skip of a non-finite step: the optimizer's update is not applied and its state is untouched.

Zeroing the gradients is no skip: SGD's momentum, Adam's moments and step count, and weight decay all
still move the weights. ``torch.amp.GradScaler`` meets the same problem, and :class:`StepGate` solves it
the same two ways, on the optimizer instance, so that the ``optimizer.step()`` the user (or GradScaler,
or Lightning) already calls is the call that skips:

* an optimizer that takes GradScaler's on-device flag (``_step_supports_amp_scaling``: the fused Adam,
  AdamW, SGD and Adagrad) is handed ``found_inf`` for the call, and its kernel skips on the device: no
  host read;
* any other optimizer -- for-loop and foreach forms, RMSprop, one torch has never heard of -- is simply
  not called when the flag is set: one host read of the flag per ``step()``, as GradScaler's
  ``_maybe_opt_step``. A fused optimizer takes this path too until it has run once: its first step
  creates the state before the kernel looks at ``found_inf`` (fused SGD's momentum buffer would hold
  uninitialised memory).
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["StepGate"]


class StepGate:
    """Wraps ``optimizer.step`` (on the instance, as ``LRScheduler`` does) to skip it when armed.

    :meth:`arm` hands over the skip flag of the step about to be applied (a 0-d bool device tensor);
    the next ``optimizer.step()`` consumes it. A step with nothing armed runs as usual. A closure is
    evaluated first (it may be where the clipper runs, as in Lightning) and its loss returned either way.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.pending: Tensor | None = None
        self.device_skip = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        # Resumed optimizers already have their state; Adagrad creates it in its constructor.
        self._ran = len(optimizer.state) > 0
        original = optimizer.step
        gate = self

        # A bound method, like the one it replaces: LRScheduler re-wraps ``step.__func__``; wraps()
        # carries its ``_wrapped_by_lr_sched`` mark over when the scheduler came first.
        @functools.wraps(getattr(original, "__func__", original))
        def step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            return gate._step(original, args, kwargs)

        optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]

    def arm(self, skipped: Tensor) -> None:
        self.pending = skipped

    def _step(self, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        loss = None
        closure = kwargs.get("closure", args[0] if args else None)
        if callable(closure):
            with torch.enable_grad():
                loss = closure()
            # Every torch optimizer but LBFGS evaluates the closure once, first: hand it the result.
            if "closure" in kwargs:
                kwargs = {**kwargs, "closure": lambda: loss}
            else:
                args = (lambda: loss, *args[1:])
        pending, self.pending = self.pending, None
        if pending is None:
            return self._run(original, args, kwargs)
        if self.device_skip and self._ran:
            return self._run_flagged(original, args, kwargs, pending)
        if bool(pending):  # the one host read of this path (GradScaler reads found_inf the same way)
            return loss
        return self._run(original, args, kwargs)

    def _run(self, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        out = original(*args, **kwargs)
        self._ran = True
        return out

    def _run_flagged(self, original: Callable[..., Any], args: tuple, kwargs: dict, pending: Tensor) -> Any:
        opt = self.optimizer
        flag = pending.to(torch.float32)
        previous = getattr(opt, "found_inf", None)  # GradScaler's, when it drives this step
        opt.found_inf = flag if previous is None else torch.maximum(previous, flag.to(previous.device))
        try:
            return original(*args, **kwargs)
        finally:
            if previous is None:
                del opt.found_inf
            else:
                opt.found_inf = previous
