"""The launchers in launch/ run an unchanged DeepSpeed script with ZClip attached (subprocess, 2 CPU ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.distributed import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(script: str, tmp_path, *args: str) -> list[dict]:
    report = tmp_path / "report.jsonl"
    env = dict(os.environ, NPROC="2", MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu", ZCLIP_TEST_NO_SHM="1",
               OMP_NUM_THREADS="1", PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests", "ds_site")]))
    proc = subprocess.run(["bash", os.path.join(REPO, "launch", script), "--steps", "6", "--report", str(report),
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sorted((json.loads(line) for line in report.read_text().splitlines()), key=lambda r: r["rank"])


def _mpi_available() -> bool:
    import importlib.util
    import shutil

    return shutil.which("mpirun") is not None and importlib.util.find_spec("mpi4py") is not None


MPI = pytest.param("deepspeed_mpirun.sh", marks=pytest.mark.skipif(
    not _mpi_available(), reason="mpirun and mpi4py needed (apt-get install openmpi-bin libopenmpi-dev; pip install mpi4py)"))


@pytest.mark.parametrize("script", ["deepspeed_torchrun.sh", "deepspeed_local.sh", MPI])
def test_launcher_attaches_zclip(script, tmp_path):
    ranks = _launch(script, tmp_path)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["zclip"] for r in ranks)
    first, second = (r["metrics"] for r in ranks)
    assert first == second, "ranks decided differently"
    assert first["step"] == 6 and first["spike"] and first["clipped"], first
    assert ranks[0]["grad_norm"] == first["grad_norm"]  # the engine reports ZClip's exact pre-clip norm


def test_launch_module_runs_script_with_patched_initialize(tmp_path, monkeypatch):
    """``--local_rank`` from DeepSpeed's launcher moves behind the script name; the script sees our initialize."""
    import deepspeed

    from zclip_dist import deepspeed as zds
    from zclip_dist.deepspeed import launch

    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent("""
        import sys, deepspeed
        RESULT = (list(sys.argv), getattr(deepspeed.initialize, "__zclip_dist__", False), __name__)
    """))

    def original(*args, **kwargs):  # stands in for DeepSpeed's own initialize
        return "deepspeed's"

    monkeypatch.setattr(deepspeed, "initialize", original)  # restored after the test
    monkeypatch.delattr(deepspeed, "_zclip_dist_original_initialize", raising=False)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    seen = {}
    real_run_path = launch.runpy.run_path
    monkeypatch.setattr(launch.runpy, "run_path", lambda path, run_name: seen.update(real_run_path(path, run_name=run_name)))
    launch.main(["--local_rank=1", str(script), "--steps", "3"])
    assert seen["RESULT"] == ([str(script), "--local_rank=1", "--steps", "3"], True, "__main__")
    assert zds._deepspeed_initialize() is original  # ours calls DeepSpeed's, never itself
    launch.install()
    assert deepspeed._zclip_dist_original_initialize is original, "installing twice wrapped the wrapper"
