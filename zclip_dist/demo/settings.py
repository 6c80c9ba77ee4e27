"""The demo's scenario in one place: model size, data, optimizer, the injected spike, both clipping setups."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = ["DemoSettings", "RUNS", "SHORT"]

#: The two runs, in the order they train: a fixed ceiling (DeepSpeed ``gradient_clipping``) vs ZClip.
RUNS = ("fixed", "zclip")


@dataclass(frozen=True)
class DemoSettings:
    """Everything that defines a demo run; saved to ``results.json`` next to the outputs.

    The spike: at optimizer step ``spike_step`` (0-based) the batch of rank ``spike_rank`` is replaced by a
    corrupted one -- every target is the same character and its loss is weighted ``spike_weight`` times,
    as a broken loss mask or sample weight would do. Its gradient norm is hundreds of times the usual one.
    Both runs use the same ceiling ``clip`` (DeepSpeed ``gradient_clipping``; ZClip takes it as its cap),
    set about 5x above the typical norm -- where 1.0 sits for LLM pretraining, whose norms are 0.1-0.3 --
    so the fixed clip lets the corrupted step through at full ceiling; the learning rate is aggressive for
    this model (3e-3, no decay), which makes it fragile.
    """

    steps: int = 500
    spike_step: int = 300
    spike_rank: int = 1
    spike_weight: float = 100.0
    world: int = 4
    seed: int = 0
    # model and data
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    context: int = 64
    micro_batch: int = 8
    corpus_chars: int = 400_000
    corpus_words: int = 48
    corpus_fanout: int = 3
    # optimizer
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.1
    zero_stage: int = 1
    clip: float = 8.0
    zclip: dict[str, Any] = field(default_factory=lambda: {"alpha": 0.97, "z_thresh": 2.5, "warmup_steps": 25})
    # outputs
    log_interval: int = 1
    out: str = "out/demo"
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.spike_step < self.steps:
            raise ValueError(f"spike step {self.spike_step} is outside the run's steps 0..{self.steps - 1}")
        if not 0 <= self.spike_rank < self.world:
            raise ValueError(f"spike rank {self.spike_rank} is outside ranks 0..{self.world - 1}")
        if self.log_interval < 1:
            raise ValueError(f"log interval must be >= 1, got {self.log_interval}")
        if self.spike_step <= self.zclip.get("warmup_steps", 25):
            raise ValueError(f"spike step {self.spike_step} falls inside ZClip's warmup "
                             f"({self.zclip.get('warmup_steps', 25)} steps); inject it later")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> "DemoSettings":
        return replace(self, **changes)


#: CI's short mode: same scenario, fewer steps.
SHORT = {"steps": 200, "spike_step": 150}
