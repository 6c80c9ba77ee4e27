"""Run a function on N simulated ranks (gloo, CPU) and collect what each rank returns.

Used by every multi-rank test: ``results = run_ranks(fn, world_size, *args)`` spawns fresh processes,
initialises torch.distributed with gloo on a free loopback port, calls ``fn(rank, world_size, *args)``
and returns the per-rank return values in rank order. An exception on any rank fails the test with
that rank's traceback.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import socket
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tp_dp_groups(world: int, tp: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup, int, int]:
    """Megatron-style layout: consecutive ranks form a TP group, ranks tp apart a DP group.

    Every rank creates every group (new_group is collective over WORLD); returns this rank's TP group,
    DP group, TP rank and DP rank.
    """
    dp = world // tp
    tp_groups = [dist.new_group(list(range(d * tp, (d + 1) * tp))) for d in range(dp)]
    dp_groups = [dist.new_group(list(range(t, world, tp))) for t in range(tp)]
    rank = dist.get_rank()
    return tp_groups[rank // tp], dp_groups[rank % tp], rank % tp, rank // tp


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, init: bool,
            store_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        if init:
            # A file store needs no port: no race with other test runs for a "free" port.
            dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", pickle.dumps(result)))  # plain bytes: no shared-memory handles
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if init and dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, init: bool = True, timeout: float = 600) -> list[Any]:
    """Spawn ``world_size`` ranks running ``fn(rank, world_size, *args)``; return their results by rank.

    ``init=False`` leaves process-group creation to ``fn`` (engines that initialise themselves).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    store = tempfile.NamedTemporaryFile(prefix="zclip_store_", delete=False)
    store.close()
    os.unlink(store.name)  # the file store creates it; a leftover file would hold a stale rendezvous
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, init, store.name))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    wait = timeout
    for _ in procs:
        try:
            rank, status, payload = queue.get(timeout=wait)
        except queue_mod.Empty:
            errors.append(f"no answer from some rank within {wait}s (exit codes {[p.exitcode for p in procs]})")
            break
        if status == "ok":
            results[rank] = pickle.loads(payload)
        else:
            errors.append(f"--- rank {rank} ---\n{payload}")
            wait = 30  # the others may be stuck in a collective with the failed rank: do not wait long
    for p in procs:
        p.join(timeout if not errors else 5)
        if p.is_alive():
            p.kill()
    if os.path.exists(store.name):
        os.unlink(store.name)
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(errors))
    if len(results) != world_size:
        raise AssertionError(f"ranks {sorted(set(range(world_size)) - set(results))} returned nothing")
    return [results[r] for r in range(world_size)]
