"""What spike forensics costs on ordinary Megatron steps: ``python -m bench.megatron_forensics [--quick]``.

Two gloo ranks (DP2, the distributed optimizer), a real megatron-core ``GPTModel`` on CPU (the tests'
megatron-core CPU shim), ZClip attached with forensics and replica attribution. Each measured step is
forward + backward + Megatron's DP reduction (``finish_grad_sync``) + ``optimizer.step()`` on ordinary
(non-event) steps, in three variants stepped in turn on the same model and optimizer, the switch being
the attribute the step reads (so model, data and optimizer are the same):

* ``no forensics`` -- the anchor (``optimizer._zclip_forensics = None``);
* ``parameters`` -- forensics on, replicas off: ZClip reads its decision on the host (CPU tensors) and
  does nothing more on an ordinary step;
* ``parameters + replicas`` -- each bucket's gradients are read once more where its DP reduction starts.

Overhead: the median of the paired differences (same step index, same rank) over the anchor's median,
CPU time of the calling thread (``time.thread_time``), as bench/forensics.py does. On a shared machine
that difference is noisy at the 1% level, so the added work is also timed alone (``alone_ms``: the
host-side decision check of an ordinary step; the replicas' read of every bucket's gradients).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

VARIANTS = ("no forensics", "parameters", "parameters + replicas")


def _worker(rank: int, world: int, hidden: int, layers: int, seq: int, batch: int, steps: int) -> dict:
    import random
    import warnings

    warnings.filterwarnings("ignore")
    from tests import megatron_cpu_shim

    megatron_cpu_shim.apply()
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    from zclip_dist import megatron as zmeg
    from zclip_dist.config import ZClipConfig

    from .forensics import cpu_median

    torch.set_num_threads(1)
    ps.initialize_model_parallel()
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    vocab = 1024
    cfg = TransformerConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=4, ffn_hidden_size=4 * hidden,
                            use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
                            add_bias_linear=False, gradient_accumulation_fusion=False)
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=vocab, max_sequence_length=seq)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(use_distributed_optimizer=True,
                                                                    grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, use_distributed_optimizer=True,
                                                 clip_grad=1.0), [ddp])
    zmeg.wrap_optimizer(opt, ZClipConfig(warmup_steps=3, max_grad_norm=None, z_thresh=1e6), model=[ddp],
                        forensics={"replicas": True})
    fx = zmeg.forensics_of(opt)
    meter = fx.meter
    gen = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
    position_ids = torch.arange(seq).expand(batch, seq)
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)  # True: masked out

    def step(variant: str) -> float:
        opt._zclip_forensics = None if variant == "no forensics" else fx
        fx.meter = meter if variant == "parameters + replicas" else None
        t0 = time.thread_time()
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = ddp(tokens[:, :-1], position_ids, mask, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        ddp.finish_grad_sync()
        ok, _, _ = opt.step()
        elapsed = time.thread_time() - t0
        assert ok and not fx.recorder.read(), "an event step: the measurement is of ordinary steps"
        return elapsed

    for _ in range(2):
        for v in VARIANTS:
            step(v)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    for _ in range(steps):
        random.Random(len(times[VARIANTS[0]])).shuffle(order)  # the same order on every rank
        for v in order:
            times[v].append(step(v))
    times["params"] = [float(sum(p.numel() for p in model.parameters()))]
    # The added work alone: an ordinary step's host-side decision check, and the bucket read of replicas.
    opt._zclip_forensics, fx.meter = fx, meter
    bucket_params = [p for g in ddp.bucket_groups for b in g.buckets for p in b.params_list]
    times["alone parameters"] = [cpu_median(lambda: fx.after_zclip_step(opt.zclip), 200)]
    times["alone parameters + replicas"] = [
        cpu_median(lambda: meter.add_grads(bucket_params, [p.main_grad for p in bucket_params]), 50)]
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.megatron_forensics", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    parser.add_argument("--out", default=None, help="write the JSON and markdown here")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.distributed import run_ranks  # the tests' gloo harness, reused

    from .__main__ import table
    from .common import machine

    results = run_ranks(_worker, 2, args.hidden, args.layers, args.seq, args.batch, 10 if args.quick else 40,
                        timeout=3600)
    base = statistics.median(t for r in results for t in r["no forensics"])
    rows = []
    for v in VARIANTS:
        diff = statistics.median(a - b for r in results for a, b in zip(r[v], r["no forensics"]))
        row = {"ranks": 2, "params": int(results[0]["params"][0]), "tokens_per_rank": args.batch * args.seq,
               "variant": v, "step_ms": 1e3 * (base + diff), "overhead_pct": 100 * diff / base}
        if v != "no forensics":  # the added work timed alone, in % of the anchor's step
            alone = statistics.median(r[f"alone {v}"][0] for r in results)
            row.update(alone_ms=1e3 * alone, alone_pct=100 * alone / base)
        rows.append(row)
    command = "python -m bench.megatron_forensics " + " ".join(sys.argv[1:] if argv is None else argv)
    text = ("## Megatron GPT step, DP2 DistOpt, 2 gloo ranks (ZClip; overhead vs no forensics)\n\n"
            + table(rows, ["ranks", "params", "tokens_per_rank", "variant", "step_ms", "overhead_pct", "alone_ms",
                           "alone_pct"]))
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "megatron_forensics_cpu.json"), "w") as f:
            json.dump({"machine": machine(), "command": command.strip(), "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "megatron_forensics_cpu.md"), "w") as f:
            f.write(f"machine: {machine()}\n\ncommand: `{command.strip()}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
