"""Natural instability: a learning-rate x clipping-method sweep on a small GPT, nothing injected.

Every cell (learning rate, method, seed) trains the demo's GPT from scratch in one process with the
plain-PyTorch front end (``torch.nn.utils.clip_grad_norm_`` for fixed clipping, ``zclip_dist.ZClip`` /
``zclip_dist.AdaGC`` for the adaptive methods), constant learning rate and no warmup, so that the high
learning rates are unstable by themselves. Cells of one seed see the same batches and the same initial
weights; only the learning rate and the clipping differ. The sweep's settings are fixed here, before
any run, and saved with the results.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from .. import AdaGC, ZClip
from .corpus import VOCAB_SIZE, Corpus
from .model import GPT, GPTConfig

__all__ = ["METHODS", "Size", "SIZES", "SHORT", "short_mode", "SweepSettings", "corpus", "train_cell",
           "pilot_cell", "run_cells", "machine"]

#: The methods compared in every cell, in table order.
METHODS = ("none", "fixed-tight", "fixed-loose", "zclip", "adagc")


@dataclass(frozen=True, kw_only=True)
class Size:
    """Model, batch, step budget, learning rates and fixed clips of one sweep size."""

    n_layer: int
    n_head: int
    d_model: int
    context: int
    batch: int
    steps: int
    lrs: tuple[float, ...]
    # (tight, loose) from ``--pilot``; None: no pilot measured yet, the clips must be given
    clips: tuple[float, float] | None


#: "small" is the CPU sweep (its pilot at lr 3e-3: median norm 1.40 -> tight 1.4, loose 5x); "large" the
#: GPU variant (its pilot has not been run yet).
SIZES: dict[str, Size] = {
    "small": Size(n_layer=2, n_head=4, d_model=64, context=64, batch=16, steps=1000,
                  lrs=(3e-3, 1e-2, 3e-2, 1e-1), clips=(1.4, 7.0)),
    "large": Size(n_layer=6, n_head=8, d_model=384, context=256, batch=32, steps=5000,
                  lrs=(1e-3, 3e-3, 1e-2, 3e-2), clips=None),
}

#: CI's short mode: the lowest and the highest learning rate of the size, one seed, fewer steps.
SHORT: dict[str, Any] = {"seeds": (0,), "steps": 300}


def short_mode(size: str = "small") -> dict[str, Any]:
    """``SweepSettings`` keywords of the short mode for ``size``."""
    lrs = SIZES[size].lrs
    return {**SHORT, "lrs": (lrs[0], lrs[-1])}


@dataclass(frozen=True, kw_only=True)
class SweepSettings:
    """Everything that defines the sweep; saved to ``results.json``.

    ``tight_clip`` and ``loose_clip`` are the fixed clips (default: the size's), set from the pilot run
    without clipping at the lowest learning rate (``zclip-dist sweep --pilot``): tight is about the
    typical norm there (the role 1.0 plays early in LLM pretraining), loose about 5x it. ZClip and AdaGC
    run at their published defaults, with ``loose_clip`` as their absolute cap, as the DeepSpeed and
    Megatron front ends take the engine's fixed clip as the cap.
    """

    size: str = "small"
    lrs: tuple[float, ...] | None = None  # None: the size's
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int | None = None  # None: the size's budget
    tight_clip: float | None = None  # None: the size's clips
    loose_clip: float | None = None
    zclip: dict[str, Any] = field(default_factory=lambda: {"alpha": 0.97, "z_thresh": 2.5, "warmup_steps": 25})
    adagc: dict[str, Any] = field(default_factory=lambda: {"clip_ratio": 1.04, "beta": 0.99, "warmup_steps": 100})
    # optimizer: AdamW as in LLM pretraining, constant learning rate, no warmup
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    # data: the demo's generated corpus
    corpus_seed: int = 0
    corpus_chars: int = 400_000
    corpus_words: int = 48
    corpus_fanout: int = 3
    device: str = "cpu"
    jobs: int = 1
    out: str = "out/sweep"

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size = {self.size!r} is invalid: allowed {', '.join(SIZES)}")
        if not self.methods or not self.seeds:
            raise ValueError("methods and seeds are invalid: allowed one or more of each")
        if self.jobs < 1:
            raise ValueError(f"jobs = {self.jobs} is invalid: allowed an integer >= 1")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"method = {bad[0]!r} is invalid: allowed {', '.join(METHODS)}")
        size = SIZES[self.size]
        if self.lrs is None:
            object.__setattr__(self, "lrs", size.lrs)
        if not self.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in self.lrs):
            raise ValueError(f"lrs = {self.lrs} is invalid: allowed one or more positive numbers")
        if self.steps is not None and self.steps < 20:
            raise ValueError(f"steps = {self.steps} is invalid: allowed an integer >= 20")
        if self.methods == ("none",):  # the pilot: no clips needed
            return
        if size.clips is None and (self.tight_clip is None or self.loose_clip is None):
            raise ValueError(f"size {self.size!r} has no pilot yet: run --pilot and give --tight-clip and --loose-clip")
        if self.tight_clip is None:
            object.__setattr__(self, "tight_clip", size.clips[0])
        if self.loose_clip is None:
            object.__setattr__(self, "loose_clip", size.clips[1])
        if not 0 < self.tight_clip <= self.loose_clip:
            raise ValueError(f"clips = ({self.tight_clip}, {self.loose_clip}) are invalid: allowed 0 < tight <= loose")

    @property
    def model(self) -> dict[str, int]:
        s = SIZES[self.size]
        return {"n_layer": s.n_layer, "n_head": s.n_head, "d_model": s.d_model, "context": s.context, "batch": s.batch}

    @property
    def n_steps(self) -> int:
        return self.steps if self.steps is not None else SIZES[self.size].steps

    def cells(self) -> list[tuple[float, str, int]]:
        return [(lr, m, s) for s in self.seeds for lr in self.lrs for m in self.methods]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "model": self.model, "n_steps": self.n_steps}

    def replace(self, **changes: Any) -> "SweepSettings":
        return replace(self, **changes)


def _clipper(settings: SweepSettings, method: str, optimizer: torch.optim.Optimizer):
    """``step(model) -> pre-clip norm`` and ``clipped() -> bool tensor`` for one method. ZClip and AdaGC
    get the optimizer, as users pass it, so that a non-finite step is skipped rather than zeroed."""
    if method == "zclip":
        z = ZClip(**settings.zclip, max_grad_norm=settings.loose_clip, optimizer=optimizer)
        return z.step, lambda: z.last.clipped
    if method == "adagc":
        a = AdaGC(**settings.adagc, max_grad_norm=settings.loose_clip, optimizer=optimizer)
        return a.step, lambda: a.last.clipped.any()
    limit = {"none": math.inf, "fixed-tight": settings.tight_clip, "fixed-loose": settings.loose_clip}[method]
    box: dict[str, torch.Tensor] = {}

    def step(model: torch.nn.Module) -> torch.Tensor:
        box["norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), limit, foreach=True)
        return box["norm"]

    return step, lambda: box["norm"] > limit


def corpus(settings: SweepSettings) -> Corpus:
    """The demo's generated corpus with the sweep's settings."""
    return Corpus(settings.corpus_seed, settings.corpus_chars, settings.corpus_words, settings.corpus_fanout)


def train_cell(settings: SweepSettings, lr: float, method: str, seed: int, data: Corpus | None = None) -> dict[str, Any]:
    """Train one cell; return per-step loss, pre-clip norm and clipped flag, and the wall time."""
    if settings.device == "cpu":
        torch.set_num_threads(1)  # cells run side by side, one per core
    data = data or corpus(settings)
    device = torch.device(settings.device)
    cfg = settings.model
    torch.manual_seed(seed)
    model = GPT(GPTConfig(VOCAB_SIZE, context=cfg["context"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                          d_model=cfg["d_model"])).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=settings.betas, weight_decay=settings.weight_decay)
    clip_step, clipped = _clipper(settings, method, optimizer)
    losses, norms, flags = [], [], []
    start = time.perf_counter()
    for step in range(settings.n_steps):
        # Batches keyed by (seed, step): every method and learning rate of a seed sees the same data.
        x, y = data.batch(step, seed, cfg["batch"], cfg["context"])
        loss = model(x.to(device), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Cloned: on a GPU ZClip's decision tensors are CUDA-graph outputs, overwritten by the next step.
        norms.append(clip_step(model).clone())
        flags.append(clipped().clone())
        optimizer.step()
        losses.append(loss.detach())
    # One host transfer per run: the per-step values stay on the device while training.
    result = {"lr": lr, "method": method, "seed": seed,
              "loss": torch.stack(losses).double().tolist(),
              "grad_norm": torch.stack(norms).double().tolist(),
              "clipped": torch.stack(flags).tolist()}
    result["wall_s"] = time.perf_counter() - start
    return result


def pilot_cell(settings: SweepSettings, steps: int = 200) -> dict[str, Any]:
    """The pilot: no clipping at the lowest learning rate, seed 0; the fixed clips are set from its norms."""
    return train_cell(settings.replace(steps=steps), min(settings.lrs), "none", 0)


def machine(settings: SweepSettings) -> dict[str, Any]:
    """Where the sweep ran, for its results: the device's name, the CPU count, torch, the load average now."""
    device = torch.device(settings.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": settings.device, "device_name": name, "cpus": os.cpu_count(), "torch": torch.__version__,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _cell_path(settings: SweepSettings, lr: float, method: str, seed: int) -> str:
    return os.path.join(settings.out, "runs", f"lr{lr:g}-{method}-seed{seed}.json")


def _cell_key(settings: SweepSettings) -> dict[str, Any]:
    """What a single run depends on: everything but the grid, the parallelism and the output folder."""
    d = json.loads(json.dumps(settings.to_dict()))  # tuples as lists, as read back from a file
    for k in ("lrs", "methods", "seeds", "jobs", "out"):
        d.pop(k)
    return d


def _load_cell(settings: SweepSettings, lr: float, method: str, seed: int) -> dict[str, Any] | None:
    """A run an interrupted sweep with the same settings already finished, or None."""
    try:
        with open(_cell_path(settings, lr, method, seed)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return saved["run"] if saved.get("settings") == _cell_key(settings) else None


def _cell_job(args: tuple[SweepSettings, float, str, int]) -> dict[str, Any]:
    settings, lr, method, seed = args
    run = train_cell(settings, lr, method, seed)
    _save_cell(settings, run)
    return run


def _save_cell(settings: SweepSettings, run: dict[str, Any]) -> None:
    path = _cell_path(settings, run["lr"], run["method"], run["seed"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"settings": _cell_key(settings), "run": run}, f)
    os.replace(path + ".tmp", path)  # a killed sweep leaves whole files only


def run_cells(settings: SweepSettings, progress: bool = True) -> list[dict[str, Any]]:
    """Every cell of the sweep, ``settings.jobs`` at a time (processes, one thread each on CPU).

    Each finished run is saved under ``out/runs/``; a sweep started again with the same settings reuses
    them and trains only the missing ones (a long sweep survives being stopped).
    """
    cells = settings.cells()
    done = {cell: _load_cell(settings, *cell) for cell in cells}
    todo = [(settings, *cell) for cell in cells if done[cell] is None]
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="sweep", unit="run", file=sys.stderr,
                   dynamic_ncols=True)
    trained: list[dict[str, Any]] = []
    if settings.jobs == 1 or len(todo) <= 1:
        data = corpus(settings)
        for job in todo:
            trained.append(train_cell(*job, data=data))
            _save_cell(settings, trained[-1])
            if bar is not None:
                bar.update(1)
    else:
        import torch.multiprocessing as mp

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        with mp.get_context("spawn").Pool(min(settings.jobs, len(todo))) as pool:
            for r in pool.imap(_cell_job, todo):
                trained.append(r)
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    for r in trained:
        done[(r["lr"], r["method"], r["seed"])] = r
    return [done[cell] for cell in cells]
