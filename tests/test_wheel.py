"""The package as a user gets it: the built wheel's contents and metadata, and the CLI installed from it
into a fresh virtual environment without any extra (no matplotlib, tqdm, tensorboard or DeepSpeed)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from email.parser import Parser

import pytest

from zclip_dist._version import __version__

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH = os.environ.get("ZCLIP_TORCH", "torch==2.13.0")  # as launch/setup.sh: pinned, never a CUDA download


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    """``pip wheel`` of a clean copy of the sources (no build folders left in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "zclip_dist"), src / "zclip_dist",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    # the installed setuptools when it is new enough (fast, offline), else pip's isolated build
    new_enough = int(importlib.metadata.version("setuptools").split(".")[0]) >= 77
    flags = ["--no-build-isolation"] if new_enough else []
    done = _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(out), *flags])
    assert done.returncode == 0, done.stderr
    (path,) = [str(out / f) for f in os.listdir(out) if f.endswith(".whl")]
    return path


def test_wheel_contents_and_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = f"zclip_dist-{__version__}.dist-info"
        meta = Parser().parsestr(z.read(f"{info}/METADATA").decode())
        license_text = z.read(f"{info}/licenses/LICENSE").decode()
    assert os.path.basename(wheel) == f"zclip_dist-{__version__}-py3-none-any.whl"
    assert "zclip_dist/py.typed" in names  # type checkers use the package's hints
    assert not any(n.startswith(("tests/", "bench/", "docs/")) for n in names)
    assert "Apache License" in license_text and "Version 2.0" in license_text
    assert meta["Name"] == "zclip-dist" and meta["Version"] == __version__
    assert meta["License-Expression"] == "Apache-2.0"
    classifiers = meta.get_all("Classifier")
    assert "Typing :: Typed" in classifiers and any(c.startswith("Programming Language :: Python :: 3") for c in classifiers)
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert {"Homepage", "Source", "Issues"} <= set(urls) and all(u.startswith("https://") for u in urls.values())
    assert [r for r in meta.get_all("Requires-Dist") if "extra" not in r] == ["torch>=2.4", "numpy>=1.22"]
    assert {"plot", "tensorboard", "demo", "deepspeed", "megatron"} <= set(meta.get_all("Provides-Extra"))
    # the README is the package page: its links and images must work there, so none is relative
    targets = re.findall(r"\]\(([^)\s]+)", meta.get_payload())
    assert targets and [t for t in targets if not t.startswith(("https://", "http://", "#"))] == []


@pytest.mark.slow
def test_cli_from_the_wheel_in_a_fresh_venv_without_extras(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    py, cli = str(bin_dir / "python"), str(bin_dir / "zclip-dist")
    done = _run([py, "-m", "pip", "install", "-q", TORCH, wheel])
    assert done.returncode == 0, done.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    # a user's run: the drop-in logging its decisions, with a spike and a NaN step
    script = (
        "import importlib.util as u\n"
        "print([m for m in ('matplotlib', 'tqdm', 'tensorboard', 'deepspeed') if u.find_spec(m)])\n"
        "import torch\n"
        "from torch import nn\n"
        "from zclip_dist import ZClip\n"
        "torch.manual_seed(0)\n"
        "m = nn.Linear(4, 1)\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.01)\n"
        "zc = ZClip(warmup_steps=10, max_grad_norm=5.0, log_jsonl='run.jsonl', optimizer=opt)\n"
        "for t in range(80):\n"
        "    x = torch.randn(8, 4) * (30.0 if t == 50 else 1.0)\n"
        "    if t == 60: x[0, 0] = float('nan')\n"
        "    m.zero_grad(); m(x).pow(2).mean().backward(); zc.step(m); opt.step()\n"
    )
    done = _run([py, "-c", script], env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]" and done.stderr == "", done  # truly without extras, and quiet

    version = _run([cli, "--version"], env=env, cwd=tmp_path)
    assert version.stdout.strip() == f"zclip-dist {__version__}"

    def one_line_error(argv, expected):
        done = _run([cli, *argv], env=env, cwd=tmp_path)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr

    one_line_error(["replay", "run.jsonl"], 'needs matplotlib: pip install "zclip-dist[plot]" (or pass --no-png)')
    one_line_error(["demo", "--short"], 'pip install "zclip-dist[demo]"')
    events = tmp_path / "tb"
    from torch.utils.tensorboard import SummaryWriter  # written here, read there (no tensorboard there)

    writer = SummaryWriter(log_dir=str(events))
    writer.add_scalar("grad-norm", 1.0, 1)
    writer.close()
    one_line_error(["replay", "tb", "--no-png"], 'pip install "zclip-dist[tensorboard]"')

    done = _run([cli, "replay", "run.jsonl", "--no-png"], env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "settings from the trace's header" in done.stdout and "the same at every step" in done.stdout
    done = _run([cli, "report", "run.jsonl"], env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "clipped:" in done.stdout and "non-finite norms: 1 (steps 61)" in done.stdout
