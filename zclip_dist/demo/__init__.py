"""The demo: a small GPT trained with DeepSpeed from the same seed with fixed clips, ZClip and AdaGC,
with a corrupted batch injected at a known step; a table, a PNG and JSONL metrics come out.

``run(settings)`` does it all; ``zclip-dist demo`` is its command line. ``run_sweep(settings)`` is the
learning-rate x method sweep without injected corruption (``zclip-dist sweep``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from . import ranks, report, sweep, sweep_report
from .settings import SHORT, DemoSettings
from .sweep import SweepSettings
from .train import ds_config

__all__ = ["DemoSettings", "SHORT", "SweepSettings", "run", "run_sweep"]


def run(settings: DemoSettings) -> dict[str, Any]:
    """Train every run, then write the PNG, ``results.json`` and ``table.md`` into ``settings.out``.

    Returns ``{"table": str, "summaries": {...}, "outputs": {...}}`` (and ``"pilot"``, the typical norm,
    for the pilot). The JSONL files are written while training (``<run>.jsonl``, one line per
    ``log_interval`` steps); the DeepSpeed configs of the runs are saved as ``ds_config.<run>.json``.
    """
    os.makedirs(settings.out, exist_ok=True)
    runs = settings.runs
    for run_name in runs:  # JsonlSink appends: a re-run into the same folder starts clean
        path = os.path.join(settings.out, f"{run_name}.jsonl")
        if os.path.exists(path):
            os.remove(path)
    result = ranks.spawn(settings)
    histories = {r: result[r]["history"] for r in runs}
    extra: dict[str, Any] = {}
    if settings.pilot:  # nothing injected: the typical norm is the result
        summaries = {}
        extra["pilot"] = report.pilot_summary(histories["none"])
        text = report.pilot_text(extra["pilot"])
    else:
        summaries = {r: report.summarize(histories[r], settings, result[r]["wall_s"]) for r in runs}
        text = report.table(summaries, settings)
    outputs = {f"{r}_jsonl": os.path.join(settings.out, f"{r}.jsonl") for r in runs}
    for r in runs:  # the exact DeepSpeed configs: `zclip-dist replay zclip.jsonl --ds-config ...` reuses them
        outputs[f"{r}_ds_config"] = os.path.join(settings.out, f"ds_config.{r}.json")
        with open(outputs[f"{r}_ds_config"], "w") as f:
            json.dump(ds_config(settings, r), f, indent=2)
    outputs["png"] = report.plot(histories, settings, os.path.join(settings.out, "demo.png"))
    outputs["table"] = os.path.join(settings.out, "table.md")
    outputs["results"] = os.path.join(settings.out, "results.json")
    with open(outputs["table"], "w") as f:
        f.write(text + "\n")
    report.write_results(outputs["results"], settings, summaries, outputs, **extra)
    return {"table": text, "summaries": summaries, "outputs": outputs, **extra}


def run_sweep(settings: SweepSettings, progress: bool = True) -> dict[str, Any]:
    """Train every cell of the sweep, then write ``table.md``, ``sweep.png`` (heat map), ``curves.png``
    (loss per step, first seed), ``results.json`` (per-run and per-cell numbers) and ``traces.json``
    (per-step loss, norm and clipped flag of every run) into ``settings.out``.

    Returns ``{"table": str, "summaries": [...], "cells": {...}, "outputs": {...}}``.
    """
    os.makedirs(settings.out, exist_ok=True)
    corpus = sweep.corpus(settings)
    collapse = sweep_report.unigram_entropy(corpus.tokens)
    where = sweep.machine(settings)  # the load average before the runs start
    runs = sweep.run_cells(settings, progress=progress)
    summaries = [sweep_report.summarize_run(r, collapse) for r in runs]
    cells = sweep_report.aggregate(summaries, settings)
    text = sweep_report.tables(cells, settings)
    out = {name: os.path.join(settings.out, name)
           for name in ("table.md", "sweep.png", "curves.png", "results.json", "traces.json")}
    with open(out["table.md"], "w") as f:
        f.write(text + "\n")
    sweep_report.heatmap(cells, settings, out["sweep.png"])
    sweep_report.curves(runs, settings, out["curves.png"])
    sweep_report.write_results(out["results.json"], settings, summaries, cells, collapse_loss=collapse,
                               wall_s=sum(r["wall_s"] for r in runs), machine=where)
    with open(out["traces.json"], "w") as f:
        json.dump(runs, f)
    return {"table": text, "summaries": summaries, "cells": cells, "collapse_loss": collapse, "outputs": out}
