"""The demo's scenario in one place: model size, data, optimizer, the injected spike, the clipping runs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = ["DemoSettings", "ADAPTIVE", "SHORT", "fixed_run", "fixed_clip"]

#: The adaptive runs, after the fixed ones: DeepSpeed config entries ``"zclip"`` and ``"adagc"``.
ADAPTIVE = ("zclip", "adagc")


def fixed_run(clip: float) -> str:
    """Run name of a fixed clip: ``fixed-8``."""
    return f"fixed-{clip:g}"


def fixed_clip(run: str) -> float:
    """DeepSpeed ``gradient_clipping`` of a fixed run or of the pilot ``none`` (0: off)."""
    return 0.0 if run == "none" else float(run.removeprefix("fixed-"))


@dataclass(frozen=True)
class DemoSettings:
    """Everything that defines a demo run; saved to ``results.json`` next to the outputs.

    The spike: at optimizer step ``spike_step`` (0-based) the batch of rank ``spike_rank`` is replaced by a
    corrupted one -- every target is the same character and its loss is weighted ``spike_weight`` times,
    as a broken loss mask or sample weight would do. Its gradient norm is hundreds of times the usual one.
    The runs: one per fixed clip in ``fixed_clips`` (DeepSpeed ``gradient_clipping``), then ZClip and
    AdaGC at their published defaults with ``clip`` as their cap (``gradient_clipping``, as a user who
    turns them on keeps the ceiling they had). The fixed clips were set from the pilot run without
    clipping (``pilot=True``: no injected batch, ``gradient_clipping`` 0; norm median 1.31, 90th
    percentile 1.85 over steps 25..299): 1.0 is tight (below the typical norm, as 1.0 is early in LLM
    pretraining), 2.0 about the 90th percentile, 8.0 loose (about 6x, as 1.0 is late in LLM pretraining,
    whose norms fall to 0.1-0.3). The learning rate is aggressive for this model (3e-3, no decay).
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
    fixed_clips: tuple[float, ...] = (1.0, 2.0, 8.0)
    clip: float = 8.0
    zclip: dict[str, Any] = field(default_factory=lambda: {"alpha": 0.97, "z_thresh": 2.5, "warmup_steps": 25})
    adagc: dict[str, Any] = field(default_factory=lambda: {"clip_ratio": 1.04, "beta": 0.99, "warmup_steps": 100})
    pilot: bool = False
    # outputs
    log_interval: int = 1
    out: str = "out/demo"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.log_interval < 1:
            raise ValueError(f"log interval must be >= 1, got {self.log_interval}")
        if any(c <= 0 for c in self.fixed_clips):
            raise ValueError(f"fixed clips {self.fixed_clips} are invalid: allowed positive numbers")
        if self.pilot:  # nothing is injected
            return
        if not 0 <= self.spike_step < self.steps:
            raise ValueError(f"spike step {self.spike_step} is outside the run's steps 0..{self.steps - 1}")
        if not 0 <= self.spike_rank < self.world:
            raise ValueError(f"spike rank {self.spike_rank} is outside ranks 0..{self.world - 1}")
        for name, cfg, default in (("ZClip", self.zclip, 25), ("AdaGC", self.adagc, 100)):
            if self.spike_step <= cfg.get("warmup_steps", default):
                raise ValueError(f"spike step {self.spike_step} falls inside {name}'s warmup "
                                 f"({cfg.get('warmup_steps', default)} steps); inject it later")

    @property
    def runs(self) -> tuple[str, ...]:
        """Run names in training order; the pilot is the one run ``none``."""
        if self.pilot:
            return ("none",)
        return tuple(fixed_run(c) for c in self.fixed_clips) + ADAPTIVE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> "DemoSettings":
        return replace(self, **changes)


#: CI's short mode: same scenario, fewer steps.
SHORT = {"steps": 200, "spike_step": 150}
