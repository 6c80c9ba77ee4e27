"""``python -m bench.replay_speed``: how fast ``zclip-dist replay`` simulates, and its plot of a long trace.

Times, on one synthetic trace (log-normal noise, one-step spikes, two level shifts, a few NaN steps):

* the host recurrences replay uses (``host_stats``) over the whole trace, ZClip and AdaGC-global;
* the anchor, in the same run: the training code stepping CPU tensors one step at a time (``Clipper`` +
  ``metrics_tensor``, ``AdaGCClipper``), which is what replay ran before, on the first steps;
* the command end to end, as a user runs it: ``zclip-dist replay TRACE.csv --png ...`` (reading, both
  simulations, the report and the PNG), whose PNG is kept as ``bench/results/replay_1m.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from zclip_dist.clipper import AdaGCClipper, Clipper
from zclip_dist.config import AdaGCConfig, ZClipConfig
from zclip_dist.host_stats import adagc_global_host, zclip_host

from .common import machine

HERE = os.path.dirname(os.path.abspath(__file__))


def trace(steps: int, seed: int = 0) -> list[float]:
    """A pretraining-like norm: decaying from 2 to 0.5, 10% log-normal noise, a data-mixture change at 60%
    (x1.8 for good), one-step spikes (x5 to x100) every ~5,000 steps, a NaN every 250,000 steps."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(steps, dtype=torch.float64) / steps
    level = 0.5 + 1.5 * torch.exp(-5.0 * t)
    level[int(0.6 * steps):] *= 1.8
    norms = level * torch.exp(0.1 * torch.randn(steps, generator=gen, dtype=torch.float64))
    spikes = torch.arange(1000, steps, 4999)
    norms[spikes] *= 5.0 + 95.0 * torch.rand(len(spikes), generator=gen, dtype=torch.float64)
    out = norms.tolist()
    for i in range(777, steps, 250_000):
        out[i] = math.nan
    return out


#: ZClip as replayed: no cap (the spikes are the point), regime-shift recovery on.
SETTINGS = {"max_grad_norm": None, "recovery_steps": 20}


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def device_zclip(norms: list[float], config: ZClipConfig) -> None:
    clipper = Clipper(config, device="cpu", cuda_graph=False)
    values = torch.tensor(norms, dtype=torch.float64)
    for i in range(len(norms)):
        clipper.step(values[i])
        clipper.metrics_tensor()


def device_adagc(norms: list[float], config: AdaGCConfig) -> None:
    clipper = AdaGCClipper(config, cuda_graph=False)
    clipper.bind(("global",), torch.device("cpu"))
    values = torch.tensor(norms, dtype=torch.float32)
    for i in range(len(norms)):
        g = values[i]
        clipper.step((g * g).reshape(1), g)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1_000_000, help="trace length (default %(default)s)")
    parser.add_argument("--anchor-steps", type=int, default=5_000, help="steps of the tensor anchor (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings (default %(default)s)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    norms = trace(args.steps)
    zcfg, acfg = ZClipConfig(**SETTINGS), AdaGCConfig(mode="adagc-global")
    host_z = best_of(lambda: zclip_host(zcfg, norms), args.repeats)
    host_a = best_of(lambda: adagc_global_host(acfg, norms), args.repeats)
    head = norms[: args.anchor_steps]
    dev_z = best_of(lambda: device_zclip(head, zcfg), 1)
    dev_a = best_of(lambda: device_adagc(head, acfg), 1)

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "replay_1m.png" if args.steps == 1_000_000 else f"replay_{args.steps}.png")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.csv")
        with open(path, "w") as f:
            f.write("step,grad_norm\n" + "".join(f"{i},{v!r}\n" for i, v in enumerate(norms)))
        command = [sys.executable, "-m", "zclip_dist.cli", "replay", path, "--zclip-max-grad-norm", "none",
                   "--zclip-recovery-steps", str(SETTINGS["recovery_steps"]), "--png", png, "--show", "3"]
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        end_to_end = time.perf_counter() - t0
    rows = [
        {"what": "ZClip, host recurrence (replay)", "steps": args.steps, "s": host_z, "steps_per_s": args.steps / host_z},
        {"what": "ZClip, Clipper on CPU tensors (anchor)", "steps": len(head), "s": dev_z, "steps_per_s": len(head) / dev_z},
        {"what": "AdaGC-global, host recurrence (replay)", "steps": args.steps, "s": host_a, "steps_per_s": args.steps / host_a},
        {"what": "AdaGC-global, AdaGCClipper on CPU tensors (anchor)", "steps": len(head), "s": dev_a,
         "steps_per_s": len(head) / dev_a},
        {"what": "`zclip-dist replay TRACE.csv --png` end to end", "steps": args.steps, "s": end_to_end,
         "steps_per_s": args.steps / end_to_end},
    ]
    result = {"machine": machine(), "command": "python -m bench.replay_speed " + " ".join(sys.argv[1:] if argv is None else argv),
              "rows": rows, "zclip_speedup": rows[0]["steps_per_s"] / rows[1]["steps_per_s"],
              "adagc_speedup": rows[2]["steps_per_s"] / rows[3]["steps_per_s"], "png": os.path.relpath(png, HERE),
              "report": done.stdout}
    with open(os.path.join(args.out, "replay.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"machine: {result['machine']}")
    print("| what | steps | seconds | steps/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['steps']:,} | {r['s']:.2f} | {r['steps_per_s']:,.0f} |")
    print(f"host / tensor anchor: ZClip {result['zclip_speedup']:.0f}x, AdaGC-global {result['adagc_speedup']:.0f}x")
    print(f"wrote {png}; median of the trace {statistics.median(v for v in norms if v == v):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
