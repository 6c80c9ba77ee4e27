"""Make any host read of a tensor value raise (or count it) for the duration of a block.

On CUDA ``torch.cuda.set_sync_debug_mode("error")`` catches syncs at the runtime level; on CPU there is
no device to wait for, so the Python entry points through which code reads a tensor value on the host
are patched instead: ``item``, ``tolist``, ``numpy``, ``__bool__``, ``__float__``, ``__int__``,
``__index__`` and ``__format__``-style conversions all go through these. Reads made by
:func:`zclip_dist.clipper.host_value` and ``host_list`` (which refuse accelerator tensors) are not counted.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from typing import Iterator

import torch

from zclip_dist.clipper import host_list, host_value

# Reads of CPU-resident values (clipper state, results of gloo collectives): host memory, not a device sync.
_HOST_READERS = (host_value.__code__, host_list.__code__)

HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__")


@contextlib.contextmanager
def count_host_reads(*, fail: bool = False) -> Iterator[Counter]:
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def make(name):
        original = originals[name]

        def patched(self, *args, **kwargs):
            if sys._getframe(1).f_code in _HOST_READERS:
                return original(self, *args, **kwargs)
            counts[name] += 1
            if fail:
                raise AssertionError(f"host sync: Tensor.{name}() called in a sync-free region")
            return original(self, *args, **kwargs)

        return patched

    for name in HOST_READS:
        setattr(torch.Tensor, name, make(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
