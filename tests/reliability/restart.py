"""Kill and resume a real multi-process job (tests/reliability/restart_job.py), plus the drop-in's
checkpoint edge cases.

1. An uninterrupted DP2 run writes every step's decisions (ZClip and AdaGC).
2. The same job again; when its log reaches a seeded random step, one seeded random rank gets SIGKILL.
   The survivor fails in its next collective (gloo sees the peer gone) or is killed after a grace period.
3. From the last checkpoint: resume on DP2 -- every later decision and the final weights must equal the
   uninterrupted run's, bit for bit -- and on a different DP size (DP1; DP1 and DP3 in --long), where the
   same global batch is split differently, so decisions must agree to rounding (and every spike flag).
4. In-process: a checkpoint without clipping state warns and starts from warmup; a newer state version
   is refused with a clear message.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from .common import Row, is_long, row, steps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launch(directory: str, world: int, n_steps: int, every: int, resume: bool = False) -> list[subprocess.Popen]:
    from tests.distributed import free_port

    os.makedirs(directory, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONWARNINGS": "ignore::FutureWarning"}
        cmd = [sys.executable, "-m", "tests.reliability.restart_job", directory, str(n_steps), str(every)]
        err = open(os.path.join(directory, f"rank{rank}.err"), "a")
        procs.append(subprocess.Popen(cmd + (["--resume"] if resume else []), cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=err))
    return procs


def wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes; a process still running after ``timeout`` is killed (-9)."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return [p.returncode for p in procs]


def read_log(directory: str) -> dict[int, dict]:
    path = os.path.join(directory, "log.jsonl")
    if not os.path.exists(path):
        return {}
    out = {}
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):  # a line cut by the kill is not a decision
                rec = json.loads(line)
                out[rec["step"]] = rec
    return out


def errors(directory: str) -> str:
    return "".join(open(os.path.join(directory, f)).read()[-2000:] for f in sorted(os.listdir(directory))
                   if f.endswith(".err"))


def kill_at(directory: str, procs: list[subprocess.Popen], step: int, victim: int, timeout: float = 300) -> bool:
    """SIGKILL ``procs[victim]`` once the log holds ``step``; False if the job never got there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if step in read_log(directory):
            os.kill(procs[victim].pid, signal.SIGKILL)
            return True
        if any(p.poll() is not None for p in procs):
            return False
        time.sleep(0.02)
    return False


def close(a: list[float], b: list[float], rel: float = 1e-5) -> bool:
    return all(math.isclose(x, y, rel_tol=rel, abs_tol=1e-9) for x, y in zip(a, b)) and len(a) == len(b)


def kill_and_resume(seed: int = 3) -> list[Row]:
    n_steps, every = steps(60, 500), steps(10, 25)
    rng = random.Random(seed)
    kill_step, victim = rng.randrange(every + 2, n_steps - every), rng.randrange(2)
    other_sizes = (1, 3) if is_long() else (1,)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        full_dir, killed_dir = f"{tmp}/full", f"{tmp}/killed"
        full_procs = launch(full_dir, 2, n_steps, every)
        killed = launch(killed_dir, 2, n_steps, every)
        reached = kill_at(killed_dir, killed, kill_step, victim)
        codes = wait(killed, 60)
        full_codes = wait(full_procs, 600)
        if full_codes != [0, 0] or not reached:
            msg = errors(full_dir) + errors(killed_dir)
            return [row("restart", "drop-in job x2", "SIGKILL one rank", {"job ran": False}, msg[-300:])]
        resumed_from = torch.load(f"{killed_dir}/ckpt.pt", weights_only=False)["step"]
        full = read_log(full_dir)
        final_full = torch.load(f"{full_dir}/final.pt")
        rows.append(row("restart", "drop-in job x2 (torch.distributed, gloo)",
                        f"SIGKILL rank {victim} at step {kill_step} of {n_steps} (checkpoints every {every})",
                        {"victim died of SIGKILL": codes[victim] == -signal.SIGKILL,
                         "survivor stopped": codes[1 - victim] != 0,
                         "a whole checkpoint was left": resumed_from > 0},
                        f"rank {victim} exit {codes[victim]}, survivor exit {codes[1 - victim]}; last checkpoint "
                        f"at step {resumed_from}, loadable"))
        for world in (2, *other_sizes):
            d = f"{tmp}/resume{world}"
            os.makedirs(d)
            shutil.copy(f"{killed_dir}/ckpt.pt", d)
            rc = wait(launch(d, world, n_steps, every, resume=True), 600)
            got = read_log(d)
            tail = range(resumed_from, n_steps)
            complete = rc == [0] * world and all(t in got for t in tail)
            spikes = sum(full[t]["zclip"][1] for t in tail)
            if world == 2:
                final = torch.load(f"{d}/final.pt") if complete else {}
                checks = {"resumed job finished": complete,
                          "decisions equal, bit for bit": complete and all(got[t] == full[t] for t in tail),
                          "final weights equal": complete and all(
                              torch.equal(a, b) for k in final_full for a, b in zip(final_full[k], final[k]))}
                happened = (f"{len(tail)} steps after the resume: every ZClip coefficient and AdaGC per-tensor "
                            f"coefficient equal to the uninterrupted run's ({spikes} spikes), final weights equal")
            else:
                checks = {"resumed job finished": complete,
                          "same spike decisions": complete and all(got[t]["zclip"][1] == full[t]["zclip"][1] for t in tail),
                          "coefficients equal to rounding": complete and all(
                              close([got[t]["zclip"][0], *got[t]["adagc"]], [full[t]["zclip"][0], *full[t]["adagc"]])
                              for t in tail)}
                happened = (f"ZClip and AdaGC state (keyed by parameter name) loaded on DP{world}; {len(tail)} steps: "
                            f"same {spikes} spike decisions, coefficients within rel 1e-5 (the global batch is "
                            "split differently, so norms differ in the last bits)")
            if not complete:
                happened += " -- " + errors(d)[-300:]
            rows.append(row("restart", f"drop-in job DP2 -> DP{world}",
                            f"resume from the step-{resumed_from} checkpoint on {world} rank(s)", checks, happened))
    return rows


# ---- in-process checkpoint edge cases --------------------------------------------------------------
def _caught(fn) -> tuple[list[str], str | None]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
            err = None
        except ValueError as e:
            err = str(e)
    return [str(w.message) for w in caught], err


def edge_cases() -> list[Row]:
    from torch import nn

    from zclip_dist import AdaGC, ZClip
    from zclip_dist.clipper import STATE_VERSION
    from zclip_dist.lightning import ZClipLightningCallback

    model = nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    rows = []
    for cls in (ZClip, AdaGC):
        clip = cls(warmup_steps=3)
        for _ in range(5):
            clip.step(model)
        newer = {**clip.state_dict(), "version": STATE_VERSION + 1}
        warned, _ = _caught(lambda: clip.load_state_dict(None))
        count = 0 if clip.clipper.state is None else int(clip.clipper.state.count)
        rows.append(row("restart", f"drop-in {cls.__name__}", "load_state_dict(checkpoint.get(...)) of a checkpoint "
                        "written without it (None)", {"warned": bool(warned), "fresh warmup": count == 0},
                        f"UserWarning \"{warned[0] if warned else ''}\"; count back to 0"))
        _, err = _caught(lambda: cls(warmup_steps=3).load_state_dict(newer))
        rows.append(row("restart", f"drop-in {cls.__name__}", "load_state_dict of a state with a newer version",
                        {"refused": err is not None, "clear message": "newer than this" in (err or "")},
                        f"ValueError: \"{err}\""))
    callback = ZClipLightningCallback(warmup_steps=3)
    warned, _ = _caught(lambda: callback.on_load_checkpoint(None, None, {"callbacks": {}}))
    rows.append(row("restart", "Lightning callback", "resume from a Lightning checkpoint without the callback's entry",
                    {"warned": bool(warned)}, f"UserWarning \"{warned[0] if warned else ''}\""))
    return rows


def run() -> list[Row]:
    return edge_cases() + kill_and_resume()
