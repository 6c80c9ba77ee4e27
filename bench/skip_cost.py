"""The cost of the true skip, per optimizer kind: ``ZClip(..., optimizer=opt)`` against ``clip_grad_norm_``.

``python -m bench.skip_cost [--params N] [--tensors K] [--repeats R] [--out FILE]``

Per optimizer kind, on the same parameters and gradients, median wall time of one training step's
clip + update (the backward is the same for every variant and is left out):

* ``anchor``: ``clip_grad_norm_(foreach=True)`` then ``opt.step()`` (no skip at all);
* ``skip``: ``zclip.step(params)`` then the gated ``opt.step()`` on a finite step -- the usual price;
* ``zeroing``: ``ZClip`` without ``optimizer=`` (the ``nan_to_num_`` pass, the optimizer steps);
* ``skipped``: the gated pair on a non-finite step (norm, statistics, no update);
* ``gate_us``: the gate alone, armed ``opt.step()`` minus bare ``opt.step()`` on a 1k-element tensor.

Medians over ``--repeats`` calls, the variants interleaved call by call so that drift of a shared
machine hits all of them alike. Host reads at ``opt.step()`` are counted, not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Callable

import torch

from zclip_dist import ZClip
from zclip_dist.pytorch.skip import StepGate

from .common import machine, make_grads, median_time

OPTIMIZERS: dict[str, Callable] = {
    "SGD momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
    "SGD momentum fused": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, fused=True),
    "Adam for-loop": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=False),
    "Adam foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
    "AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-3),
    "Adagrad fused": lambda ps: torch.optim.Adagrad(ps, lr=1e-3, fused=True),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9),
}


def _host_reads(fn: Callable[[], object]) -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.sync_guard import count_host_reads  # the tests' instrumentation, reused

    with count_host_reads() as reads:
        fn()
    return reads["__bool__"]  # the gate's read (the optimizers' own CPU step counters use .item())


def gate_overhead_us(make_opt: Callable, device: torch.device, repeats: int) -> float:
    p = torch.nn.Parameter(torch.zeros(1024, device=device))
    p.grad = torch.full_like(p, 1e-3)
    bare, gated = make_opt([p]), make_opt([p])
    for opt in (bare, gated):  # state exists: a fused optimizer takes the device path
        opt.step()
    gate = StepGate(gated)
    flag = torch.zeros((), dtype=torch.bool, device=device)

    def armed() -> None:
        gate.arm(flag)
        gated.step()

    return (median_time(armed, device, repeats=repeats) - median_time(bare.step, device, repeats=repeats)) * 1e6


def run(device: torch.device, *, n_params: int, n_tensors: int, repeats: int) -> list[dict]:
    rows = []
    for name, make_opt in OPTIMIZERS.items():
        params = make_grads(n_params, n_tensors, torch.float32, device)
        good = [p.grad.clone() for p in params]
        anchor_opt, skip_opt, zero_opt = make_opt(params), make_opt(params), make_opt(params)
        skip_clip = ZClip(max_grad_norm=None, warmup_steps=2, optimizer=skip_opt)
        zero_clip = ZClip(max_grad_norm=None, warmup_steps=2)

        def restore(bad: bool = False) -> None:
            for p, g in zip(params, good):
                p.grad.copy_(g)
            if bad:
                params[0].grad[0] = float("nan")

        def anchor() -> None:
            torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True)
            anchor_opt.step()

        def skip() -> None:
            skip_clip.step(params)
            skip_opt.step()

        def zeroing() -> None:
            zero_clip.step(params)
            zero_opt.step()

        for _ in range(3):  # past warmup, optimizer state created
            anchor(), skip(), zeroing()
        reads_finite = _host_reads(skip)
        variants = (("anchor", anchor, False), ("skip", skip, False), ("zeroing", zeroing, False),
                    ("skipped", skip, True))
        times: dict[str, list[float]] = {v: [] for v, _, _ in variants}
        for _ in range(repeats):  # interleaved: drift of a shared machine hits every variant alike
            for variant, fn, bad in variants:
                restore(bad)
                times[variant].append(median_time(fn, device, repeats=1, warmup=0))
        med = {v: statistics.median(t) for v, t in times.items()}
        restore(True)
        reads_skipped = _host_reads(skip)
        fused = bool(getattr(skip_opt, "_step_supports_amp_scaling", False))
        rows.append({
            "device": device.type, "params": n_params, "tensors": n_tensors, "optimizer": name,
            "skip_by": "found_inf on the device" if fused else "host read, step not called",
            "host_reads_at_step": reads_finite, "host_reads_skipped": reads_skipped,
            "anchor_ms": med["anchor"] * 1e3, "skip_ms": med["skip"] * 1e3,
            "ratio_skip_vs_anchor": med["skip"] / med["anchor"],
            "zeroing_ms": med["zeroing"] * 1e3, "ratio_zeroing_vs_anchor": med["zeroing"] / med["anchor"],
            "skipped_step_ms": med["skipped"] * 1e3,
            "gate_us": gate_overhead_us(make_opt, device, repeats=max(50, 10 * repeats)),
        })
        print(json.dumps(rows[-1]), flush=True)
        del params, good
    return rows


COLUMNS = ["optimizer", "skip_by", "host_reads_at_step", "anchor_ms", "skip_ms", "ratio_skip_vs_anchor",
           "zeroing_ms", "ratio_zeroing_vs_anchor", "skipped_step_ms", "gate_us"]


def main(argv: list[str] | None = None) -> int:
    from .__main__ import table

    parser = argparse.ArgumentParser(prog="python -m bench.skip_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--tensors", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/skip_cost_<device>.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = run(device, n_params=args.params, n_tensors=args.tensors, repeats=args.repeats)
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"skip_cost_{device.type}.json")
    command = " ".join(["python -m bench.skip_cost", *(sys.argv[1:] if argv is None else argv)])
    with open(out, "w") as f:
        json.dump({"machine": machine(), "command": command, "rows": rows}, f, indent=1)
    md = table(rows, COLUMNS)
    with open(out[:-len(".json")] + ".md", "w") as f:
        f.write(f"machine: {machine()}\n\ncommand: `{command}`\n\n{md}\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
