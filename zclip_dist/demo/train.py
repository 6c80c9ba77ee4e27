"""One rank of the demo: build the DeepSpeed engine, train, record every step, write JSONL on rank 0.

All runs train inside the same ranks one after the other (one process-group start-up for all), from
the same seed, on the same batches; only the clipping differs. The ZClip and AdaGC runs go through
``zclip_dist.deepspeed.initialize`` with a ``"zclip"`` / ``"adagc"`` config entry; the fixed runs
through plain ``deepspeed.initialize`` with ``gradient_clipping``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from ..metrics import JsonlSink, config_header, header
from .corpus import VOCAB_SIZE, Corpus
from .model import GPT, GPTConfig
from .settings import ADAPTIVE, DemoSettings, fixed_clip

__all__ = ["ds_config", "train_run", "rank_main"]

SPIKE_TARGET = VOCAB_SIZE - 1  # the corrupted batch's every target: 'z'


def ds_config(settings: DemoSettings, run: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": settings.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": settings.clip if run in ADAPTIVE else fixed_clip(run),
        "zero_optimization": {"stage": settings.zero_stage},
        "steps_per_print": 10**9,  # the demo prints its own progress
        "wall_clock_breakdown": False,
    }
    if run in ADAPTIVE:  # no max_grad_norm: gradient_clipping is the cap (AdaGC: its warmup clip)
        cfg[run] = dict(getattr(settings, run))
    return cfg


def _build(settings: DemoSettings, run: str):
    import deepspeed

    from .. import deepspeed as zclip_deepspeed

    torch.manual_seed(settings.seed)
    model = GPT(GPTConfig(VOCAB_SIZE, context=settings.context, n_layer=settings.n_layer,
                          n_head=settings.n_head, d_model=settings.d_model))
    # A torch optimizer: DeepSpeed's own AdamW would JIT-compile a C++ op on CPU.
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=settings.betas,
                                  weight_decay=settings.weight_decay)
    init = zclip_deepspeed.initialize if run in ADAPTIVE else deepspeed.initialize
    engine, *_ = init(model=model, optimizer=optimizer, config=ds_config(settings, run))
    return engine


def _step_record(engine: Any, settings: DemoSettings, run: str, step: int, loss: float) -> dict[str, Any]:
    hook = getattr(engine, "_zclip", None)  # ZClip or AdaGC
    if run == "zclip":
        m = hook.metrics()
        record = {"grad_norm": m["grad_norm"], "threshold": m["threshold"], "coef": m["coef"],
                  "clipped": m["clipped"], "spike": m["spike"], "mean": m["mean"], "std": m["std"],
                  "z": m["z"], "warmup": m["warmup"]}
    elif run == "adagc":  # one coefficient per tensor: the smallest stands for the step
        m = hook.metrics()
        record = {"grad_norm": m["grad_norm"], "coef": m["min_coef"], "clipped": m["num_clipped_tensors"] > 0,
                  "clipped_tensors": m["num_clipped_tensors"], "warmup": m["warmup"]}
    else:
        norm = float(engine.get_global_grad_norm())
        clip = fixed_clip(run)
        coef = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0  # DeepSpeed's own rule; 0 is off
        record = {"grad_norm": norm, "threshold": clip if clip > 0 else None, "coef": coef, "clipped": coef < 1.0}
    return {"run": run, "step": step, "loss": loss, **record}


def train_run(settings: DemoSettings, run: str, corpus: Corpus) -> dict[str, Any]:
    """Train one run in this rank; rank 0 returns the per-step history and the wall time."""
    import deepspeed.utils.groups

    rank, world = dist.get_rank(), dist.get_world_size()
    deepspeed.utils.groups.mpu = None  # a previous engine's state must not leak into this one
    engine = _build(settings, run)
    device = engine.device
    sink = None
    if rank == 0:
        zclip = getattr(engine, "_zclip", None)  # the header: the settings replay needs to reproduce the run
        head = config_header(zclip.config) if zclip is not None else header("fixed", {"max_grad_norm": fixed_clip(run)})
        sink = JsonlSink(os.path.join(settings.out, f"{run}.jsonl"), header=head)
    history: list[dict[str, Any]] = []
    bar = None
    if rank == 0 and settings.progress:
        from tqdm import tqdm

        bar = tqdm(total=settings.steps, desc=f"{run:>7}", unit="step", file=sys.stderr, dynamic_ncols=True)
    dist.barrier()
    start = time.perf_counter()
    for step in range(settings.steps):
        x, y = corpus.batch(step, rank, settings.micro_batch, settings.context)
        corrupted = not settings.pilot and step == settings.spike_step and rank == settings.spike_rank
        if corrupted:
            y = torch.full_like(y, SPIKE_TARGET)
        loss = engine(x.to(device), y.to(device))
        engine.backward(loss * settings.spike_weight if corrupted else loss)
        engine.step()
        # The logged loss is the mean over the clean batches only: it measures the model, not the bad data.
        clean = torch.tensor([0.0 if corrupted else loss.item(), 0.0 if corrupted else 1.0], dtype=torch.float64)
        dist.all_reduce(clean)
        if rank == 0:
            record = _step_record(engine, settings, run, step, clean[0].item() / clean[1].item())
            history.append(record)
            if step % settings.log_interval == 0 or step == settings.steps - 1:
                sink.write(record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.3f}", norm=f"{record['grad_norm']:.2f}", refresh=False)
                bar.update(1)
    dist.barrier()
    wall = time.perf_counter() - start
    if bar is not None:
        bar.close()
    if sink is not None:
        sink.close()
    del engine
    return {"run": run, "history": history, "wall_s": wall, "world": world} if rank == 0 else {}


def rank_main(settings: DemoSettings) -> dict[str, Any]:
    """Every run in this (already initialised) rank; rank 0 returns ``{run: result}``."""
    torch.set_num_threads(1)
    corpus = Corpus(settings.seed, settings.corpus_chars, settings.corpus_words, settings.corpus_fanout)
    return {run: train_run(settings, run, corpus) for run in settings.runs}
