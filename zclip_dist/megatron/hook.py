"""What ZClip and AdaGC do alike to a megatron-core optimizer: the class swap (:func:`prepare`), the
checkpoint entries, the expert-TP norm fix, spike forensics (:func:`attach_forensics`; the work is in
:mod:`zclip_dist.megatron.forensics`) and :func:`log_metrics`. Where they enter the release's own
``step()`` (its norm read and its clip call) is :mod:`zclip_dist.megatron.intercept`; each method's
decision and clip are in :mod:`zclip_dist.megatron.zclip` / :mod:`zclip_dist.megatron.adagc`; how
Megatron computes and applies its norm is in ``docs/internals/megatron.md``.

* Megatron's norm is already a Python float (its one ``.item()``); it is made identical on every rank
  with :func:`zclip_dist.clipper.agree` only where Megatron's reduction does not already span the world
  (non-distributed optimizer with DP > 1, or dense and expert groups apart).
* The expert-TP norm bug of megatron-core < 0.19 (NVIDIA/Megatron-LM PR #5916) is fixed by giving expert
  sub-optimizers the expert tensor-parallel group for their duplicate test (:func:`fix_expert_tp_norm`).
* State rides along in ``state_dict``/``sharded_state_dict`` under the method's key and is removed again
  in ``load_state_dict`` before Megatron sees it.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Iterable

import torch
import torch.distributed as dist

from ..clipper import host_value, verify_same_config
from .intercept import StepHooks, check_core_version, core_version

__all__ = ["attached_optimizer", "is_attached", "method_of", "clipper_of", "sub_optimizers", "fix_expert_tp_norm",
           "log_metrics", "attach_forensics", "forensics_of", "core_version", "check_core_version", "STATE_KEY",
           "STATE_KEYS", "LOG_METRICS"]

logger = logging.getLogger("zclip_dist.megatron")

#: Key of the ZClip entry in the optimizer's (sharded) state dict.
STATE_KEY = "zclip"
#: Keys of every zclip_dist entry (ZClip's, AdaGC's): all are removed before Megatron loads the dict.
STATE_KEYS = (STATE_KEY, "adagc")
#: Metrics written to Megatron's TensorBoard / W&B writers, as ``zclip/<name>``.
LOG_METRICS = ("grad_norm", "threshold", "coef", "clipped", "skipped", "mean", "std", "z", "clipped_norm",
               "num_clipped", "num_spikes", "num_nonfinite")
#: First megatron-core release with PR #5916 (expert-TP duplicates judged against the expert TP group).
_EXPERT_TP_FIXED = (0, 19)
_ATTACHED: list[Any] = []  # the optimizer ZClip/AdaGC was last attached to, for Megatron-LM's training_log
_DISPLAY = {"zclip": "ZClip", "adagc": "AdaGC"}
_REQUIRED = ("step", "prepare_grads", "get_grad_norm", "step_with_ready_grads", "get_parameters", "config")


def sub_optimizers(optimizer: Any) -> list[Any]:
    """The optimizers that own parameters: a ChainedOptimizer's children, or the optimizer itself."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _is_expert(sub: Any) -> bool:
    # 0.16.1 does not copy ``allreduce`` onto main params or DistOpt shards; the param groups say it.
    groups = getattr(getattr(sub, "optimizer", None), "param_groups", None) or []
    return any(g.get("is_expert_parallel", False) for g in groups)


def fix_expert_tp_norm(optimizer: Any) -> bool:
    """Judge expert TP duplicates against the expert TP group (PR #5916). Returns whether anything changed.

    ``MegatronOptimizer.get_main_grads_for_grad_norm`` drops a gradient without
    ``tensor_model_parallel=True`` on every rank but rank 0 of ``self.tp_group``, which 0.16.1 sets to
    the *dense* TP group for the expert sub-optimizer too: with EP > 1, TP > 1 and expert-TP != TP,
    replicated expert parameters on dense TP ranks > 0 are left out and the norm is too small.
    Giving the expert sub-optimizer ``parallel_state.get_expert_tensor_parallel_group()`` makes Megatron's
    own norm (and zero count) right; the reduction groups stay Megatron's.
    """
    if core_version()[:2] >= _EXPERT_TP_FIXED:
        return False
    from megatron.core import parallel_state as ps

    changed = False
    for sub in sub_optimizers(optimizer):
        if _is_expert(sub) and not getattr(sub, "is_stub_optimizer", False):
            etp_group = ps.get_expert_tensor_parallel_group(check_initialized=False)
            if etp_group is not None and getattr(sub, "tp_group", None) is not etp_group:
                sub.tp_group = etp_group
                changed = True
    if changed and ps.get_tensor_model_parallel_world_size() > 1 and \
            ps.get_expert_tensor_parallel_world_size() != ps.get_tensor_model_parallel_world_size():
        logger.info("zclip: megatron-core %s undercounts expert gradients with EP>1, TP>1, expert-TP != TP "
                    "(NVIDIA/Megatron-LM PR #5916); the expert optimizer now uses the expert TP group",
                    ".".join(map(str, core_version())))
    return changed


def _norm_group(optimizer: Any) -> dist.ProcessGroup | None:
    """WORLD unless Megatron's own norm reduction already spans every rank (then no agreement is needed).

    Megatron's reduction gives every rank of its group the same bits; only when that group is smaller
    than the world (non-distributed optimizer: the model-parallel group; several sub-optimizer groups)
    can replicas compute the norm separately, and then one scalar MAX all-reduce over WORLD makes it
    identical by construction rather than by luck.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    world = dist.get_world_size()
    groups = [sub.get_grad_stats_parallel_group() for sub in sub_optimizers(optimizer)]
    if all(g is not None and dist.get_world_size(g) == world for g in groups):
        return None
    return dist.group.WORLD


def _device_of(optimizer: Any) -> torch.device:
    for sub in sub_optimizers(optimizer):
        if not getattr(sub, "is_stub_optimizer", False):
            for p in sub.get_parameters():
                return p.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def uses_decoupled_grad(sub: Any) -> bool:
    """Precision-aware optimizer: the gradient Megatron clips is ``decoupled_grad``, not ``grad``."""
    return bool(getattr(sub.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False))


def with_entry(state: Any, key: str, value: Any) -> dict:
    """Add one entry. A ChainedOptimizer's list becomes ``{index: entry}``, which it loads as well."""
    if isinstance(state, (list, tuple)):
        state = dict(enumerate(state))
    elif not isinstance(state, dict):
        raise TypeError(f"zclip_dist: cannot add {key} state to an optimizer state of type {type(state).__name__}")
    state[key] = value
    return state


def pop_entries(state_dict: Any, key: str, method: str) -> tuple[Any, Any]:
    """Remove every zclip_dist entry before Megatron sees the dict (ChainedOptimizer checks the entry
    count); return the dict and this method's saved state, or ``None`` with a warning when absent (a
    checkpoint written without this method, or with the other one)."""
    saved = None
    if isinstance(state_dict, dict) and any(k in state_dict for k in STATE_KEYS):
        state_dict = dict(state_dict)
        found = {k: state_dict.pop(k) for k in STATE_KEYS if k in state_dict}
        saved = found.get(key)
    if saved is None:
        warnings.warn(f"zclip_dist: the checkpoint has no {method} state; the statistics start from warmup",
                      stacklevel=3)
    return state_dict, saved


def is_attached(optimizer: Any) -> bool:
    return method_of(optimizer) is not None


def method_of(optimizer: Any) -> str | None:
    """``"zclip"`` or ``"adagc"``: the method attached to ``optimizer``, or ``None``."""
    return getattr(type(optimizer), "_zclip_method", None)


def clipper_of(optimizer: Any) -> Any:
    """The attached :class:`~zclip_dist.clipper.Clipper` (ZClip) or :class:`~zclip_dist.clipper.AdaGCClipper`."""
    method = method_of(optimizer)
    if method is None:
        raise ValueError("this optimizer has no ZClip/AdaGC attached; call zclip_dist.megatron.wrap_optimizer first")
    return getattr(optimizer, method)


def prepare(optimizer: Any, config: Any, method: str, overrides: type) -> None:
    """What both methods do to the optimizer object: checks, the PR #5916 fix, the class swap, the norm group.

    The class becomes a one-level subclass holding the step hooks of
    :class:`~zclip_dist.megatron.intercept.StepHooks` and the decision, clip and checkpoint methods of
    ``overrides`` (see :class:`zclip_dist.megatron.zclip._Overrides` for why not a mixin); the object
    stays the same.
    """
    if is_attached(optimizer):
        raise ValueError(f"{method_of(optimizer)} is already attached to this optimizer; ZClip and AdaGC are two "
                         "clipping methods for the same gradients: attach one")
    missing = [name for name in _REQUIRED if not hasattr(optimizer, name)]
    if missing:
        raise TypeError(f"zclip_dist: {type(optimizer).__name__} lacks {', '.join(missing)}; expected a megatron-core "
                        "optimizer (what get_megatron_optimizer returns)")
    check_core_version()
    fix_expert_tp_norm(optimizer)
    cls = type(optimizer)
    methods = {name: StepHooks.__dict__[name] for name in ("step", "get_grad_norm", "step_with_ready_grads")}
    methods.update({name: overrides.__dict__[name] for name in ("_zclip_decide", "_zclip_clip", "state_dict",
                                                                "sharded_state_dict", "load_state_dict")})
    optimizer.__class__ = type(f"{_DISPLAY[method]}{cls.__name__}", (cls,),
                               {**methods, "__module__": overrides.__module__, "_zclip_method": method,
                                "_zclip_base": cls})
    optimizer._zclip_config = config
    optimizer._zclip_step = None  # set only while step() runs (intercept)
    optimizer._zclip_device = _device_of(optimizer)
    optimizer._zclip_group = _norm_group(optimizer)


def register(optimizer: Any) -> Any:
    """Check the settings agree on every rank (every rank attaches: a rank with other settings fails here,
    before the first step) and remember the optimizer for Megatron-LM's ``training_log``."""
    verify_same_config(optimizer._zclip_config)
    clipper_of(optimizer).check_config = False
    _ATTACHED[:] = [optimizer]
    return optimizer


def attached_optimizer() -> Any:
    """The optimizer ZClip/AdaGC was last attached to in this process (``training_log`` has no optimizer argument)."""
    if not _ATTACHED:
        raise ValueError("neither ZClip nor AdaGC is attached to any optimizer in this process")
    return _ATTACHED[0]


def forensics_config_from_megatron(method: str) -> Any:
    """The ``--<method>-forensics*`` settings of Megatron-LM's parsed arguments when they exist (a patched
    Megatron-LM fork calls ``wrap_optimizer`` without them), else the defaults."""
    from ..config import ForensicsConfig

    try:
        from megatron.training import global_vars
    except ImportError:  # megatron-core alone: no Megatron-LM arguments
        return ForensicsConfig()
    args = getattr(global_vars, "_GLOBAL_ARGS", None)
    if args is None or not hasattr(args, f"{method}_forensics"):
        return ForensicsConfig()
    from .flags import forensics_config

    return forensics_config(args, method)


def attach_forensics(optimizer: Any, clipper: Any, method: str, forensics: Any, model: Any,
                     on_event: Any, names: Any = None) -> Any:
    """Spike forensics for the attached method (:mod:`zclip_dist.megatron.forensics`); ``None`` when off.

    ``forensics``: a :class:`~zclip_dist.config.ForensicsConfig`, a mapping, a bool, or ``None`` (the
    ``--<method>-forensics*`` flags of Megatron-LM's arguments, else the defaults: on, replicas off).
    """
    from ..config import ForensicsConfig
    from .adagc import _is_distributed, _main_to_model, _model_chunks
    from .forensics import MegatronForensics

    config = (forensics_config_from_megatron(method) if forensics is None
              else ForensicsConfig.coerce(forensics, source=f"{method} forensics"))
    optimizer._zclip_forensics = None
    if not config.enabled:
        return None
    subs = [s for s in sub_optimizers(optimizer) if not getattr(s, "is_stub_optimizer", False)]
    mains = []
    if names is None:
        try:
            for sub in subs:
                owner = _main_to_model(sub)
                mains += [(m, owner[id(m)], uses_decoupled_grad(sub)) for m in sub.get_parameters()
                          # out of the norm ZClip decides on (0.19's MTP heads): out of its shares too
                          if getattr(owner[id(m)], "grad_norm_group", None) is None]
        except (ValueError, KeyError) as err:  # an optimizer layout whose main parameters name no model parameter
            logger.warning("%s forensics: off for %s (%s)", method, type(optimizer).__name__, err)
            return None
    # ZClip's step count is a CPU tensor; AdaGC's is counted on the host (MegatronForensics.steps).
    step_of = (lambda: int(host_value(clipper.state.steps))) if method == "zclip" else None
    fx = MegatronForensics(config=config, method=method, device=optimizer._zclip_device,
                           dist_opt=any(_is_distributed(s) for s in subs), model=_model_chunks(optimizer, model),
                           step_of=step_of, mains=mains, names=names, on_event=on_event)
    clipper.recorder = fx.recorder
    if clipper.config.log_jsonl is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        fx.recorder.keep_for_log = True  # events read before the first JSON line wait for one
    optimizer._zclip_forensics = fx
    return fx


def forensics_of(optimizer: Any) -> Any:
    """The :class:`~zclip_dist.megatron.forensics.MegatronForensics` of the attached method, or ``None`` (off)."""
    clipper_of(optimizer)
    return getattr(optimizer, "_zclip_forensics", None)


def log_metrics(optimizer: Any, iteration: int, writer: Any = None, wandb_writer: Any = None,
                names: Iterable[str] | None = None) -> dict[str, Any]:
    """Write the last step's metrics to Megatron's TensorBoard / W&B writers as ``zclip/<name>`` (ZClip) or
    ``adagc/<name>`` (AdaGC; names in ``megatron_adagc.LOG_METRICS``).

    One host transfer, and only where a writer exists (Megatron-LM creates them on the last rank);
    call it at the log interval. Spike-forensics events since the last call go to the same writers as
    ``<method>/event/grad_norm``, ``<method>/event/param/<name>`` and ``<method>/event/replica/<index>``
    (shares), each at its own iteration (AdaGC: the event buffer comes along, one more transfer).
    Returns the metrics written.
    """
    if writer is None and wandb_writer is None:
        return {}
    fx = getattr(optimizer, "_zclip_forensics", None)
    if fx is not None:
        fx.write_to(iteration, writer, wandb_writer)
    method = method_of(optimizer)
    if names is None:
        names = LOG_METRICS if method == "zclip" else getattr(type(optimizer), "_zclip_log_metrics", ())
    metrics = clipper_of(optimizer).metrics()
    out = {f"{method}/{n}": float(metrics[n]) for n in names if n in metrics}
    write_scalars(out, iteration, writer, wandb_writer)
    return out


def write_scalars(scalars: dict[str, float], iteration: int, writer: Any = None, wandb_writer: Any = None) -> None:
    """Scalars to Megatron's TensorBoard writer (``add_scalar``) and W&B writer (``log``) at ``iteration``."""
    if writer is not None:
        for key, value in scalars.items():
            writer.add_scalar(key, value, iteration)
    if wandb_writer is not None:
        wandb_writer.log(scalars, iteration)
