"""Test-only CPU shim for megatron-core 0.16.1's CUDA calls. Never imported by the package.

megatron-core hard-codes CUDA in places a CPU/gloo test run passes through (``device='cuda'`` tensors
in ``clip_grads.py``, ``torch.cuda.current_device()`` in the DDP buffers, CUDA RNG state in the RNG
tracker, ``.type() == 'torch.cuda.FloatTensor'`` asserts; docs/internals/megatron.md). ``apply()``
redirects exactly four things, inside one process (call it first thing in each spawned worker):

1. tensor factories that name a CUDA device (string, index or ``torch.device``) allocate on CPU;
2. the ``torch.cuda`` runtime calls along the way become inert stand-ins;
3. CUDA seeding and RNG state map to the CPU generator (Megatron's own setter included);
4. ``.cuda()`` is the identity, ``.to(cuda)`` goes to CPU, and an argument-less ``.type()`` reports
   ``torch.cuda.*Tensor`` for CPU tensors.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_APPLIED = False

_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
              "as_tensor", "empty_strided", "zeros_like", "ones_like", "empty_like", "full_like",
              "rand_like", "randn_like", "linspace", "eye")


def _is_cuda(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # a bare index means a CUDA ordinal
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _cpu_device(kwargs: dict) -> dict:
    if _is_cuda(kwargs.get("device")):
        kwargs["device"] = "cpu"
    return kwargs


def _factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **_cpu_device(kwargs))
    return wrapper


class _Inert:
    """Stands in for CUDA streams and events: every method is a no-op."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __getattr__(self, name):
        return lambda *a, **k: 0.0 if name == "elapsed_time" else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Device:
    """What Megatron-LM reads of the device properties (it branches on the architecture: Hopper here)."""

    name, major, minor, total_memory, multi_processor_count = "cpu (megatron_cpu_shim)", 9, 0, 2**34, 1


_DEVICE = _Device()


def _patch_factories() -> None:
    for name in _FACTORIES:
        setattr(torch, name, _factory(getattr(torch, name)))


def _patch_runtime() -> None:
    cuda = torch.cuda

    # A fresh function per name: torch._dynamo rejects one object registered under two torch names.
    def noop():
        return lambda *a, **k: None

    def zero():
        return lambda *a, **k: 0

    for name in ("set_device", "synchronize", "empty_cache", "reset_peak_memory_stats",
                 "reset_max_memory_allocated", "init", "_lazy_init"):
        setattr(cuda, name, noop())
    for name in ("current_device", "memory_allocated", "max_memory_allocated", "memory_reserved",
                 "max_memory_reserved"):
        setattr(cuda, name, zero())
    cuda.device_count = lambda: 1
    cuda.Stream = _Inert
    cuda.Event = _Inert
    cuda.current_stream = lambda *a, **k: _Inert()
    cuda.default_stream = lambda *a, **k: _Inert()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.device = lambda *a, **k: contextlib.nullcontext()
    cuda.nvtx.range_push = noop()
    cuda.nvtx.range_pop = noop()
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()
    cuda.memory_stats = lambda *a, **k: {}
    cuda.get_device_properties = lambda *a, **k: _DEVICE
    cuda.get_device_capability = lambda *a, **k: (_DEVICE.major, _DEVICE.minor)
    cuda.get_device_name = lambda *a, **k: _DEVICE.name


def _patch_rng() -> None:
    cpu_get = torch.get_rng_state
    cpu_set = torch.set_rng_state
    get = lambda *a, **k: cpu_get()  # noqa: E731
    for mod in (torch.cuda, torch.cuda.random):
        mod.get_rng_state = get
        mod.set_rng_state = lambda state, *a, **k: cpu_set(state)
        # The CPU generator directly: torch.manual_seed itself calls torch.cuda.manual_seed_all.
        mod.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
        mod.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: cpu_get().clone()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: cpu_set(state)


def _patch_tensor_methods() -> None:
    tensor_to, tensor_type, module_to = torch.Tensor.to, torch.Tensor.type, torch.nn.Module.to

    def to(self, *args, **kwargs):
        if args and _is_cuda(args[0]):
            args = ("cpu",) + args[1:]
        return tensor_to(self, *args, **_cpu_device(kwargs))

    def type_(self, *args, **kwargs):
        if args or kwargs:
            return tensor_type(self, *args, **kwargs)
        name = tensor_type(self)
        return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name

    def module_to_(self, *args, **kwargs):
        if args and _is_cuda(args[0]):
            args = ("cpu",) + args[1:]
        return module_to(self, *args, **_cpu_device(kwargs))

    torch.Tensor.to = to
    torch.Tensor.type = type_
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.to = module_to_
    torch.nn.Module.cuda = lambda self, *a, **k: self


def apply() -> None:
    """Install the shim in this process (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    _patch_factories()
    _patch_runtime()
    _patch_rng()
    _patch_tensor_methods()
    _APPLIED = True
