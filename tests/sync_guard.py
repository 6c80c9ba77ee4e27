"""Make any host read of a tensor value raise (or count it) for the duration of a block.

On CUDA ``torch.cuda.set_sync_debug_mode("error")`` catches syncs at the runtime level; on CPU there is
no device to wait for, so the Python entry points through which code reads a tensor value on the host
are patched instead: ``item``, ``tolist``, ``numpy``, ``__bool__``, ``__float__``, ``__int__``,
``__index__`` and ``__format__``-style conversions all go through these.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator

import torch

HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__")


@contextlib.contextmanager
def count_host_reads(*, fail: bool = False) -> Iterator[Counter]:
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def make(name):
        original = originals[name]

        def patched(self, *args, **kwargs):
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
