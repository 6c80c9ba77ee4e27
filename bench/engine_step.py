"""DeepSpeed optimizer-step time with ZClip vs DeepSpeed's own fixed clipping, in one run.

``python -m bench.engine_step [--stages 2 3] [--layers 24] [--width 2048]``: one process (world size 1),
a stack of Linear layers (24 x 2048^2 = 100M parameters by default), bf16, torch AdamW. For each ZeRO
stage it builds two engines -- ``"gradient_clipping": 1.0`` and the same plus a ``"zclip"`` entry --
and times ``engine.step()`` (norm, clip, optimizer update) after a backward pass, median of the repeats,
device drained before and after. ZClip's ceiling rides on the multiply DeepSpeed already makes, so the
ratio measures the decision's cost alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def _init() -> None:
    import sys

    import deepspeed
    import deepspeed.comm.torch  # noqa: F401 - the module object patched below

    # DeepSpeed JIT-builds an inference-only shm op at init (25 s, a C++ toolchain); nothing here uses it.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29671")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def time_steps(stage: int, zclip: bool, layers: int, width: int, repeats: int) -> float:
    import deepspeed

    from zclip_dist.deepspeed import initialize

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
    }
    if zclip:
        config["zclip"] = {"warmup_steps": 3}
    engine, *_ = initialize(model=model, model_parameters=model.parameters(), config=config)
    device = engine.device
    x = torch.randn(4, width, device=device, dtype=torch.bfloat16)
    times = []
    for i in range(repeats + 5):
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    del engine
    deepspeed.utils.groups.mpu = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2, help="alternate fixed/ZClip this many times")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    _init()
    rows = []
    for stage in args.stages:
        fixed, ours = [], []
        for _ in range(args.rounds):  # alternate, so drift of the machine hits both equally
            fixed.append(time_steps(stage, False, args.layers, args.width, args.repeats))
            ours.append(time_steps(stage, True, args.layers, args.width, args.repeats))
        row = {"zero_stage": stage, "params_M": args.layers * args.width ** 2 / 1e6,
               "fixed_ms": 1e3 * min(fixed), "zclip_ms": 1e3 * min(ours), "ratio": min(ours) / min(fixed)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
