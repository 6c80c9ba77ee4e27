"""``zclip-dist``: the demo, offline replay of a gradient-norm trace, and where to go next.

Every error a user can cause (a bad file, a bad value) ends the command with one line on stderr and
exit status 2; a bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import fields
from typing import Any, NoReturn, Sequence

from .config import CLIP_OPTIONS, MODES, AdaGCConfig, ConfigError, ZClipConfig, attribute_docs

__all__ = ["main", "build_parser"]

PROG = "zclip-dist"
_NONE = ("none", "off")


class UsageError(Exception):
    """Ends the command with its message on one line and exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of argparse's usage block
        raise UsageError(f"{self.prog}: {message} (see --help)")


_Formatter = argparse.RawDescriptionHelpFormatter


# ---- settings flags generated from the config dataclasses ---------------------------------------
_OFF = "none"  # parsed 'none': an explicit None, unlike the flag's default (not given)


def _number_or_none(text: str) -> float | str:
    if text.strip().lower() in _NONE:
        return _OFF
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'none'") from None


def _int_or_none(text: str) -> int | str:
    if text.strip().lower() in _NONE:
        return _OFF
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or 'none'") from None


def _positive_floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive numbers")
    return values


_CHOICES = {"mode": MODES, "clip_option": CLIP_OPTIONS}


def _add_config_flags(parser: argparse.ArgumentParser, cls: type, prefix: str, title: str,
                      skip: Sequence[str] = ()) -> None:
    """``--<prefix>-<field>`` for every field of ``cls``; defaults stay None so given values are known."""
    docs = attribute_docs(cls)
    group = parser.add_argument_group(title)
    for f in fields(cls):
        if f.name.startswith("_") or f.name in skip:
            continue
        kind = str(f.type)
        kwargs: dict[str, Any] = {"default": None, "dest": f"{prefix}_{f.name}",
                                  "help": f"{docs.get(f.name, f.name)} (default {f.default!r})"}
        if f.name in _CHOICES:
            kwargs["choices"] = _CHOICES[f.name]
        elif "bool" in kind:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "None" in kind:
            kwargs["type"] = _int_or_none if "int" in kind else _number_or_none
            kwargs["metavar"] = "N|none"
        elif "int" in kind:
            kwargs["type"], kwargs["metavar"] = int, "N"
        elif "float" in kind:
            kwargs["type"], kwargs["metavar"] = float, "X"
        group.add_argument(f"--{prefix}-{f.name.replace('_', '-')}", **kwargs)


def _given(args: argparse.Namespace, cls: type, prefix: str) -> dict[str, Any]:
    given = {f.name: getattr(args, f"{prefix}_{f.name}", None) for f in fields(cls) if not f.name.startswith("_")}
    return {k: (None if v == _OFF else v) for k, v in given.items() if v is not None}


def _require(command: str, modules: Sequence[str], extra: str, hint: str = "") -> None:
    """One line naming the extra to install when an optional dependency is missing (exit 2)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"{PROG} {command}: needs {', '.join(missing)}: pip install \"zclip-dist[{extra}]\"{hint}")


# ---- demo ---------------------------------------------------------------------------------------
DEMO_HELP = """\
Train a small GPT with DeepSpeed from the same seed with each fixed clip (gradient_clipping), ZClip
and AdaGC, on simulated ranks (gloo, CPU) or on this machine's GPUs (NCCL), with a corrupted batch
injected on one rank at a known step; print a side-by-side table and write a PNG, JSONL metrics and
results.json.

The spike: at --spike-step the batch of --spike-rank has every target replaced by one character and
its loss weighted x100 (a broken loss mask or sample weight); the learning rate (3e-3, no decay) is
aggressive for this model. ZClip and AdaGC run at their published defaults with --clip as their cap
(DeepSpeed gradient_clipping, as a user who turns them on keeps the ceiling they had). The fixed
clips (--fixed-clips) were set from --pilot, a run without clipping and without the injected batch
that prints the typical norm.

Outputs in --out: demo.png, table.md, results.json, <run>.jsonl (one line per --log-interval steps,
after a header line with the run's settings) and ds_config.<run>.json per run (fixed-1, ..., zclip,
adagc). `zclip-dist replay OUT/zclip.jsonl` replays the ZClip run's decisions; `zclip-dist report
OUT/zclip.jsonl` summarises it. Needs zclip-dist[demo]."""


def _add_demo(sub: Any) -> None:
    from .demo.settings import SHORT, DemoSettings

    d = DemoSettings()
    p = sub.add_parser("demo", help="fixed clips vs ZClip vs AdaGC on a small GPT with an injected loss spike",
                       description=DEMO_HELP, formatter_class=_Formatter)
    p.add_argument("--short", action="store_true",
                   help=f"CI mode: {SHORT['steps']} steps, spike at step {SHORT['spike_step']} (75 s on 2 idle cores)")
    p.add_argument("--steps", type=int, metavar="N", default=None, help=f"optimizer steps per run (default {d.steps})")
    p.add_argument("--spike-step", type=int, metavar="N", default=None,
                   help=f"0-based step whose batch is corrupted (default {d.spike_step})")
    p.add_argument("--spike-rank", type=int, metavar="R", default=d.spike_rank, help="rank whose batch is corrupted (default %(default)s)")
    p.add_argument("--world", type=int, metavar="N", default=None,
                   help=f"ranks (default: {d.world} simulated CPU ranks, or one per GPU when GPUs are present)")
    p.add_argument("--fixed-clips", type=_positive_floats, metavar="X,Y,...", default=d.fixed_clips,
                   help=f"gradient_clipping of the fixed runs (default {','.join(f'{c:g}' for c in d.fixed_clips)})")
    p.add_argument("--clip", type=float, metavar="X", default=d.clip,
                   help="gradient_clipping of the ZClip and AdaGC runs: their cap (default %(default)s)")
    p.add_argument("--pilot", action="store_true",
                   help="one run without clipping and without the injected batch: print the typical norm")
    p.add_argument("--lr", type=float, metavar="X", default=d.lr, help="AdamW learning rate (default %(default)s)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=d.zero_stage, help="DeepSpeed ZeRO stage (default %(default)s)")
    p.add_argument("--seed", type=int, metavar="N", default=d.seed, help="seed of the corpus, the model and the batches (default %(default)s)")
    p.add_argument("--log-interval", type=int, metavar="N", default=d.log_interval, help="write a JSONL line every N steps (default %(default)s)")
    p.add_argument("--out", metavar="DIR", default=d.out, help="output folder (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_flags(p, ZClipConfig, "zclip", "ZClip settings of the ZClip run",
                      skip=("max_grad_norm", "nonfinite", "verify_every"))
    _add_config_flags(p, AdaGCConfig, "adagc", "AdaGC settings of the AdaGC run", skip=("max_grad_norm", "nonfinite"))
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    _require("demo", ["deepspeed", "matplotlib"] + ([] if args.no_progress else ["tqdm"]), "demo")
    from . import demo
    from .demo.ranks import gpu_count

    base = demo.DemoSettings()
    steps = args.steps if args.steps is not None else (demo.SHORT["steps"] if args.short else base.steps)
    spike = args.spike_step if args.spike_step is not None else (
        demo.SHORT["spike_step"] if args.short else base.spike_step)
    world = args.world if args.world is not None else (gpu_count() or base.world)
    zclip = {**base.zclip, **_given(args, ZClipConfig, "zclip")}
    adagc = {**base.adagc, **_given(args, AdaGCConfig, "adagc")}
    try:
        ZClipConfig.from_dict({**zclip, "max_grad_norm": args.clip})  # fail before starting ranks
        AdaGCConfig.from_dict({**adagc, "max_grad_norm": args.clip})
        settings = base.replace(steps=steps, spike_step=spike, spike_rank=args.spike_rank, world=world,
                                fixed_clips=args.fixed_clips, clip=args.clip, pilot=args.pilot, lr=args.lr,
                                zero_stage=args.zero_stage, seed=args.seed,
                                log_interval=args.log_interval, out=args.out, progress=not args.no_progress,
                                zclip=zclip, adagc=adagc)
    except (ValueError, ConfigError) as e:
        raise UsageError(f"{PROG} demo: {e}") from None
    what = ("pilot without clipping, nothing injected" if settings.pilot else
            f"runs {', '.join(settings.runs)}, corrupted batch on rank {settings.spike_rank} at step {spike}")
    print(f"{PROG} demo: GPT on {world} {'GPU' if gpu_count() else 'simulated CPU'} ranks, {steps} steps per run, "
          f"{what}", file=sys.stderr)
    start = time.perf_counter()
    result = demo.run(settings)
    print(result["table"])
    print(f"\nwrote {', '.join(result['outputs'].values())}  ({time.perf_counter() - start:.0f} s in all)")
    return 0


# ---- sweep --------------------------------------------------------------------------------------
SWEEP_HELP = """\
Natural instability, nothing injected: train a small GPT from scratch in one process for every
learning rate x clipping method x seed (constant learning rate, no warmup, AdamW), and report final
loss, loss spikes, divergence and the share of steps clipped per cell as Markdown tables and a heat
map. Methods: no clipping, a tight and a loose fixed clip (torch clip_grad_norm_), ZClip and AdaGC
(zclip_dist drop-ins) at their published defaults with the loose clip as their cap.

The fixed clips come from --pilot: no clipping at the lowest learning rate, which prints the typical
norm; tight is about that norm, loose about 5x. A run has diverged when its loss turns non-finite or
its final loss is no better than predicting characters by their frequency (the corpus's unigram
entropy). A loss spike: a step whose loss exceeds 1.4x the mean of the previous 10.

Outputs in --out: table.md, sweep.png (heat map), curves.png (loss per step of the first seed),
results.json (settings, per-run and per-cell numbers, the machine), traces.json (per-step loss, norm,
clipped) and runs/ (each finished run: a stopped sweep started again reuses them).
On a GPU: --device cuda --size large (a 6-layer, d=384 GPT, context 256, 5,000 steps); first run its
own --pilot and give --tight-clip and --loose-clip from the norm it prints."""


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _add_sweep(sub: Any) -> None:
    from .demo.sweep import METHODS, SIZES, SweepSettings, short_mode

    d = SweepSettings()
    p = sub.add_parser("sweep", help="learning rate x clipping method on a small GPT: natural spikes and divergence",
                       description=SWEEP_HELP, formatter_class=_Formatter)
    short = short_mode()
    p.add_argument("--short", action="store_true", help=f"CI mode: the lowest and the highest learning rate "
                   f"(small: {','.join(f'{v:g}' for v in short['lrs'])}), seed 0, {short['steps']} steps")
    p.add_argument("--pilot", action="store_true", help="no clipping at the lowest learning rate: print the typical norm")
    p.add_argument("--lrs", type=_positive_floats, metavar="X,Y,...", default=None,
                   help="learning rates (default " + "; ".join(f"{k} {','.join(f'{v:g}' for v in s.lrs)}"
                                                              for k, s in SIZES.items()) + ")")
    p.add_argument("--seeds", type=_ints, metavar="N,M,...", default=None,
                   help=f"seeds of the model and the batches (default {','.join(map(str, d.seeds))})")
    p.add_argument("--methods", type=_names, metavar="A,B,...", default=d.methods,
                   help=f"subset of {','.join(METHODS)} (default all)")
    p.add_argument("--steps", type=int, metavar="N", default=None,
                   help="steps per run (default " + ", ".join(f"{k} {s.steps}" for k, s in SIZES.items()) + ")")
    p.add_argument("--tight-clip", type=float, metavar="X", default=None,
                   help=f"tight fixed clip (default small {d.tight_clip:g}; large: from its --pilot)")
    p.add_argument("--loose-clip", type=float, metavar="X", default=None,
                   help=f"loose fixed clip, and the cap of ZClip and AdaGC (default small {d.loose_clip:g}; large: from its --pilot)")
    p.add_argument("--size", choices=tuple(SIZES), default=d.size, help="model and step budget (default %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device of the runs, e.g. cuda (default %(default)s)")
    p.add_argument("--jobs", type=int, metavar="N", default=None,
                   help="runs side by side (default: one per CPU core on cpu, 1 on a GPU)")
    p.add_argument("--out", metavar="DIR", default=d.out, help="output folder (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> int:
    import torch

    from . import demo
    from .demo.sweep import short_mode

    if args.device != "cpu" and not torch.device(args.device).type == "cuda":
        raise UsageError(f"{PROG} sweep: --device {args.device!r} is invalid: allowed cpu, cuda, cuda:N")
    if args.device != "cpu" and not torch.cuda.is_available():
        raise UsageError(f"{PROG} sweep: --device {args.device}: no CUDA device on this machine")
    jobs = args.jobs if args.jobs is not None else ((os.cpu_count() or 1) if args.device == "cpu" else 1)
    given = {"lrs": args.lrs, "seeds": args.seeds, "steps": args.steps, "tight_clip": args.tight_clip,
             "loose_clip": args.loose_clip}
    chosen = {**(short_mode(args.size) if args.short else {}), **{k: v for k, v in given.items() if v is not None}}
    try:
        settings = demo.SweepSettings(size=args.size, methods=("none",) if args.pilot else args.methods,
                                      device=args.device, jobs=jobs, out=args.out, **chosen)
    except ValueError as e:
        raise UsageError(f"{PROG} sweep: {e}") from None
    start = time.perf_counter()
    if args.pilot:
        from .demo.report import pilot_summary, pilot_text
        from .demo.sweep import pilot_cell

        run = pilot_cell(settings)
        print(f"learning rate {run['lr']:g}, seed 0, {len(run['loss'])} steps: "
              + pilot_text(pilot_summary([{"grad_norm": v} for v in run["grad_norm"]])))
        return 0
    cells = len(settings.cells())
    print(f"{PROG} sweep: {cells} runs of {settings.n_steps} steps ({len(settings.lrs)} learning rates x "
          f"{len(settings.methods)} methods x {len(settings.seeds)} seeds) on {settings.device}, {jobs} at a time",
          file=sys.stderr)
    result = demo.run_sweep(settings, progress=not args.no_progress)
    print(result["table"])
    print(f"\nwrote {', '.join(result['outputs'].values())}  ({time.perf_counter() - start:.0f} s in all)")
    return 0


# ---- replay -------------------------------------------------------------------------------------
TRACE_FORMATS = """\
TRACE is one of
  * our JSONL (log_jsonl of any front end, zclip-dist demo): its header line holds the run's
    method and settings; key 'grad_norm' (or --field);
  * CSV/TSV with a header: a column named grad_norm / grad-norm / ... (or --field), step column
    'step' or 'iteration' when present;
  * TensorBoard event files: a file, a run folder, or a folder above one. DeepSpeed's monitor writes
    to output_path/job_name/ ('Train/zclip/grad_norm' with ZClip attached) against samples, which
    are converted to optimizer steps; Megatron writes 'grad-norm' (and 'zclip/grad_norm') against
    iterations. Reading them needs the tensorboard package (zclip-dist[tensorboard]).
The format follows the name (.jsonl/.json, .csv/.tsv, *tfevents* or a folder) unless --format is given."""

REPLAY_HELP = f"""\
Read a gradient-norm trace and simulate ZClip (any settings) and AdaGC-global on it: print which
steps each would clip and by how much, and write a PNG (zclip-dist[plot]). Tune alpha and z_thresh
on a past run without a GPU: a million steps take seconds.

{TRACE_FORMATS}

Settings, each over the next: the --zclip-* / --adagc-* flags; --ds-config (its "zclip" or "adagc"
entry, read as training reads it; gradient_clipping is both methods' cap); the JSONL header (the run's
own settings; --ignore-header skips it); the defaults. With the run's own settings, a trace logged at
every step replays the run's decisions exactly (the report says whether they agree); with a log
interval > 1 the simulation sees only the logged steps."""


def _add_trace_args(p: argparse.ArgumentParser, metavar: str = "TRACE") -> None:
    p.add_argument("trace", metavar=metavar, help="JSONL, CSV or TensorBoard event file/folder")
    p.add_argument("--format", choices=("auto", "jsonl", "csv", "tensorboard"), default="auto", help="trace format (default %(default)s)")
    p.add_argument("--field", metavar="NAME", default=None, help="JSONL key, CSV column or TensorBoard tag of the norm")
    p.add_argument("--run", metavar="NAME", default=None, help="JSONL: only records whose 'run' is this (e.g. zclip)")
    p.add_argument("--samples-per-step", type=int, metavar="N", default=None,
                   help="DeepSpeed TensorBoard: samples per optimizer step (train_batch_size; default: read from the file)")


def _read(args: argparse.Namespace, reader: Any = None):
    from .traces import read_trace

    if args.samples_per_step is not None and args.samples_per_step < 1:
        raise UsageError(f"{PROG} {args.command}: --samples-per-step must be >= 1")
    return (reader or read_trace)(args.trace, args.format, args.field, args.run, args.samples_per_step)


#: Settings replay does not offer: where metrics go and cross-rank checks mean nothing offline.
_NOT_OFFLINE = ("nonfinite", "verify_every", "log_jsonl", "log_interval")


def _add_replay(sub: Any) -> None:
    p = sub.add_parser("replay", help="simulate ZClip and AdaGC-global on a logged gradient-norm trace",
                       description=REPLAY_HELP, formatter_class=_Formatter)
    _add_trace_args(p)
    p.add_argument("--ds-config", default=None, metavar="JSON",
                   help="DeepSpeed config whose \"zclip\" or \"adagc\" entry and gradient_clipping give the settings")
    p.add_argument("--ignore-header", action="store_true", help="JSONL: do not take the settings from the header line")
    p.add_argument("--no-adagc", action="store_true", help="simulate ZClip only")
    p.add_argument("--png", metavar="PNG", default=None, help="PNG to write (default: <trace name>.replay.png here)")
    p.add_argument("--no-png", action="store_true", help="write no PNG (matplotlib not needed)")
    p.add_argument("--csv-out", default=None, metavar="CSV", help="write every step's decisions here")
    p.add_argument("--show", type=int, metavar="N", default=20, help="clipped steps to list per method (default %(default)s)")
    _add_config_flags(p, ZClipConfig, "zclip", "ZClip settings (default: the run's, else the reference package's)",
                      skip=_NOT_OFFLINE)
    _add_config_flags(p, AdaGCConfig, "adagc", "AdaGC-global settings (default: the run's, else the official patch's)",
                      skip=("mode",) + _NOT_OFFLINE)
    p.set_defaults(func=_run_replay)


def _load_ds_config(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            ds = json.load(f)
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(ds, dict):
        raise UsageError(f"{path}: expected a JSON object (a DeepSpeed config)")
    return ds


def _run_replay(args: argparse.Namespace) -> int:
    from . import replay as rp

    if args.show < 0:
        raise UsageError(f"{PROG} replay: --show must be >= 0")
    if not args.no_png:  # before the work, not after it
        _require("replay", ["matplotlib"], "plot", " (or pass --no-png)")
    zclip, adagc = _given(args, ZClipConfig, "zclip"), _given(args, AdaGCConfig, "adagc")
    ZClipConfig.from_dict(zclip, source="zclip")  # a bad flag fails before the trace is read
    AdaGCConfig.from_dict({**adagc, "mode": "adagc-global"}, source="adagc")
    ds = _load_ds_config(args.ds_config) if args.ds_config else None
    trace = _read(args)
    settings = rp.resolve_settings(trace, ds_config=ds, zclip=zclip, adagc=adagc, use_header=not args.ignore_header)
    result = rp.replay(trace, settings.zclip, None if args.no_adagc else settings.adagc, settings)
    print(rp.report(result, args.show))
    if args.csv_out:
        rp.write_csv(result, args.csv_out)
        print(f"wrote {args.csv_out}")
    if not args.no_png:
        png = args.png or os.path.basename(os.path.normpath(args.trace)) + ".replay.png"
        print(f"wrote {rp.plot(result, png)}")
    return 0


# ---- report -------------------------------------------------------------------------------------
REPORT_HELP = f"""\
A short report of a run from its metrics, for the morning after: steps, the share clipped, the
spikes with their steps and sizes, non-finite steps, regime shifts, and how the threshold moved.
It reads the decisions the run recorded (our JSONL, or the zclip/* / Train/zclip/* TensorBoard
scalars); for a trace of norms only it simulates them with the run's settings, as replay does.

{TRACE_FORMATS.replace("TRACE is", "METRICS is")}"""


def _add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="a short human report of a run from its metrics file",
                       description=REPORT_HELP, formatter_class=_Formatter)
    _add_trace_args(p, "METRICS")
    p.add_argument("--top", type=int, metavar="N", default=10, help="largest spikes to list (default %(default)s)")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from .run_report import read_for_report, run_report

    if args.top < 0:
        raise UsageError(f"{PROG} report: --top must be >= 0")
    print(run_report(_read(args, read_for_report), args.top))
    return 0


# ---- events -------------------------------------------------------------------------------------
EVENTS_HELP = f"""\
Spike forensics of a run: for each clipped, spike or non-finite step its step, kinds, norm and
threshold, the parameters that carried the largest shares of the squared norm, and the data-parallel
replicas (with their ranks) whose gradients carried it -- as recorded during training (forensics is on
by default; replica attribution is the "replicas" setting). Read from our JSONL ("events" field of the
log lines), or rebuilt from the Train/zclip/event/* (DeepSpeed) or zclip/event/* (Megatron) scalars of a
TensorBoard folder, which hold the shares but not the replicas' ranks.

{TRACE_FORMATS.replace("TRACE is", "METRICS is")}"""


def _add_events(sub: Any) -> None:
    p = sub.add_parser("events", help="spike forensics of a run: which parameters and replicas carried each event",
                       description=EVENTS_HELP, formatter_class=_Formatter)
    _add_trace_args(p, "METRICS")
    p.add_argument("--last", type=int, metavar="N", default=None, help="only the last N events")
    p.add_argument("--json", action="store_true", help="one JSON object per event instead of the table (scripts)")
    p.set_defaults(func=_run_events)


def _run_events(args: argparse.Namespace) -> int:
    from .forensics import format_events, summarize_events
    from .run_report import read_for_report

    if args.last is not None and args.last < 1:
        raise UsageError(f"{PROG} events: --last must be >= 1")
    trace = _read(args, read_for_report)
    events = trace.events[-args.last:] if args.last else trace.events
    if args.json:
        for e in events:
            print(json.dumps(e.to_json()))
        return 0
    print(f"run: {trace.source}")
    print(summarize_events(trace.events))
    if trace.events:
        print(format_events(trace.events, limit=args.last))
    return 0


# ---- entry point --------------------------------------------------------------------------------
MAIN_HELP = """\
ZClip adaptive gradient clipping for DeepSpeed, Megatron and PyTorch, exact under TP/PP/DP/EP.

  zclip-dist demo            fixed clips vs ZClip vs AdaGC on a small GPT with an injected loss spike
  zclip-dist demo --short    the same, shorter (CI)
  zclip-dist sweep           learning rate x clipping method, natural instability (nothing injected)
  zclip-dist replay TRACE    what ZClip / AdaGC-global would clip on a logged gradient-norm trace
  zclip-dist report METRICS  a short report of a run: clipped share, spikes, non-finite steps, threshold
  zclip-dist events METRICS  spike forensics: which parameters and replicas carried each clipped step

Use in training: a "zclip" entry in a DeepSpeed config with zclip_dist.deepspeed.initialize (or
`deepspeed --module zclip_dist.deepspeed.launch train.py`), --zclip flags for Megatron, ZClip(...).step(model)
in plain PyTorch. Run `zclip-dist COMMAND --help` for each command's options."""


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = _Parser(prog=PROG, description=MAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_demo(sub)
    _add_sweep(sub)
    _add_replay(sub)
    _add_report(sub)
    _add_events(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .traces import TraceError

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return args.func(args)
    except (UsageError, TraceError, ConfigError) as e:
        print(f"{PROG}: error: {e}" if not str(e).startswith(PROG) else f"{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
