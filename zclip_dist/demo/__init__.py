"""The demo: a small GPT trained with DeepSpeed from the same seed with fixed clips, ZClip and AdaGC,
with a corrupted batch injected at a known step; a table, a PNG and JSONL metrics come out.

``run(settings)`` does it all; ``zclip-dist demo`` is its command line.
"""

from __future__ import annotations

import json
import os
from typing import Any

from . import ranks, report
from .settings import SHORT, DemoSettings
from .train import ds_config

__all__ = ["DemoSettings", "SHORT", "run"]


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

