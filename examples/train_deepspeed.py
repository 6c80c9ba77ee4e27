"""A plain DeepSpeed training script with nothing ZClip-specific in it but the config entry.

With zclip_dist pip-installed, ``deepspeed.initialize`` attaches ZClip however the script is started:

    deepspeed --num_gpus 2 examples/train_deepspeed.py --steps 8
    torchrun --nproc_per_node 2 examples/train_deepspeed.py --steps 8
    mpirun -np 2 python examples/train_deepspeed.py --steps 8

The launcher module does the same explicitly (also with ``ZCLIP_DIST_AUTO=0``; launch/deepspeed_*.sh use it):

    deepspeed --num_gpus 2 --module zclip_dist.deepspeed.launch examples/train_deepspeed.py --steps 8

``--report FILE`` writes one JSON line per rank: whether ZClip was attached and its last metrics.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

import deepspeed
from deepspeed.accelerator import get_accelerator


def ds_config(args: argparse.Namespace) -> dict:
    if args.deepspeed_config:
        with open(args.deepspeed_config) as f:
            return json.load(f)
    return {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        # torch_adam: torch.optim.AdamW instead of the FusedAdam op, which would be compiled on first use.
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": args.zero_stage},
        "gradient_clipping": 1.0,  # ZClip's cap, since the entry below sets no max_grad_norm
        "zclip": {"alpha": 0.97, "z_thresh": 2.5, "warmup_steps": 4},
        "steps_per_print": 4,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--deepspeed_config", default=None, help="JSON config (default: a small built-in one)")
    parser.add_argument("--distributed-port", type=int, default=29500, help="used by MPI discovery")
    parser.add_argument("--report", default=None, help="append one JSON line per rank here")
    args = parser.parse_args()

    torch.set_num_threads(1)
    on_cpu = get_accelerator().device_name() == "cpu"
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else None, distributed_port=args.distributed_port)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 1))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(args))

    rank = engine.global_rank
    gen = torch.Generator().manual_seed(1 + engine.global_rank)
    for step in range(args.steps):
        x = torch.randn(8, 16, generator=gen).to(engine.device)
        y = x[:, :1] * 2.0
        if step == args.steps - 1:
            y = y * 100.0  # a loss spike: ZClip clips this step
        loss = F.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()

    zclip = getattr(engine, "_zclip", None)
    record = {"rank": rank, "world_size": engine.world_size, "zclip": zclip is not None,
              "metrics": zclip.metrics() if zclip is not None else None,
              "grad_norm": float(engine.get_global_grad_norm())}
    if args.report:
        with open(args.report, "a") as f:
            f.write(json.dumps(record) + "\n")
    if rank == 0:
        print("final", json.dumps(record))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
