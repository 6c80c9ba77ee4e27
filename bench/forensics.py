"""What spike forensics costs on ordinary steps: ``python -m bench.forensics [--quick] [--out DIR]``.

Two measurements, each against anchors timed in the same run, variants interleaved round by round so
that drift of a shared machine hits them alike:

1. **clip phase** (one process): ``ZClip(forensics=False).step`` vs ``ZClip().step`` (parameter
   attribution: the per-tensor squares ride in the norm's all-reduce, a top-k and a dozen scalar kernels
   write the event row on the device) on 10M parameters in 50 and 500 tensors.
2. **training step** (DDP on 2 gloo ranks): forward + backward + clip + SGD step of an MLP stack, with
   ZClip without forensics (the anchor), with parameter attribution, and with parameter and replica
   attribution (the comm hook reads each bucket once more before its all-reduce). The overhead is given
   in % of the anchor's step time, the number the ``replicas`` default is decided on (< 1%). Step times
   are the minimum over rounds of each round's median (a shared machine only ever adds time). The extra
   read is also timed alone (``extra_read_ms``: the squared norm of a gradient-sized buffer), a number
   that does not drown in the step's noise.
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

from .common import machine, make_grads, median_time

VARIANTS = {"no forensics": dict(forensics=False), "parameters": dict(forensics={"replicas": False}),
            "parameters + replicas": dict(forensics=True)}


def clip_phase(quick: bool) -> list[dict]:
    rows = []
    for tensors in (50, 500):
        params = make_grads(10_000_000, tensors, torch.float32, torch.device("cpu"))
        clippers = {name: ZClip(max_grad_norm=None, warmup_steps=2, **kw) for name, kw in list(VARIANTS.items())[:2]}
        times: dict[str, list[float]] = {name: [] for name in clippers}
        for _ in range(3 if quick else 7):
            for name, zc in clippers.items():
                times[name].append(median_time(lambda: zc.step(params), torch.device("cpu"), repeats=5))
        base = statistics.median(times["no forensics"])
        for name, t in times.items():
            t = statistics.median(t)
            rows.append({"params": 10_000_000, "tensors": tensors, "variant": name, "median_ms": 1e3 * t,
                         "ratio": t / base})
    return rows


def _ddp_worker(rank: int, world: int, layers: int, width: int, tokens: int, steps: int, rounds: int) -> dict:
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    times["extra read"] = []
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(rank))
    flat = torch.randn(layers * (width * width + width))
    for _ in range(rounds):
        for name, kw in VARIANTS.items():
            torch.manual_seed(0)
            model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.GELU())])
            model = nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.SGD(model.parameters(), lr=1e-4)
            zc = ZClip(warmup_steps=3, **kw)
            zc.attach(model)
            step_times = []
            for i in range(steps + 3):
                torch.distributed.barrier()
                t0 = time.perf_counter()
                opt.zero_grad()
                model(x).square().mean().backward()
                zc.step(model)
                opt.step()
                if i >= 3:
                    step_times.append(time.perf_counter() - t0)
            times[name].append(statistics.median(step_times))
        times["extra read"].append(median_time(lambda: torch.linalg.vector_norm(flat, dtype=torch.float32).square(),
                                               torch.device("cpu"), repeats=10))
    return times


def ddp_step(quick: bool, layers: int, width: int, tokens: int) -> list[dict]:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.distributed import run_ranks  # the tests' gloo harness, reused

    results = run_ranks(_ddp_worker, 2, layers, width, tokens, 5 if quick else 10, 2 if quick else 4)
    times = {name: min(min(r[name]) for r in results) for name in VARIANTS}
    base = times["no forensics"]
    read = statistics.median(t for r in results for t in r["extra read"])
    return [{"ranks": 2, "params": layers * (width * width + width), "tokens_per_rank": tokens, "variant": name,
             "step_ms": 1e3 * t, "overhead_pct": 100 * (t / base - 1),
             **({"extra_read_ms": 1e3 * read, "extra_read_pct": 100 * read / base} if "replicas" in name else {})}
            for name, t in times.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.forensics", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=256, help="rows per rank per step")
    parser.add_argument("--out", default=None, help="write the JSON and markdown here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    command = "python -m bench.forensics " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"machine": machine(), "command": command.strip()}
    result["clip_phase"] = clip_phase(args.quick)
    result["ddp_step"] = ddp_step(args.quick, args.layers, args.width, args.tokens)
    from .__main__ import table

    text = "\n\n".join(["## clip phase, one process (ratio vs no forensics)",
                        table(result["clip_phase"], ["params", "tensors", "variant", "median_ms", "ratio"]),
                        "## DDP training step, 2 gloo ranks (overhead vs no forensics)",
                        table(result["ddp_step"], ["ranks", "params", "tokens_per_rank", "variant", "step_ms",
                                                   "overhead_pct", "extra_read_ms", "extra_read_pct"])])
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
