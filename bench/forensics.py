"""What spike forensics costs on ordinary steps: ``python -m bench.forensics [--quick] [--out DIR]``.

Three measurements, each against anchors timed in the same run, the variants called in turn so that
drift of a shared machine hits them alike (the overhead is the median of the paired differences):

1. **clip phase** (one process): ``ZClip(forensics=False).step`` vs ``ZClip().step`` (parameter
   attribution: the per-tensor squares ride in the norm's all-reduce, a top-k and a dozen scalar kernels
   write the event row on the device) on 10M parameters in 50 and 500 tensors.
2. **training step** (DDP on 2 gloo ranks): forward + backward + clip + SGD step of an MLP stack, with
   ZClip without forensics (the anchor), with parameter attribution, and with parameter and replica
   attribution (the comm hook reads each bucket once more before its all-reduce). The overhead is given
   in % of the anchor's step time, the number the ``replicas`` default is decided on (< 1%).
3. **the norm's all-reduce** (2 gloo ranks): one float (forensics off) against the vector that carries
   the per-tensor squares and the replica slots.
4. ``--deepspeed``: **a DeepSpeed ZeRO-2 training step** (2 gloo ranks, fp32, ``engine.backward`` +
   ``engine.step``) with the ``"zclip"`` entry's ``"forensics": false`` (the anchor), the default
   (parameters: nothing runs on an ordinary step, the event flag rides in the host read ZClip makes
   anyway) and ``{"replicas": true}`` (each IPG bucket's squared norm before DeepSpeed reduces it).

Times are CPU time of the calling thread (``time.thread_time``), where forward, backward (CPU autograd
runs on the calling thread), the comm hook and the clip run; waiting for gloo's threads and time the
scheduler gives to other processes are left out, so a loaded machine does not drown a 1% difference.
The extra read is also timed alone (``extra_read_ms``: the squared norm of a gradient-sized buffer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

from zclip_dist import ZClip

from .common import machine, make_grads

VARIANTS = {"no forensics": dict(forensics=False), "parameters": dict(forensics={"replicas": False}),
            "parameters + replicas": dict(forensics={"replicas": True})}


def cpu_median(fn, repeats: int, warmup: int = 2) -> float:
    """Median CPU time of ``fn`` on this thread, in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times)


def clip_phase(quick: bool) -> list[dict]:
    """The two clippers called in turn on the same gradients; overhead = median paired difference."""
    rows = []
    for tensors in (50, 500):
        params = make_grads(10_000_000, tensors, torch.float32, torch.device("cpu"))
        clippers = {name: ZClip(max_grad_norm=None, warmup_steps=2, **kw) for name, kw in list(VARIANTS.items())[:2]}
        times: dict[str, list[float]] = {name: [] for name in clippers}
        for i in range((20 if quick else 100) + 3):
            for name, zc in clippers.items():
                t0 = time.thread_time()
                zc.step(params)
                if i >= 3:
                    times[name].append(time.thread_time() - t0)
        base = statistics.median(times["no forensics"])
        for name, t in times.items():
            diff = statistics.median(v - b for v, b in zip(t, times["no forensics"]))
            rows.append({"params": 10_000_000, "tensors": tensors, "variant": name, "median_ms": 1e3 * (base + diff),
                         "extra_us": 1e6 * diff, "ratio": 1 + diff / base})
    return rows


#: Controls for the DDP step: the anchor again (measures the method's bias: should be ~0) and DDP's
#: own all-reduce as a Python comm hook without forensics (the part of the replica cost that any
#: Python comm hook pays, measurement or not).
CONTROLS = {"control: no forensics again": dict(forensics=False),
            "control: Python allreduce_hook, no forensics": dict(forensics=False)}


def _in_turn(names: list[str], step, steps: int) -> dict[str, list[float]]:
    """``step(name)`` (returning seconds) for every variant in turn, after three warm-up rounds; a shuffled
    order each round, with the same seed on every rank (the same collectives in the same order)."""
    import random

    for _ in range(3):
        for name in names:
            step(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    order, shuffle = list(names), random.Random(0).shuffle
    for _ in range(steps):
        shuffle(order)
        for name in order:
            times[name].append(step(name))
    return times


def _ddp_worker(rank: int, world: int, layers: int, width: int, tokens: int, steps: int, repeats: int) -> dict:
    """One DDP model per variant, stepped in turn (in a shuffled order each time, the same on every rank):
    each variant's step is timed next to the anchor's, so drift cancels in the paired differences."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(rank))
    runs = {}
    for name, kw in {**VARIANTS, **CONTROLS}.items():
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(
            nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.GELU())]))
        zc = ZClip(warmup_steps=3, **kw)
        zc.attach(model)
        if "allreduce_hook" in name:
            model.register_comm_hook(model.process_group, allreduce_hook)
        runs[name] = (model, torch.optim.SGD(model.parameters(), lr=1e-4), zc)

    def step(name: str) -> float:
        model, opt, zc = runs[name]
        t0 = time.thread_time()
        opt.zero_grad()
        model(x).square().mean().backward()
        zc.step(model)
        opt.step()
        return time.thread_time() - t0

    times = _in_turn(list(runs), step, steps)
    flat = torch.randn(layers * (width * width + width))
    times["extra read"] = [cpu_median(lambda: torch.linalg.vector_norm(flat, dtype=torch.float32).square(),
                                      repeats=repeats)]
    for n in ALL_REDUCE_SIZES:  # wall time: the collective waits on the other rank and gloo's threads
        buf = torch.zeros(n)
        walls = []
        for _ in range(repeats):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            for _ in range(20):
                torch.distributed.all_reduce(buf)
            walls.append((time.perf_counter() - t0) / 20)
        times[f"all_reduce {n}"] = [min(walls)]
    return times


#: The norm's all-reduce: one scalar; 500 tensors; + 2,048 replica slots; 8,192 floats.
ALL_REDUCE_SIZES = (1, 500, 2548, 8192)


def ddp_step(quick: bool, layers: int, width: int, tokens: int) -> tuple[list[dict], list[dict]]:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.distributed import run_ranks  # the tests' gloo harness, reused

    results = run_ranks(_ddp_worker, 2, layers, width, tokens, 40 if quick else 200, 10 if quick else 40,
                        timeout=3600)
    base = statistics.median(t for r in results for t in r["no forensics"])
    read = statistics.median(r["extra read"][0] for r in results)
    steps = []
    for name in {**VARIANTS, **CONTROLS}:
        # the median of the paired differences (same step index, same rank) over the anchor's median
        diff = statistics.median(v - b for r in results for v, b in zip(r[name], r["no forensics"]))
        steps.append({"ranks": 2, "params": layers * (width * width + width), "tokens_per_rank": tokens,
                      "variant": name, "step_ms": 1e3 * (base + diff), "overhead_pct": 100 * diff / base,
                      **({"extra_read_ms": 1e3 * read, "extra_read_pct": 100 * read / base} if "replicas" in name
                         else {})})
    walls = {n: min(r[f"all_reduce {n}"][0] for r in results) for n in ALL_REDUCE_SIZES}
    reduces = [{"floats": n, "all_reduce_us": 1e6 * w, "ratio_vs_scalar": w / walls[1]} for n, w in walls.items()]
    return steps, reduces


DS_VARIANTS = {"no forensics": False, "parameters": {"replicas": False}, "parameters + replicas": {"replicas": True},
               "control: no forensics again": False}


def _ds_worker(rank: int, world: int, layers: int, width: int, tokens: int, steps: int) -> dict:
    """One ZeRO-2 engine per variant, stepped in turn (shuffled, the same order on every rank)."""
    from zclip_dist import deepspeed as zds

    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(rank))
    runs = {}
    for name, forensics in DS_VARIANTS.items():
        torch.manual_seed(0)
        model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.GELU())])
        config = {"train_micro_batch_size_per_gpu": tokens, "gradient_accumulation_steps": 1,
                  "train_batch_size": tokens * world, "steps_per_print": 10**9, "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": 2}, "zclip": {"warmup_steps": 3, "forensics": forensics}}
        runs[name], *_ = zds.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-4),
                                        config=config)

    def step(name: str) -> float:
        engine = runs[name]
        t0 = time.thread_time()
        engine.backward(engine(x).square().mean())
        engine.step()
        return time.thread_time() - t0

    times = _in_turn(list(runs), step, steps)
    times["events"] = [float(len(runs[name]._zclip.events())) for name in runs]  # none expected: ordinary steps
    return times


def ds_step(quick: bool, layers: int, width: int, tokens: int) -> list[dict]:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from tests.distributed import run_ranks
    from tests.ds_harness import call_in_rank  # DeepSpeed on gloo, as the tests run it

    results = run_ranks(call_in_rank, 2, _ds_worker, layers, width, tokens, 40 if quick else 200, init=False,
                        timeout=3600)
    base = statistics.median(t for r in results for t in r["no forensics"])
    rows = []
    for i, name in enumerate(DS_VARIANTS):
        diff = statistics.median(v - b for r in results for v, b in zip(r[name], r["no forensics"]))
        rows.append({"ranks": 2, "params": layers * (width * width + width), "tokens_per_rank": tokens,
                     "variant": name, "step_ms": 1e3 * (base + diff), "overhead_pct": 100 * diff / base,
                     "events": int(max(r["events"][i] for r in results))})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.forensics", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=256, help="rows per rank per step")
    parser.add_argument("--skip-clip-phase", action="store_true", help="only the DDP step and the all-reduce")
    parser.add_argument("--skip-ddp", action="store_true", help="no DDP step and all-reduce section")
    parser.add_argument("--deepspeed", action="store_true", help="also a DeepSpeed ZeRO-2 step (2 gloo ranks)")
    parser.add_argument("--out", default=None, help="write the JSON and markdown here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    command = "python -m bench.forensics " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"machine": machine(), "command": command.strip()}
    result["clip_phase"] = [] if args.skip_clip_phase else clip_phase(args.quick)
    result["ddp_step"], result["all_reduce"] = (([], []) if args.skip_ddp else
                                                ddp_step(args.quick, args.layers, args.width, args.tokens))
    result["deepspeed_step"] = ds_step(args.quick, args.layers, args.width, args.tokens) if args.deepspeed else []
    from .__main__ import table

    sections = []
    if result["clip_phase"]:
        sections += ["## clip phase, one process (ratio vs no forensics)",
                     table(result["clip_phase"], ["params", "tensors", "variant", "median_ms", "extra_us", "ratio"])]
    if result["ddp_step"]:
        sections += ["## DDP training step, 2 gloo ranks (overhead vs no forensics)",
                     table(result["ddp_step"], ["ranks", "params", "tokens_per_rank", "variant", "step_ms",
                                                "overhead_pct", "extra_read_ms", "extra_read_pct"]),
                     "## gloo all-reduce, 2 ranks, wall time (the norm's collective with the squares in it)",
                     table(result["all_reduce"], ["floats", "all_reduce_us", "ratio_vs_scalar"])]
    if result["deepspeed_step"]:
        sections += ["## DeepSpeed ZeRO-2 training step, fp32, 2 gloo ranks (overhead vs forensics off)",
                     table(result["deepspeed_step"], ["ranks", "params", "tokens_per_rank", "variant", "step_ms",
                                                      "overhead_pct", "events"])]
    text = "\n\n".join(sections)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "forensics_cpu.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "forensics_cpu.md"), "w") as f:
            f.write(f"machine: {result['machine']}\n\ncommand: `{result['command']}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
