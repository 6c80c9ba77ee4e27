"""Test-only stand-in for ``triton``, put on PYTHONPATH of Megatron test subprocesses by
tests/megatron_versions.py when the real package is missing (a large download; CPU runs launch no kernel).

megatron-core 0.19 and ``megatron.training`` import modules that define Triton kernels at import time (``@triton.jit``,
``tl.constexpr`` annotations). Here every name is a placeholder that can be called, used as a decorator,
indexed or annotated with; launching a kernel raises, so a CPU test can never silently pass through one.
"""

from __future__ import annotations

import sys
import types

__version__ = "0.0.0+zclip-dist-test-stand-in"


class _Placeholder:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return f"<triton stand-in {self._name}>"

    def __getattr__(self, name: str) -> "_Placeholder":
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self._name}.{name}")

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return _Kernel(args[0])  # @triton.jit, @triton.autotune(...)(fn), ...
        return _Placeholder(f"{self._name}(...)")  # triton.jit(**options), triton.Config(...), tl.dtype

    def __getitem__(self, item) -> "_Placeholder":
        return _Placeholder(f"{self._name}[...]")

    def __or__(self, other):  # annotations such as ``tl.constexpr | None``
        return self

    __ror__ = __or__


class _Kernel:
    def __init__(self, fn) -> None:
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.__doc__ = getattr(fn, "__doc__", None)

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"triton stand-in: kernel {self.__name__} cannot run (install triton for GPU runs)")

    def __getattr__(self, name: str) -> _Placeholder:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self.__name__}.{name}")


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    value = _stand_in(f"triton.{name}")
    globals()[name] = value
    return value


class _Module(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _stand_in(f"{self.__name__}.{name}")
        setattr(self, name, value)  # the same object on every lookup (isinstance checks, registries)
        return value


class _Object:
    """Base of the stand-in classes (``JITFunction``, ``Config``...): any arguments, no behaviour."""

    def __init__(self, *args, **kwargs) -> None:
        pass


def _stand_in(qualname: str):
    """A class for CapWords names (``isinstance`` checks against them must work), else a placeholder."""
    name = qualname.rsplit(".", 1)[-1]
    if name[:1].isupper():
        return type(name, (_Object,), {"__module__": qualname.rsplit(".", 1)[0]})
    return _Placeholder(qualname)


class _Finder:
    """Any ``triton.<sub>`` import (``triton.runtime``, ``triton.language.extra``...) gets a placeholder module."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        if not fullname.startswith("triton."):
            return None
        import importlib.machinery

        return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=True)


class _Loader:
    @staticmethod
    def create_module(spec):
        module = _Module(spec.name)
        module.__path__ = []
        return module

    @staticmethod
    def exec_module(module):
        return None


sys.meta_path.append(_Finder())
