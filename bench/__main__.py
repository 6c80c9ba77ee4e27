"""``python -m bench [--quick]``: every benchmark, then bench/results/<device>.json and RESULTS tables.

The markdown table is printed and written next to the JSON; bench/RESULTS.md quotes it with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from . import clip_phase, counts, skip_cost
from .common import machine


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10M parameters only, fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result = {"machine": machine(), "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(f"machine: {result['machine']}", flush=True)
    result["counts"] = counts.run()
    if device.type == "cuda":
        from . import gpu_checks

        result["gpu_sync_free"] = gpu_checks.sync_free_steps(device)
        result["gpu_cuda_graph"] = gpu_checks.cuda_graph_replay(device)
    result["clip_phase"] = clip_phase.run(device, quick=args.quick, repeats=5 if args.quick else 20)
    result["skip_cost"] = skip_cost.run(device, n_params=10_000_000, n_tensors=50, repeats=10 if args.quick else 30)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{device.type}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    md = ["## counts per step", table(result["counts"], ["front_end", "host_reads_per_step", "collectives_per_step"]),
          "## clip phase", table(result["clip_phase"], ["device", "params", "tensors", "dtype", "variant", "median_ms",
                                                         "ratio_vs_clip_grad_norm", "reference_over_this"]),
          "## skip cost per optimizer (10M parameters, 50 tensors, fp32)", table(result["skip_cost"], skip_cost.COLUMNS)]
    for key in ("gpu_sync_free", "gpu_cuda_graph"):
        if key in result:
            md += [f"## {key}", "```", json.dumps(result[key], indent=1), "```"]
    text = "\n\n".join(md)
    with open(os.path.join(args.out, f"{device.type}.md"), "w") as f:
        f.write(f"machine: {result['machine']}\n\ncommand: `{result['command']}`\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
