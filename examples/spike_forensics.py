"""Spike forensics with the PyTorch drop-in: which layer and which data-parallel replica carried a spike.

    torchrun --nproc_per_node 2 examples/spike_forensics.py      # DDP on CPU (gloo), or one GPU per rank
    python examples/spike_forensics.py                           # one process: layers only
    zclip-dist events runs/forensics/metrics.jsonl               # the run's events, afterwards

At step 60 the last rank draws a corrupted batch (targets x100). ZClip clips the spike; its event names the
parameter that carried most of the squared norm and the replica whose batch did. ``on_event`` runs on
every rank when the events are read (every ``read_every`` steps: no host sync on the steps between);
here the replica named first writes down the sample ids of its batch at that step, so they can be
inspected or skipped on the next pass over the data.
"""

from __future__ import annotations

import collections
import json
import os

import torch
import torch.distributed as dist
from torch import nn

from zclip_dist import ZClip
from zclip_dist.forensics import Event, format_events

STEPS, BAD_STEP = 100, 60
LOG = "runs/forensics/metrics.jsonl"


def main() -> None:
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if rank == 0 and os.path.exists(LOG):
        os.remove(LOG)  # the sink appends: start this run's file afresh
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)).to(device)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    recent_ids: dict[int, list[int]] = collections.OrderedDict()  # clipper step -> this rank's sample ids
    suspicious: list[tuple[int, list[int]]] = []

    def on_event(event: Event) -> None:
        """Every rank: if my replica carried the norm, remember which samples it was."""
        if event.replicas and rank in event.replicas[0].ranks:
            suspicious.append((event.step, recent_ids.get(event.step, [])))

    zclip = ZClip(alpha=0.97, z_thresh=2.5, max_grad_norm=None, warmup_steps=20,
                  optimizer=opt, forensics={"top_k": 3, "replicas": True, "read_every": 10}, on_event=on_event,
                  log_jsonl=LOG, log_interval=10)
    zclip.attach(model)  # before the first backward: replica attribution from step 1

    gen = torch.Generator().manual_seed(1 + rank)
    for step in range(STEPS):
        ids = torch.randint(0, 100_000, (16,), generator=gen)
        x = torch.randn(16, 32, generator=gen)
        y = torch.randn(16, 8, generator=gen) * (100.0 if step == BAD_STEP and rank == world - 1 else 1.0)
        recent_ids[step + 1] = ids.tolist()  # the clipper counts steps from 1
        if len(recent_ids) > 50:
            recent_ids.popitem(last=False)
        opt.zero_grad()
        nn.functional.mse_loss(model(x.to(device)), y.to(device)).backward()
        zclip.step(model)
        opt.step()

    zclip.events()  # read what is left (on_event runs for those too)
    for step, ids in suspicious:
        print(f"rank {rank}: my batch carried the spike at step {step}; sample ids {ids[:6]}...")
    if rank == 0:
        with open(LOG) as f:
            print(format_events(json.loads(line) for line in f))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
