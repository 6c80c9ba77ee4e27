"""The demo: a small GPT trained with DeepSpeed twice from the same seed -- fixed clipping vs ZClip --
with a corrupted batch injected at a known step; a table, a PNG and JSONL metrics come out.

``run(settings)`` does it all; ``zclip-dist demo`` is its command line.
"""

from __future__ import annotations

import json
import os
from typing import Any

from . import ranks, report
from .settings import RUNS, SHORT, DemoSettings
from .train import ds_config

__all__ = ["DemoSettings", "SHORT", "run"]


def run(settings: DemoSettings) -> dict[str, Any]:
    """Train both runs, then write the PNG, ``results.json`` and ``table.md`` into ``settings.out``.

    Returns ``{"table": str, "summaries": {...}, "outputs": {...}}``. The JSONL files are written while
    training (``fixed.jsonl``, ``zclip.jsonl``, one line per ``log_interval`` steps); the DeepSpeed
    configs of both runs are saved as ``ds_config.<run>.json``.
    """
    os.makedirs(settings.out, exist_ok=True)
    for run_name in RUNS:  # JsonlSink appends: a re-run into the same folder starts clean
        path = os.path.join(settings.out, f"{run_name}.jsonl")
        if os.path.exists(path):
            os.remove(path)
    result = ranks.spawn(settings)
    histories = {r: result[r]["history"] for r in RUNS}
    summaries = {r: report.summarize(histories[r], settings, result[r]["wall_s"]) for r in RUNS}
    text = report.table(summaries, settings)
    outputs = {f"{r}_jsonl": os.path.join(settings.out, f"{r}.jsonl") for r in RUNS}
    for r in RUNS:  # the exact DeepSpeed configs: `zclip-dist replay zclip.jsonl --ds-config ...` reuses them
        outputs[f"{r}_ds_config"] = os.path.join(settings.out, f"ds_config.{r}.json")
        with open(outputs[f"{r}_ds_config"], "w") as f:
            json.dump(ds_config(settings, r), f, indent=2)
    outputs["png"] = report.plot(histories, settings, os.path.join(settings.out, "demo.png"))
    outputs["table"] = os.path.join(settings.out, "table.md")
    outputs["results"] = os.path.join(settings.out, "results.json")
    with open(outputs["table"], "w") as f:
        f.write(text + "\n")
    report.write_results(outputs["results"], settings, summaries, outputs)
    return {"table": text, "summaries": summaries, "outputs": outputs}
