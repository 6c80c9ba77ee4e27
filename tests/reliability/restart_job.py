"""One rank of a real multi-process training job for the kill-and-resume scenario (tests/reliability/restart.py).

Started like torchrun starts a script (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment)::

    python -m tests.reliability.restart_job DIR STEPS EVERY [--resume]

Two DDP models train side by side on the same data, one clipped by ZClip and one by AdaGC. The global
batch of a step is fixed (12 rows, seeded by the step) and split evenly over the ranks, so any DP size
that divides 12 sees the same mean gradient. Rank 0 appends every step's decisions to ``DIR/log.jsonl``
(flushed: the parent watches it to pick the moment to kill) and writes ``DIR/ckpt.pt`` every ``EVERY``
steps (to a temporary name, then renamed: a kill mid-write leaves the previous checkpoint whole).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

GLOBAL_BATCH = 12
SPIKE_EVERY = 9  # a corrupted row in the global batch on every 9th step: decisions that matter


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def shard(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(GLOBAL_BATCH, 6, generator=gen), torch.randn(GLOBAL_BATCH, 3, generator=gen)
    if step % SPIKE_EVERY == SPIKE_EVERY - 1:
        y[0] *= 40.0
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    return x[rows], y[rows]


def build():
    from zclip_dist import AdaGC, ZClip
    from zclip_dist.config import AdaGCConfig, ZClipConfig

    models = {k: nn.parallel.DistributedDataParallel(make_model()) for k in ("zclip", "adagc")}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for k, m in models.items()}
    clips = {"zclip": ZClip(config=ZClipConfig(warmup_steps=10, max_grad_norm=None)),
             "adagc": AdaGC(config=AdaGCConfig(warmup_steps=10, max_grad_norm=5.0))}
    return models, opts, clips


def save(path: str, step: int, models, opts, clips) -> None:
    state = {"step": step, **{f"{k}/model": m.module.state_dict() for k, m in models.items()},
             **{f"{k}/opt": o.state_dict() for k, o in opts.items()},
             **{f"{k}/state": c.state_dict() for k, c in clips.items()}}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load(path: str, models, opts, clips) -> int:
    state = torch.load(path, weights_only=False)
    for k in models:
        models[k].module.load_state_dict(state[f"{k}/model"])
        opts[k].load_state_dict(state[f"{k}/opt"])
        clips[k].load_state_dict(state.get(f"{k}/state"))  # absent: warns, starts from warmup
    return state["step"]


def record(step: int, clips) -> dict:
    z, a = clips["zclip"].last, clips["adagc"].last
    return {"step": step, "zclip": [float(z.coef), bool(z.spike)], "adagc": [float(c) for c in a.coefs.tolist()]}


def main(directory: str, n_steps: int, every: int, resume: bool) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    models, opts, clips = build()
    ckpt = os.path.join(directory, "ckpt.pt")
    start = load(ckpt, models, opts, clips) if resume else 0
    log = open(os.path.join(directory, "log.jsonl"), "a") if rank == 0 else None
    loss = nn.functional.mse_loss
    for step in range(start, n_steps):
        x, y = shard(step, rank, world)
        for k in models:
            opts[k].zero_grad()
            loss(models[k](x), y).backward()
            clips[k].step(models[k])
            opts[k].step()
        if log is not None:
            log.write(json.dumps(record(step, clips)) + "\n")
            log.flush()
            if (step + 1) % every == 0:
                save(ckpt, step + 1, models, opts, clips)
    if rank == 0:
        final = {k: [p.detach().clone() for p in m.parameters()] for k, m in models.items()}
        torch.save(final, os.path.join(directory, "final.pt"))
    # Both ranks reach the barrier before either tears gloo down; otherwise one can abort at exit with
    # "terminate called without an active exception" (docs/internals/deepspeed.md).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), "--resume" in sys.argv[4:])
