"""Invalid input, in process, across the front ends: each must fail before the first step with one line
naming the key (or flag) and what is allowed. The multi-rank cases (settings that differ between ranks,
refused engine combinations) are in dropin.py, deepspeed_runs.py and megatron_runs.py.

Each case: (front end, what is tried, a callable that should raise, substrings the message must hold).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
from typing import Any, Callable

from .common import Row, row

INF, NAN = math.inf, math.nan
RANGE_01 = "allowed a number in (0, 1)"


def _dropin(cls: str, **kwargs: Any) -> Callable[[], Any]:
    def make():
        import zclip_dist

        return getattr(zclip_dist, cls)(**kwargs)
    return make


def _config(cls: str, **kwargs: Any) -> Callable[[], Any]:
    def make():
        from zclip_dist import config

        return getattr(config, cls)(**kwargs)
    return make


def _deepspeed(entry: dict) -> Callable[[], Any]:
    def resolve():
        from zclip_dist.deepspeed import resolve_config

        return resolve_config({"gradient_clipping": 1.0, **entry})
    return resolve


def _megatron(*argv: str) -> Callable[[], Any]:
    """Megatron-LM's parser with the --zclip flags (add_arguments), then config_from_args. argparse reports
    a bad type or choice on stderr and exits: the last stderr line becomes the message."""
    def parse():
        from zclip_dist import megatron as zmeg

        parser = zmeg.add_arguments(argparse.ArgumentParser(prog="pretrain_gpt.py"))
        parser.add_argument("--clip-grad", type=float, default=1.0)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                args = parser.parse_args(["--zclip", *argv])
        except SystemExit:
            raise ValueError(err.getvalue().strip().splitlines()[-1]) from None
        return zmeg.config_from_args(args)
    return parse


def _megatron_wrap_non_megatron() -> Any:
    import torch

    from zclip_dist import megatron as zmeg
    from zclip_dist.config import ZClipConfig

    return zmeg.wrap_optimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), ZClipConfig())


CASES: list[tuple[str, str, Callable[[], Any], tuple[str, ...]]] = [
    # drop-in keywords (ZClipConfig / AdaGCConfig underneath)
    ("drop-in ZClip", "alpha=1.5 (range)", _dropin("ZClip", alpha=1.5), ("zclip.alpha = 1.5", RANGE_01)),
    ("drop-in ZClip", "alpha='0.9' (type)", _dropin("ZClip", alpha="0.9"), ("zclip.alpha = '0.9'", RANGE_01)),
    ("drop-in ZClip", "z_thresh=nan", _dropin("ZClip", z_thresh=NAN), ("zclip.z_thresh = nan", "(0, inf)")),
    ("drop-in ZClip", "eps=inf", _dropin("ZClip", eps=INF), ("zclip.eps = inf", "[0, inf)")),
    ("drop-in ZClip", "max_grad_norm=0", _dropin("ZClip", max_grad_norm=0.0), ("zclip.max_grad_norm = 0.0", "(0, inf)")),
    ("drop-in ZClip", "warmup_steps=2.5 (type)", _dropin("ZClip", warmup_steps=2.5), ("zclip.warmup_steps = 2.5", "integer >= 1")),
    ("drop-in ZClip", "mode='median' (unknown mode)", _dropin("ZClip", mode="median"), ("zclip.mode = 'median'", "'zscore', 'percentile'")),
    ("drop-in ZClip", "clip_option='Mean' (case)", _dropin("ZClip", clip_option="Mean"), ("zclip.clip_option", "'adaptive_scaling', 'mean'")),
    ("drop-in ZClip", "skip_update_on_spike='yes'", _dropin("ZClip", skip_update_on_spike="yes"), ("zclip.skip_update_on_spike", "true or false")),
    ("drop-in ZClip", "nonfinite='ignore'", _dropin("ZClip", nonfinite="ignore"), ("zclip.nonfinite = 'ignore'", "'skip', 'raise', 'propagate'")),
    ("ZClipConfig", "recovery_steps=0", _config("ZClipConfig", recovery_steps=0), ("zclip.recovery_steps = 0", "integer >= 1")),
    ("ZClipConfig", "verify_every=-1", _config("ZClipConfig", verify_every=-1), ("zclip.verify_every = -1", "integer >= 0")),
    ("drop-in AdaGC", "mode='AdaGC' (unknown mode)", _dropin("AdaGC", mode="AdaGC"), ("adagc.mode = 'AdaGC'", "'adagc', 'adagc-global'")),
    ("drop-in AdaGC", "clip_ratio=0.9", _dropin("AdaGC", clip_ratio=0.9), ("adagc.clip_ratio = 0.9", "[1, inf)")),
    ("drop-in AdaGC", "beta=1.0", _dropin("AdaGC", beta=1.0), ("adagc.beta = 1.0", "[0, 1)")),
    ("drop-in AdaGC", "max_grad_norm=inf", _dropin("AdaGC", max_grad_norm=INF), ("adagc.max_grad_norm = inf", "(0, inf)")),
    ("drop-in AdaGC", "warmup_steps=-1", _dropin("AdaGC", warmup_steps=-1), ("adagc.warmup_steps = -1", "integer >= 0")),
    # DeepSpeed JSON entries
    ("DeepSpeed JSON", '"zclip": {"z_threshold": 2} (unknown key)', _deepspeed({"zclip": {"z_threshold": 2}}),
     ("'z_threshold'", "allowed keys are", "z_thresh")),
    ("DeepSpeed JSON", '"zclip": 2.5 (not an object)', _deepspeed({"zclip": 2.5}), ("zclip = 2.5", "an object of ZClip settings")),
    ("DeepSpeed JSON", '"zclip": {"enabled": "yes"}', _deepspeed({"zclip": {"enabled": "yes"}}), ("zclip.enabled = 'yes'", "true or false")),
    ("DeepSpeed JSON", '"zclip": {"mode": "zsc0re"}', _deepspeed({"zclip": {"mode": "zsc0re"}}), ("zclip.mode = 'zsc0re'", "'zscore', 'percentile'")),
    ("DeepSpeed JSON", '"adagc": {"beta": 1.5}', _deepspeed({"adagc": {"beta": 1.5}}), ("adagc.beta = 1.5", "[0, 1)")),
    ("DeepSpeed JSON", 'both "zclip" and "adagc" entries', _deepspeed({"zclip": {}, "adagc": {}}),
     ("both a 'zclip' and an 'adagc' entry", "keep one")),
    ("DeepSpeed JSON", '"zclip": {"max_grad_norm": -1}', _deepspeed({"zclip": {"max_grad_norm": -1}}),
     ("zclip.max_grad_norm = -1", "(0, inf)")),
    ("DeepSpeed JSON", '"zclip": {"_source": "x"} (a private field)', _deepspeed({"zclip": {"_source": "x"}}),
     ("unknown key(s) '_source'", "allowed keys are alpha")),
    # Megatron flags
    ("Megatron flags", "--zclip-alpha 1.5", _megatron("--zclip-alpha", "1.5"), ("--zclip-alpha = 1.5", RANGE_01)),
    ("Megatron flags", "--zclip-mode median", _megatron("--zclip-mode", "median"), ("--zclip-mode", "zscore", "percentile")),
    ("Megatron flags", "--zclip-warmup-steps 2.5", _megatron("--zclip-warmup-steps", "2.5"), ("--zclip-warmup-steps", "invalid int value")),
    ("Megatron flags", "--zclip-max-grad-norm inf", _megatron("--zclip-max-grad-norm", "inf"), ("--zclip-max-grad-norm = inf", "(0, inf)")),
    ("Megatron flags", "--zclip-nonfinite ignore", _megatron("--zclip-nonfinite", "ignore"), ("--zclip-nonfinite", "'skip'", "'raise'")),
    ("Megatron flags", "--zclip-verify-every -5", _megatron("--zclip-verify-every", "-5"), ("--zclip-verify-every = -5", "integer >= 0")),
    ("Megatron", "wrap_optimizer(torch.optim.SGD) (not a megatron-core optimizer)", _megatron_wrap_non_megatron,
     ("lacks prepare_grads", "expected a megatron-core optimizer")),
]


def _attempt(fn: Callable[[], Any]) -> tuple[str | None, str]:
    try:
        fn()
    except (ValueError, TypeError) as err:
        return type(err).__name__, str(err)
    return None, ""


def run() -> list[Row]:
    rows = []
    for front_end, tried, fn, needles in CASES:
        kind, msg = _attempt(fn)
        rows.append(row("bad input", front_end, tried,
                        {"rejected": kind is not None, "one line": "\n" not in msg,
                         "names the key and what is allowed": all(n in msg for n in needles)},
                        f"{kind}: \"{msg}\"" if kind else "accepted"))
    return rows
