"""What DeepSpeed users run, with nothing of zclip_dist in it but the "zclip" entry of the DeepSpeed config:
started by tests/test_deepspeed_autoload.py under the ``deepspeed`` launcher, ``torchrun`` and plain
``python``, with a Python in which zclip_dist is pip-installed (its import hook then attaches ZClip).

``--fronts`` (comma-separated), each training a few steps with a x30 loss spike on the last rank:

* ``direct``: a plain ``deepspeed.initialize`` script (tests/ds_harness.py's model and data, ZeRO-1);
* ``trainer``: HF ``Trainer`` with ``TrainingArguments(deepspeed=<dict>)`` on a tiny random GPT-2 (ZeRO-2);
* ``accelerate``: ``Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=<dict>))`` on the same GPT-2
  (ZeRO-0) in a hand-written loop.

Each rank writes ``<out>/<front>.<rank>.pt``: per step the weights before the step, its batch and loss
factor, and what the engine's ZClip attachment reported; the test replays them through a float64 oracle.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository: tests.*

from tests import ds_harness as H  # noqa: E402

STEPS = 6
SPIKE_STEP = 4
SPIKE = 30.0
ZCLIP = {"alpha": 0.9, "z_thresh": 2.5, "warmup_steps": 3}
SEQ = 16


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def gpt2_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, mean over this batch's tokens."""
    logits = model(input_ids=input_ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def token_data(n: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": torch.randint(0, 64, (SEQ,), generator=g)} for _ in range(n)]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix("module."): p.detach().float().clone() for n, p in model.named_parameters()}


def metrics(engine) -> dict | None:
    hook = getattr(engine, "_zclip", None)
    return hook.metrics() if hook is not None else None


def run_direct(rank: int, world: int) -> dict:
    case = H.Case("direct", {"zero_optimization": {"stage": 1}}, dp=world, steps=STEPS, spike_step=SPIKE_STEP,
                  zclip=dict(ZCLIP), entry="deepspeed")
    return H.run_case(case, rank)


def run_trainer(rank: int, world: int, out: str) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    record = {"weights": [], "batches": [], "factors": [], "metrics": []}

    class SpikyTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            factor = SPIKE if self.state.global_step == SPIKE_STEP and rank == world - 1 else 1.0
            record["weights"].append(snapshot(model))
            record["batches"].append(inputs["input_ids"].detach().clone())
            record["factors"].append(factor)
            return gpt2_loss(model, inputs["input_ids"]) * factor

    class Metrics(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            record["metrics"].append(metrics(trainer.model_wrapped))

    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
          "steps_per_print": 10**6, "zclip": dict(ZCLIP)}
    args = TrainingArguments(output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=2, max_steps=STEPS,
                             learning_rate=0.1, optim="sgd", weight_decay=0.0, lr_scheduler_type="constant",
                             max_grad_norm=50.0, deepspeed=ds, report_to=[], save_strategy="no", logging_steps=10**6,
                             dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = SpikyTrainer(model=gpt2(), args=args, train_dataset=token_data(), callbacks=[Metrics()])
    trainer.train()
    record["weights"].append(snapshot(trainer.model))
    record["engine"] = type(trainer.model_wrapped).__name__
    record["optimizer"] = type(trainer.model_wrapped.optimizer).__name__
    return record


def run_accelerate(rank: int, world: int) -> dict:
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.state import AcceleratorState
    from torch.utils.data import DataLoader

    AcceleratorState._reset_state(reset_partial_state=True)  # after the Trainer, which made its own
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 50.0,
          "zero_optimization": {"stage": 0}, "steps_per_print": 10**6, "zclip": dict(ZCLIP)}
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds))
    model = gpt2()
    loader = DataLoader(token_data(), batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)
    record = {"weights": [], "batches": [], "factors": [], "metrics": []}
    for step, batch in zip(range(STEPS), loader):
        factor = SPIKE if step == SPIKE_STEP and rank == world - 1 else 1.0
        record["weights"].append(snapshot(model))
        record["batches"].append(batch["input_ids"].detach().clone())
        record["factors"].append(factor)
        accelerator.backward(gpt2_loss(model, batch["input_ids"]) * factor)
        optimizer.step()
        optimizer.zero_grad()
        record["metrics"].append(metrics(model))
    record["weights"].append(snapshot(model))
    record["engine"] = type(model).__name__
    record["optimizer"] = type(model.optimizer).__name__
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fronts", default="direct")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = parser.parse_args()
    torch.set_num_threads(1)
    H.init_rank()  # gloo; HF and Accelerate take the process group as they find it
    import torch.distributed as dist

    for front in args.fronts.split(","):
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        if front == "direct":
            result = run_direct(rank, world)
        elif front == "trainer":
            result = run_trainer(rank, world, args.out)
        else:
            result = run_accelerate(rank, world)
        torch.save(result, os.path.join(args.out, f"{front}.{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
