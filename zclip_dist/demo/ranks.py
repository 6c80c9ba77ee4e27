"""Start the demo's ranks on this machine: gloo on CPU (simulated ranks), NCCL on GPUs.

The ranks are spawned processes (no launcher needed); each initialises DeepSpeed's communication, runs
:func:`~zclip_dist.demo.train.rank_main` and sends rank 0's result back through a queue.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue as queue_mod
import socket
import sys
import traceback
import warnings
from typing import Any

import torch
import torch.multiprocessing as mp

from .settings import DemoSettings

__all__ = ["use_gpus", "gpu_count", "spawn"]


def use_gpus() -> bool:
    """GPUs are used when present, unless ``DS_ACCELERATOR=cpu`` asks for simulated CPU ranks."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def gpu_count() -> int:
    return torch.cuda.device_count() if use_gpus() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, settings: DemoSettings, port: int, queue: Any) -> None:
    gpu = use_gpus()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(settings.world), LOCAL_WORLD_SIZE=str(settings.world))
    if not gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported
    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's deprecated torch collectives
    try:
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        from .train import rank_main

        ds_logger.setLevel(logging.WARNING)
        if not gpu:
            # Only inference all-reduce uses this op; building it needs a C++ compiler and ~30 s.
            sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        else:
            torch.cuda.set_device(rank)
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
        result = rank_main(settings)
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():  # orderly shutdown; without it gloo ranks sometimes abort on exit
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()


def spawn(settings: DemoSettings, timeout: float = 1800) -> dict[str, Any]:
    """Run :func:`rank_main` on ``settings.world`` ranks; return rank 0's result. Raises on any rank's error."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, settings, port, queue), daemon=False) for r in range(settings.world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in procs:
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except queue_mod.Empty:
                errors.append(f"no answer from a rank within {timeout:.0f} s")
                break
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break  # the other ranks are stuck in a collective: stop them below
    finally:
        for p in procs:
            p.join(5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return results[0]
