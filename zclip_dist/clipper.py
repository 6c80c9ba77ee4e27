"""The engine-independent clipper: one ZClip decision per optimizer step, identical on every rank.

Engine adapters and the PyTorch drop-in own a :class:`Clipper`; they hand it the global norm once per
optimizer step and get back a :class:`~zclip_dist.stats.ZClipDecision` whose ``coef`` they apply (or
whose ``clip_to`` they pass as the engine's ``max_norm``). The clipper keeps the state on the device,
checkpoints it, and enforces the non-finite policy.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .adagc import AdaGCDecision, AdaGCState, adagc_update, init_adagc_state
from .config import AdaGCConfig, ConfigError, ZClipConfig
from .graphs import GraphedUpdate, can_graph
from .metrics import JsonlSink, config_header, metrics_tensors, to_host
from .stats import STATE_DTYPE, ZClipDecision, ZClipState, init_state, zclip_update

if TYPE_CHECKING:
    from .events import EventRecorder

__all__ = ["Clipper", "AdaGCClipper", "ADAGC_METRIC_NAMES", "adagc_to_host", "agree", "host_value", "host_list",
           "verify_identical", "verify_same_config", "STATE_FORMAT", "STATE_VERSION", "ADAGC_STATE_FORMAT"]

logger = logging.getLogger("zclip_dist")

STATE_FORMAT = "zclip_dist.zclip"
STATE_VERSION = 1
ADAGC_STATE_FORMAT = "zclip_dist.adagc"


def _check_format(state_dict: Mapping[str, Any], expected: str) -> None:
    fmt, version = state_dict.get("format"), state_dict.get("version")
    if fmt != expected:
        raise ValueError(f"not a {expected} state (format {fmt!r})")
    if not isinstance(version, int) or version > STATE_VERSION:
        raise ValueError(f"{expected} state version {version!r} is newer than this zclip_dist understands "
                         f"(<= {STATE_VERSION}); upgrade zclip_dist to resume from this checkpoint")


def _commit(state: tuple[Tensor, ...], new_state: tuple[Tensor, ...]) -> None:
    """Write the new state into the existing tensors: fixed addresses let a CUDA graph that captured
    the step replay it with the state advancing (a few scalar copies, one foreach launch)."""
    torch._foreach_copy_(list(state), list(new_state))


def _absent(state_dict: Mapping[str, Any] | None, method: str) -> bool:
    """A checkpoint written without this clipper's state (``None`` or ``{}``): warn, and say so."""
    if state_dict:
        return False
    warnings.warn(f"zclip_dist: the checkpoint has no {method} state; the statistics start from warmup", stacklevel=3)
    return True


def _warn_changed(saved: Mapping[str, Any], config: ZClipConfig | AdaGCConfig) -> None:
    changed = {k: (saved.get(k), v) for k, v in config.to_dict().items()
               if saved.get(k, v) != v and k not in _LOCAL_KEYS}
    if changed:
        warnings.warn("zclip_dist: settings differ from the checkpoint's, the new ones apply: "
                      + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()), stacklevel=3)


def agree(norm: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Make a scalar norm bitwise identical on every rank of ``group`` (MAX, non-finite preserved).

    For engines whose norm is computed per replica (Megatron's non-distributed optimizer reduces over
    the model-parallel group only; DP replicas compute it independently): one 2-element all-reduce
    over ``group`` (usually WORLD). MAX with NaN is not reliable across backends, so the non-finite
    flag travels separately and NaN is restored afterwards.
    """
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return norm
    dtype = norm.dtype if norm.dtype in (torch.float32, torch.float64) else torch.float32  # keep fp64 bits
    value = norm.detach().to(dtype).reshape(())
    bad = ~torch.isfinite(value)
    packed = torch.stack([torch.where(bad, torch.zeros_like(value), value), bad.to(dtype)])
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    return torch.where(packed[1] > 0, torch.full_like(packed[0], float("nan")), packed[0])


def host_value(tensor: Tensor) -> float:
    """Read a value the clipper keeps in host memory (a CPU-resident state): no device synchronisation.

    Engines whose norm is already a Python float (Megatron) run the statistics on the CPU and read the
    decision through this function; it refuses accelerator tensors, so it can never hide a device sync.
    """
    if tensor.device.type != "cpu":
        raise ValueError(f"host_value reads CPU tensors only, got one on {tensor.device}")
    return tensor.item()


def host_list(tensor: Tensor) -> list:
    """:func:`host_value` for a whole CPU tensor (e.g. the result of a collective on a gloo group)."""
    if tensor.device.type != "cpu":
        raise ValueError(f"host_list reads CPU tensors only, got one on {tensor.device}")
    return tensor.tolist()


def verify_identical(state: tuple[Tensor, ...], step: int) -> None:
    """Raise on every rank if any rank's clipper state differs from rank 0's (``verify_every``).

    All-gather over WORLD: the clipper state is replicated on every rank of the job, whatever the
    parallel layout, so every rank must hold the same bits. One small all-gather and one host read.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in state])
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    table = torch.stack(everyone).cpu()
    differ = [r for r in range(table.shape[0]) if not torch.equal(table[r], table[0])]
    if differ:
        raise RuntimeError(f"zclip_dist: clipper state diverged at step {step}: rank(s) {differ} differ from "
                           f"rank 0 (verify_every); the gradient norm is not identical on every rank")


#: Settings that may differ between ranks and runs: they change where metrics go, not any decision.
_LOCAL_KEYS = frozenset({"log_jsonl"})


def _settings(config: ZClipConfig | AdaGCConfig) -> dict[str, Any]:
    return {"method": type(config).__name__, **{k: v for k, v in config.to_dict().items() if k not in _LOCAL_KEYS}}


def _fingerprint(config: ZClipConfig | AdaGCConfig) -> Tensor:
    """63 bits of a digest of the settings: equal settings give equal bits in every process (no ``hash()``
    salt), and an int64 travels over every backend."""
    digest = hashlib.blake2b(repr(sorted(_settings(config).items())).encode(), digest_size=8).digest()
    return torch.tensor(int.from_bytes(digest, "little") >> 1, dtype=torch.int64)


_HOST_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


def _host_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """``group`` if its backend moves CPU tensors, else a gloo twin (made once, by its own ranks only)."""
    if "gloo" in str(dist.get_backend(group)):
        return group
    ranks = tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
    if ranks not in _HOST_GROUPS:
        _HOST_GROUPS[ranks] = dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True)
    return _HOST_GROUPS[ranks]


def verify_same_config(config: ZClipConfig | AdaGCConfig, group: dist.ProcessGroup | None = None) -> None:
    """Raise on every rank of ``group`` (default WORLD) if any rank's settings differ, naming ranks and keys.

    Different settings on one rank mean different decisions there (or a collective such as verify_every
    that only some ranks enter: a hang), so the front ends call this once, before the first update. Cost:
    one all-gather of 8 bytes per rank, in host memory (a gloo group), compared with ``torch.equal``: no
    device sync and no host read of a tensor, so the drop-in's first step stays sync-free. The settings
    themselves travel only when the digests differ.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    group = _host_group(group)
    mine = _fingerprint(config)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    if torch.equal(torch.stack(everyone), mine.expand(len(everyone))):
        return
    settings: list[Any] = [None] * len(everyone)
    dist.all_gather_object(settings, _settings(config), group=group)
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    differ = []
    for key in sorted({k for s in settings for k in s}):
        by_value: dict[str, list[int]] = {}
        for rank, s in zip(ranks, settings):
            by_value.setdefault(repr(s.get(key)), []).append(rank)
        if len(by_value) > 1:
            differ.append(f"{key}: " + ", ".join(f"{v} on rank(s) {r}" for v, r in by_value.items()))
    raise ConfigError("zclip_dist: settings differ between ranks (every rank must use the same ones): "
                      + "; ".join(differ))


class _JsonlLog:
    """``log_jsonl`` / ``log_interval``: one line of metrics per logged step, written on rank 0 only."""

    config: ZClipConfig | AdaGCConfig
    _sink: JsonlSink | None = None
    _logged_calls = 0
    #: False: a front end picks the steps itself and calls :meth:`write_jsonl` (DeepSpeed: every
    #: ``log_interval``-th step and every clipped, spike or non-finite step).
    jsonl_every_interval = True
    #: Spike forensics (set by the front end): each step's event row goes here, and the events read at a
    #: log step go into that line's ``events`` field.
    recorder: "EventRecorder | None" = None

    def metrics(self) -> dict[str, Any]:
        raise NotImplementedError

    def _log_step(self) -> None:
        if self.config.log_jsonl is None or not self.jsonl_every_interval:
            return
        self._logged_calls += 1
        if self._logged_calls % self.config.log_interval or (dist.is_initialized() and dist.get_rank() != 0):
            return
        self.write_jsonl(self._logged_calls, self.metrics())  # the one host transfer

    def write_jsonl(self, call: int, metrics: Mapping[str, Any]) -> None:
        """Append one record (rank 0 only; nothing without ``log_jsonl``)."""
        if self.config.log_jsonl is None or (dist.is_initialized() and dist.get_rank() != 0):
            return
        if self._sink is None:
            self._sink = JsonlSink(self.config.log_jsonl, header=config_header(self.config))
        record = {"call": call, **metrics}
        if self.recorder is not None:
            self.recorder.keep_for_log = True  # this rank writes lines: events read elsewhere wait for one
            self.recorder.read()  # a log step reads anyway: the event buffer comes along
            events = self.recorder.take_unlogged()
            if events:  # ordinary steps carry no events field
                record["events"] = [e.to_json() for e in events]
        self._sink.write(record)


class Clipper(_JsonlLog):
    """ZClip state plus the per-step decision.

    Args:
        config: the settings.
        device: where the state lives (default: the device of the first norm it is given).
    """

    def __init__(self, config: ZClipConfig, *, device: torch.device | str | None = None,
                 cuda_graph: bool = True) -> None:
        self.config = config
        self.state: ZClipState | None = init_state(config, device) if device is not None else None
        self.last: ZClipDecision | None = None
        self.cuda_graph = cuda_graph
        self._graph: GraphedUpdate | None = None
        self._calls = 0  # host-side step count, for verify_every (reading state.steps would sync)
        # verify_same_config before the first update, over this group (None: WORLD); front ends that
        # check at attach, or whose clipper is local to one rank, set check_config = False.
        self.check_config = True
        self.config_group: dist.ProcessGroup | None = None

    def _update(self, norm: Tensor) -> ZClipDecision:
        new_state, decision = zclip_update(self.config, self.state, norm)
        _commit(self.state, new_state)
        return decision

    # ---- the step ---------------------------------------------------------------------------------
    def step(self, norm: Tensor | float, *, overflow: bool = False, squares: Tensor | None = None,
             replicas: Tensor | None = None) -> ZClipDecision:
        """Feed this optimizer step's pre-clip global norm; update the statistics exactly once.

        No host synchronisation unless ``nonfinite="raise"`` (which must read the flag on the host).
        ``overflow``: the engine skipped this step on a loss-scale overflow (fp16 dynamic loss scaling),
        which is routine: recorded as non-finite, never raised. ``squares`` / ``replicas``: the
        per-tensor and per-replica squared norms for spike forensics (``self.recorder``), when measured.
        """
        if not isinstance(norm, Tensor):
            device = self.state.mean.device if self.state is not None else None
            norm = torch.tensor(float(norm), dtype=STATE_DTYPE, device=device)
        if self.state is None:
            self.state = init_state(self.config, norm.device)
        elif self.state.mean.device != norm.device:  # loaded on CPU before the first step: move once
            self.state = ZClipState(*(t.to(norm.device) for t in self.state))
            self._graph = None
        norm = norm.detach().to(self.state.mean.device)
        if self.check_config:
            verify_same_config(self.config, self.config_group)
            self.check_config = False
        if self._graph is None and self.cuda_graph and can_graph(norm.device):
            self._graph = GraphedUpdate(self._update, [norm])
        self.last = self._graph(norm) if self._graph is not None and can_graph(norm.device) else self._update(norm)
        self._calls += 1
        if self.recorder is not None:
            d = self.last
            self.recorder.record(step=self.state.steps, norm=d.norm, threshold=d.threshold, clipped=d.clipped,
                                 spike=d.spike, nonfinite=d.nonfinite, squares=squares, replicas=replicas)
        if self.config.verify_every and self._calls % self.config.verify_every == 0:
            verify_identical(self.state, self._calls)
        self._log_step()
        if self.config.nonfinite == "raise" and not overflow and bool(self.last.nonfinite):
            rank = dist.get_rank() if dist.is_initialized() else 0
            raise FloatingPointError(
                f"zclip: non-finite gradient norm ({float(self.last.norm)}) at step {int(self.state.steps)} "
                f"(raised on rank {rank}; every rank raises, wherever the bad gradient is; nonfinite='raise'). "
                "Set nonfinite='skip' to skip such steps.")
        return self.last

    # ---- metrics ----------------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """The last step's metrics as Python numbers: one host transfer. Call on log steps only."""
        if self.last is None or self.state is None:
            return {}
        return to_host(metrics_tensors(self.last, self.state))

    def metrics_tensor(self) -> Tensor | None:
        """The last step's metrics, still on the device (see ``metrics.METRIC_NAMES``)."""
        return None if self.last is None else metrics_tensors(self.last, self.state)

    # ---- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Versioned, world-size independent (the state is replicated), tensors on CPU."""
        state = self.state if self.state is not None else init_state(self.config, "cpu")
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "state": {k: v.detach().cpu().clone() for k, v in state._asdict().items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any] | None) -> None:
        """Restore a :meth:`state_dict`; ``None`` or ``{}`` (a checkpoint without one) warns and starts fresh."""
        if _absent(state_dict, "ZClip"):
            self.state = init_state(self.config, self.state.mean.device) if self.state is not None else None
            self.last, self._graph = None, None
            return
        _check_format(state_dict, STATE_FORMAT)
        _warn_changed(state_dict.get("config", {}), self.config)
        device = self.state.mean.device if self.state is not None else "cpu"
        self._apply_state(dict(state_dict["state"]), device)

    def _apply_state(self, saved: dict[str, Tensor], device: torch.device | str) -> None:
        fresh = init_state(self.config, device)
        loaded = {}
        for name, default in fresh._asdict().items():
            value = saved.get(name, default)  # fields added after a checkpoint was written start fresh
            loaded[name] = value.to(device=default.device, dtype=default.dtype)
        warm_n = self.config.warmup_steps
        if loaded["buffer"].numel() != warm_n:
            if int(loaded["count"]) < max(warm_n, saved["buffer"].numel()):
                warnings.warn("zclip: warmup_steps changed during warmup; warmup starts again", stacklevel=3)
                loaded["count"], loaded["buffer"] = fresh.count, fresh.buffer
            else:
                loaded["buffer"] = fresh.buffer  # statistics exist; the warmup buffer is not used again
                loaded["count"] = torch.maximum(loaded["count"], torch.full_like(loaded["count"], warm_n))
        self.state = ZClipState(**loaded)
        self.last = None
        self._graph = None  # the captured graph points at the old state tensors


#: AdaGC's metrics, in the order :meth:`AdaGCClipper.metrics_tensor` stacks them.
ADAGC_METRIC_NAMES = ("grad_norm", "num_clipped_tensors", "min_coef", "warmup", "nonfinite", "skipped")


def adagc_to_host(vector: Tensor | Sequence[float]) -> dict[str, Any]:
    """AdaGC's metrics vector (one host transfer, or values already read) as Python numbers."""
    out = dict(zip(ADAGC_METRIC_NAMES, vector.tolist() if isinstance(vector, Tensor) else vector))
    out["num_clipped_tensors"] = int(out["num_clipped_tensors"])
    for flag in ("warmup", "nonfinite", "skipped"):
        out[flag] = bool(out[flag])
    return out


class AdaGCClipper(_JsonlLog):
    """AdaGC state (one gamma per named tensor) plus the per-step decision.

    The state is keyed by parameter name, so a checkpoint survives a change of data-parallel size or a
    reordering of the parameters; with pipeline parallelism each stage saves its own tensors.
    """

    def __init__(self, config: AdaGCConfig, *, cuda_graph: bool = True) -> None:
        self.config = config
        self.names: tuple[str, ...] = ()
        self.state: AdaGCState | None = None
        self.last: AdaGCDecision | None = None
        self._saved: dict[str, Any] | None = None
        self.cuda_graph = cuda_graph
        self._graph: GraphedUpdate | None = None
        self.check_config = True  # as for Clipper
        self.config_group: dist.ProcessGroup | None = None

    def bind(self, names: Sequence[str], device: torch.device) -> None:
        """Fix the tensor order of the per-tensor vectors; carry gamma over by name when it changes.

        Called when the set of gradients changes (first step, after a load): not on the steady path.
        """
        names = tuple(names)
        if names == self.names and self.state is not None and self._saved is None:
            return
        old = self._by_name()
        fresh = init_adagc_state(self.config, len(names), device)
        gamma, seen, streak = fresh.gamma.clone(), fresh.seen.clone(), fresh.streak.clone()
        keys = ("__global__",) if self.config.mode == "adagc-global" else names
        for i, n in enumerate(keys):
            if n in old:
                gamma[i], seen[i], streak[i] = old[n]
        count = fresh.count if self.state is None else self.state.count.to(device)
        nonfinite = fresh.num_nonfinite if self.state is None else self.state.num_nonfinite.to(device)
        if self._saved is not None:
            count = torch.tensor(int(self._saved["count"]), device=device)
            nonfinite = torch.tensor(int(self._saved["num_nonfinite"]), device=device)
            self._saved = None
        self.names = names
        self.state = AdaGCState(count=count, gamma=gamma, seen=seen, num_nonfinite=nonfinite, streak=streak)
        self._graph = None  # the captured graph points at the old state tensors

    def _by_name(self) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """``name -> (gamma, seen, streak)``; a checkpoint from before ``streak`` was saved resumes at 0."""
        if self._saved is not None:
            streaks = self._saved.get("streak") or {}
            return {k: (torch.tensor(v[0]), torch.tensor(v[1]), torch.tensor(int(streaks.get(k, 0))))
                    for k, v in self._saved["gamma"].items()}
        if self.state is None:
            return {}
        keys = ("__global__",) if self.config.mode == "adagc-global" else self.names
        return {k: (self.state.gamma[i], self.state.seen[i], self.state.streak[i]) for i, k in enumerate(keys)}

    def _update(self, sq_norms: Tensor, global_norm: Tensor) -> AdaGCDecision:
        new_state, decision = adagc_update(self.config, self.state, sq_norms, global_norm)
        _commit(self.state, new_state)
        return decision

    def step(self, sq_norms: Tensor, global_norm: Tensor, *, overflow: bool = False, squares: Tensor | None = None,
             replicas: Tensor | None = None) -> AdaGCDecision:
        """Feed the whole-tensor squared norms (bound order) and the global norm; update gamma once.
        ``overflow``: as for :meth:`Clipper.step`; ``squares`` / ``replicas``: likewise (spike forensics)."""
        if self.check_config:
            verify_same_config(self.config, self.config_group)
            self.check_config = False
        if self._graph is None and self.cuda_graph and can_graph(sq_norms.device):
            self._graph = GraphedUpdate(self._update, [sq_norms, global_norm])
        graphed = self._graph is not None and can_graph(sq_norms.device)
        self.last = self._graph(sq_norms, global_norm) if graphed else self._update(sq_norms, global_norm)
        if self.recorder is not None:
            d, st = self.last, self.state  # AdaGC has no spike test and no single threshold
            self.recorder.record(step=st.count + st.num_nonfinite, norm=d.norm,
                                 threshold=torch.full_like(d.norm, math.nan), clipped=d.clipped.any(),
                                 spike=torch.zeros_like(d.nonfinite), nonfinite=d.nonfinite, squares=squares,
                                 replicas=replicas)
        if self.config.nonfinite == "raise" and not overflow and bool(self.last.nonfinite):
            raise FloatingPointError("adagc: non-finite gradient norm; every rank raises (nonfinite='raise')")
        self._log_step()
        return self.last

    def metrics(self) -> dict[str, Any]:
        """Last step as Python numbers (one host transfer): norm, clipped-tensor count, minimum coefficient."""
        vec = self.metrics_tensor()
        return {} if vec is None else adagc_to_host(vec)

    def metrics_tensor(self) -> Tensor | None:
        """The last step's metrics, still on the device (see :data:`ADAGC_METRIC_NAMES`)."""
        if self.last is None:
            return None
        d = self.last
        return torch.stack([d.norm.double(), d.clipped.sum().double(), d.coefs.min().double(),
                            d.warmup.double(), d.nonfinite.double(), d.skipped.double()])

    def state_dict(self) -> dict[str, Any]:
        by_name = self._by_name()
        count = self.state.count if self.state is not None else torch.zeros((), dtype=torch.int64)
        nonfinite = self.state.num_nonfinite if self.state is not None else torch.zeros((), dtype=torch.int64)
        if self._saved is not None:
            count, nonfinite = self._saved["count"], self._saved["num_nonfinite"]
        return {
            "format": ADAGC_STATE_FORMAT,
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "count": int(count),
            "num_nonfinite": int(nonfinite),
            "gamma": {k: (float(g), bool(s)) for k, (g, s, _) in by_name.items()},
            # recovery_steps counts a run of over-limit steps across a resume too
            "streak": {k: int(r) for k, (_, _, r) in by_name.items() if int(r)},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any] | None) -> None:
        """Restore a :meth:`state_dict`; ``None`` or ``{}`` (a checkpoint without one) warns and starts fresh."""
        if _absent(state_dict, "AdaGC"):
            self.names, self.state, self.last, self._saved, self._graph = (), None, None, None, None
            return
        _check_format(state_dict, ADAGC_STATE_FORMAT)
        _warn_changed(state_dict.get("config", {}), self.config)
        self._saved = {k: state_dict[k] for k in ("count", "num_nonfinite", "gamma")}
        self._saved["streak"] = state_dict.get("streak", {})
        if self.names:
            self.bind(self.names, self.state.gamma.device)
