"""A plain DeepSpeed ZeRO-2 script with a "zclip" entry asking for forensics, a TensorBoard monitor and
a JSON-lines sink; rank 1's batch at step 30 is corrupted (targets x100). Run by test_events_cli under
torchrun, in the folder it writes to."""

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn

cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10,
       "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 2},
       "gradient_clipping": 1.0,
       "tensorboard": {"enabled": True, "output_path": "tb", "job_name": "run"},
       "zclip": {"alpha": 0.97, "z_thresh": 2.5, "warmup_steps": 10, "log_jsonl": "metrics.jsonl",
                 "forensics": {"replicas": True}}}
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
rank = engine.global_rank
g = torch.Generator().manual_seed(rank + 1)
for step in range(40):
    x, y = torch.randn(4, 16, generator=g), torch.randn(4, 4, generator=g)
    if step == 30 and rank == 1:
        y = y * 100
    loss = F.mse_loss(engine(x), y)
    engine.backward(loss)
    engine.step()
