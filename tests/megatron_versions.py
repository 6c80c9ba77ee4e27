"""Run the Megatron tests on both ends of the supported range: megatron-core 0.16.1 (this environment) and
0.19.2 (the second environment ``launch/setup_megatron019.sh`` makes, with this repository on its path).

``CORES`` parametrizes a test; :func:`run_ranks_on` runs a worker on N gloo ranks with the interpreter of
that core and returns what each rank returned, exactly as ``tests.distributed.run_ranks`` does in this
process. :func:`python_for` skips with the install line when that environment is absent.

    python -m tests.megatron_versions <payload.pkl> <result.pkl>    # what runs in the other interpreter
"""

from __future__ import annotations

import functools
import importlib
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
#: Test-only start-up for Megatron subprocesses: ``typing.override`` on Python 3.11 (sitecustomize).
SITE = REPO / "tests" / "megatron_site"
#: Test-only ``triton`` stand-in, used where triton is not installed (tests/megatron_stand_ins/triton).
STAND_INS = REPO / "tests" / "megatron_stand_ins"
#: Parameter ids: the installed megatron-core and the second environment's.
CORES = ("core0.16", "core0.19")
VENV019 = os.environ.get("ZCLIP_MEGATRON019_VENV", str(REPO / ".venv-megatron019"))
SETUP019 = "bash launch/setup_megatron019.sh"
#: Megatron-LM's training code (outside megatron/core) at two release tags, beside the repository, by the
#: megatron-core each pairs with. Read-only: tests copy what they patch.
FIXTURES = REPO.parent / "shared" / "megatron-lm"
TAGS = {"core_v0.16.1": "core0.16", "core_v0.19.0": "core0.19"}


def checkout(tag: str) -> Path:
    """The Megatron-LM fixture at ``tag``; skips (the test) when it is absent."""
    import pytest

    path = FIXTURES / tag
    if not (path / "pretrain_gpt.py").is_file() or not (path / "megatron" / "training" / "arguments.py").is_file():
        pytest.skip(f"the Megatron-LM {tag} fixture is absent ({path}: pretrain_gpt.py and megatron/training)")
    return path


@functools.cache
def _missing(python: str, modules: tuple[str, ...]) -> tuple[str, ...]:
    code = "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None))"
    proc = subprocess.run([python, "-c", code, *modules], capture_output=True, text=True, env=subprocess_env(),
                          timeout=120)
    return tuple(proc.stdout.split())


def require(python: str, needs: dict[str, str]) -> None:
    """Skip with the install line when ``python`` cannot import one of ``needs`` (module: pip name)."""
    import pytest

    missing = _missing(python, tuple(needs))
    if missing:
        pytest.skip(f"{python} lacks {', '.join(missing)}: {python} -m pip install "
                    + " ".join(needs[m] for m in missing))


def python_for(core: str) -> str:
    """The interpreter whose megatron-core is ``core``; skips (the test) when it is not installed."""
    import pytest

    if core == "core0.16":
        pytest.importorskip("megatron.core", reason="megatron-core is not installed: pip install -e '.[megatron]'")
        return sys.executable
    python = os.path.join(VENV019, "bin", "python")
    if not os.access(python, os.X_OK):
        pytest.skip(f"megatron-core 0.19.2 environment {VENV019} is absent: {SETUP019}")
    return python


def subprocess_env(*extra_paths: str | os.PathLike) -> dict[str, str]:
    """This repository (and ``extra_paths``) first on PYTHONPATH, the test-only start-up directory, and the
    ``triton`` stand-in where the real package is absent (megatron-core 0.19 imports it at import time)."""
    import importlib.util

    paths = [*map(str, extra_paths), str(REPO), str(SITE)]
    if importlib.util.find_spec("triton") is None:
        paths.append(str(STAND_INS))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_ranks_on(core: str, fn: Callable, world: int, *args: Any, timeout: float = 900) -> list[Any]:
    """``run_ranks(fn, world, *args)`` with ``core``'s interpreter (a subprocess for core0.19)."""
    python = python_for(core)
    if python == sys.executable:
        from tests.distributed import run_ranks

        return run_ranks(fn, world, *args)
    with tempfile.TemporaryDirectory(prefix="zclip_megatron_") as tmp:
        payload, result = os.path.join(tmp, "payload.pkl"), os.path.join(tmp, "result.pkl")
        with open(payload, "wb") as f:
            pickle.dump((fn.__module__, fn.__qualname__, world, args), f)
        proc = subprocess.run([python, "-m", "tests.megatron_versions", payload, result], cwd=REPO,
                              env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"{core} worker {fn.__qualname__} failed (exit {proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        with open(result, "rb") as f:
            return pickle.load(f)


def _main(payload: str, result: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from tests.distributed import run_ranks

    with open(payload, "rb") as f:
        module, qualname, world, args = pickle.load(f)
    fn = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    out = run_ranks(fn, world, *args)
    with open(result, "wb") as f:
        pickle.dump(out, f)


if __name__ == "__main__":
    _main(*sys.argv[1:3])
