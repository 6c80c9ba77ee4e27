"""No silent no-op: with zclip_dist pip-installed, a "zclip" entry takes effect however DeepSpeed is started.

The package is installed the two ways users do, into fresh virtual environments: a built wheel and an
editable install (what CI and developers use). The import hook must patch ``deepspeed.initialize`` in
both (checked against a stub ``deepspeed`` package, and without importing torch at start-up), and be off
with ``ZCLIP_DIST_AUTO=0``. Then tests/ds_user_script.py, which never imports zclip_dist, runs with the
editable environment's Python under the ``deepspeed`` launcher, ``torchrun`` and plain ``python``, and
through HF Trainer and Accelerate on a tiny random GPT-2: on every path ZClip is attached and each step's
update equals what the reference ``zclip`` package does to the true full-model gradient (float64), the
x30 spike on the last rank included.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests import ds_harness as H
from tests import ds_user_script as U
from tests.distributed import free_port

pytestmark = pytest.mark.slow  # spawned rank groups / launched jobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tests", "ds_user_script.py")
PTH = "zclip_dist_autoload.pth"


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without PYTHONPATH (a checkout on it would pass for an installed zclip-dist) and
    without ZCLIP_DIST_AUTO."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ZCLIP_DIST_AUTO")}
    return {**env, **extra}


def _pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                          env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _venv(path, system_site_packages: bool) -> str:
    args = [sys.executable, "-m", "venv", "--without-pip", str(path)]
    subprocess.run(args + (["--system-site-packages"] if system_site_packages else []), check=True, timeout=120)
    return os.path.join(str(path), "bin", "python")


def _purelib(python: str) -> str:
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         env=_clean_env(), capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.fixture(scope="module")
def wheel_python(tmp_path_factory):
    """A bare environment (no torch, no DeepSpeed) with the wheel built from a copy of this checkout."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                             ".venv", "out", "runs", ".whl", ".pytest_cache"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src))
    python = _venv(root / "venv", system_site_packages=False)
    _pip("--python", python, "install", "--no-deps", *glob.glob(str(root / "dist" / "*.whl")))
    return python


@pytest.fixture(scope="module")
def editable_python(tmp_path_factory):
    """This checkout installed editable (``pip install -e .``) into an environment that sees the installed
    torch, DeepSpeed, transformers and accelerate."""
    python = _venv(tmp_path_factory.mktemp("editable") / "venv", system_site_packages=True)
    _pip("--python", python, "install", "--no-deps", "--no-build-isolation", "-e", REPO)
    return python


# ---- the hook itself ----------------------------------------------------------------------------------
PROBE = """
import json, sys
started_with_torch = "torch" in sys.modules
from deepspeed import initialize
import deepspeed, _zclip_dist_autoload
print(json.dumps({"patched": getattr(initialize, "__zclip_dist__", False),
                  "original": deepspeed._zclip_dist_original_initialize() if hasattr(deepspeed,
                              "_zclip_dist_original_initialize") else None,
                  "hook": _zclip_dist_autoload.__file__, "started_with_torch": started_with_torch}))
"""


def _probe(python: str, tmp_path, **env: str) -> dict:
    stub = tmp_path / "stub" / "deepspeed"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text("def initialize(*args, **kwargs):\n    return \"deepspeed's\"\n")
    proc = subprocess.run([python, "-c", PROBE], env=_clean_env(PYTHONPATH=str(tmp_path / "stub"), **env),
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_install_patches_deepspeed_initialize_at_import(kind, request, tmp_path):
    python = request.getfixturevalue(f"{kind}_python")
    assert os.path.exists(os.path.join(_purelib(python), PTH)), f"the {kind} install has no {PTH}"
    seen = _probe(python, tmp_path)
    assert seen["patched"] and seen["original"] == "deepspeed's", seen
    assert not seen["started_with_torch"], "the start-up hook imported torch"
    expected_home = _purelib(python) if kind == "wheel" else REPO
    assert os.path.dirname(seen["hook"]) == expected_home, seen
    off = _probe(python, tmp_path, ZCLIP_DIST_AUTO="0")
    assert not off["patched"] and off["original"] is None, off


# ---- the paths users start training by ------------------------------------------------------------
LAUNCHES = {  # name: (launcher arguments before the script, fronts, extra environment)
    "deepspeed": (["-m", "deepspeed.launcher.runner", "--num_gpus", "2"], "direct", {}),
    "torchrun": (["-m", "torch.distributed.run", "--nproc_per_node", "2"], "direct,trainer,accelerate", {}),
    "python": ([], "direct", {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}),
}


def _launch(python: str, name: str, out: str) -> None:
    argv, fronts, env = LAUNCHES[name]
    port = str(free_port())
    argv = [*argv, "--master_port", port] if argv else argv
    run_env = _clean_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", ZCLIP_TEST_NO_SHM="1", MASTER_PORT=port,
                         PYTHONPATH=os.path.join(REPO, "tests", "ds_site"),  # only the no-shm sitecustomize
                         PATH=os.path.dirname(python) + os.pathsep + os.environ["PATH"], **env)
    proc = subprocess.run([python, *argv, SCRIPT, "--fronts", fronts, "--out", out], env=run_env, cwd=out,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(editable_python, tmp_path_factory):
    out = {}
    for name in LAUNCHES:
        out[name] = str(tmp_path_factory.mktemp(name))
        _launch(editable_python, name, out[name])
    return out


def _results(path: str, front: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(path, f"{front}.*.pt")), key=lambda f: int(f.split(".")[-2]))
    assert files, f"no {front} results in {path}"
    return [torch.load(f, weights_only=False) for f in files]


@pytest.mark.parametrize("launcher", sorted(LAUNCHES))
def test_unchanged_script_gets_zclip_under_every_launcher(runs, launcher):
    """Old behaviour: a plain deepspeed.initialize ignored the entry unless started through our module."""
    results = _results(runs[launcher], "direct")
    case = H.Case("direct", {}, dp=len(results), steps=U.STEPS, spike_step=U.SPIKE_STEP, zclip=dict(U.ZCLIP))
    assert all(all(d is not None for d in r["decisions"]) for r in results), "ZClip was not attached"
    H.check_against_oracle(case, "DeepSpeedZeroOptimizer", results, tol=2e-5)


def _gpt2_oracle(records: list[dict], max_grad_norm: float, lr: float = 0.1) -> None:
    """Each step: the full-model gradient of the mean over ranks of (factor x loss) at the engine's weights
    in float64, clipped by the reference ZClip; the engine's update must be -lr times it."""
    from zclip import ZClip

    assert all(all(m is not None for m in r["metrics"]) for r in records), "ZClip was not attached"
    ref = ZClip(max_grad_norm=max_grad_norm, **U.ZCLIP)
    weights = records[0]["weights"]
    for r in records[1:]:
        assert all(torch.equal(a[k], b[k]) for a, b in zip(weights, r["weights"]) for k in a), "ranks differ"
    for step in range(U.STEPS):
        model = U.gpt2().double()
        model.load_state_dict({k: v.double() for k, v in weights[step].items()}, strict=False)  # lm_head is tied
        losses = [U.gpt2_loss(model, r["batches"][step]) * r["factors"][step] for r in records]
        torch.stack(losses).mean().backward()
        norm = float(ref.step(model))
        metrics = records[0]["metrics"][step]
        assert all(H.same_metrics(r["metrics"][step], metrics) for r in records[1:]), "ranks decided differently"
        assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-5), f"step {step}"
        expected = {n: -lr * p.grad for n, p in model.named_parameters()}
        got = {n: weights[step + 1][n] - weights[step][n] for n in expected}
        assert H.rel_diff(got, expected) <= 1e-4, f"step {step}: the update differs from the reference's"
    spike = records[0]["metrics"][U.SPIKE_STEP]
    assert spike["spike"] and spike["clipped"] and math.isfinite(spike["grad_norm"])
    assert any(r["factors"][U.SPIKE_STEP] != 1 for r in records), "the spike was not injected"


def test_hf_trainer_with_a_deepspeed_dict_attaches_and_clips_like_the_reference(runs):
    records = _results(runs["torchrun"], "trainer")
    assert {(r["engine"], r["optimizer"]) for r in records} == {("DeepSpeedEngine", "DeepSpeedZeroOptimizer")}
    _gpt2_oracle(records, max_grad_norm=50.0)  # Trainer fills gradient_clipping "auto" with max_grad_norm


def test_accelerate_deepspeed_plugin_attaches_and_clips_like_the_reference(runs):
    records = _results(runs["torchrun"], "accelerate")
    assert {(r["engine"], r["optimizer"]) for r in records} == {("DeepSpeedEngine", "SGD")}
    _gpt2_oracle(records, max_grad_norm=50.0)
