"""End to end: Megatron-LM's stock ``pretrain_gpt.py`` through ``python -m zclip_dist.megatron.launch`` on
2 gloo ranks on CPU, for both fixture tags: core_v0.16.1 on megatron-core 0.16.1 (this environment) and
core_v0.19.0 on 0.19.2 (the environment of launch/setup_megatron019.sh).

Per tag, a tiny GPT on mock data with ``--zclip``, ``--zclip-log-jsonl`` and ``--tensorboard-dir``, every
gradient multiplied by 30 at iteration 30 (tests/megatron_stock_run.py, the test-only entry that applies
the CPU shim and hands over to the launcher unchanged), in two jobs:

* ``tp2``: tensor parallel 2, fp32, 40 iterations in one launch;
* ``dp2_distopt``: data parallel 2 with the distributed optimizer, bf16, 40 iterations in two launches:
  ``--save`` and ``--exit-interval 20``, then ``--load``.

Checked against oracles: Megatron's norm, the one ZClip decides on, equals the norm of the full gradient
the entry computes from every rank's gradients; the gradient the update used has the norm the reference
``zclip==1.0.0`` clips the true norms to (the spike included); the statistics equal the reference's fed
the same norms at every iteration, across the resume; TensorBoard holds the same ``zclip/*`` values.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from tests.megatron_versions import REPO, TAGS, checkout, python_for, require, subprocess_env

ITERS, RESUME_AT, SPIKE_AT, SPIKE = 40, 20, 30, 30.0
WARMUP, CLIP_GRAD = 10, 5.0
MODEL = ("--num-layers 2 --hidden-size 32 --num-attention-heads 2 --seq-length 16 --max-position-embeddings 16 "
         "--micro-batch-size 2 --global-batch-size 4 --lr 1e-3 --lr-decay-style constant --mock-data "
         "--tokenizer-type NullTokenizer --vocab-size 63 --make-vocab-size-divisible-by 1 --seed 1234 "
         "--distributed-backend gloo --transformer-impl local --no-gradient-accumulation-fusion "
         "--no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion --no-persist-layer-norm "
         "--use-cpu-initialization --attention-dropout 0 --hidden-dropout 0 --num-workers 0 "
         "--log-interval 1 --eval-iters 0 --eval-interval 1000 --tensorboard-log-interval 1").split()
JOBS = {"tp2": ["--tensor-model-parallel-size", "2"],
        "dp2_distopt": ["--use-distributed-optimizer", "--bf16"]}
#: What megatron.training and this run import beyond megatron-core (module: pip name).
NEEDS = {"six": "six", "regex": "regex", "yaml": "pyyaml", "pydantic": "pydantic", "psutil": "psutil",
         "tensorboard": "tensorboard"}
METRICS = ("grad_norm", "threshold", "coef", "clipped", "mean", "std")


def _launch(python: str, tag_dir: Path, out: Path, extra: list[str]) -> None:
    args = [*MODEL, "--clip-grad", str(CLIP_GRAD), "--train-iters", str(ITERS), *extra,
            "--tensorboard-dir", str(out / "tb"), "--zclip", "--zclip-warmup-steps", str(WARMUP),
            "--zclip-log-jsonl", str(out / "zclip.jsonl")]
    env = subprocess_env(REPO)
    env.update(CUDA_DEVICE_MAX_CONNECTIONS="1", TORCHDYNAMO_DISABLE="1", PYTHONWARNINGS="ignore",
               ZCLIP_TEST_SPIKE=f"{SPIKE_AT}:{SPIKE}", ZCLIP_TEST_TRACE=str(out / "trace.jsonl"))
    cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tests.megatron_stock_run", str(tag_dir / "pretrain_gpt.py"), *args]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:8])} ... failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")


def _lines(path: Path, key: str) -> dict[int, dict]:
    """JSON lines that carry ``key``, by that key (a header or other record type is left out)."""
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if key in record:
            out[int(record[key])] = record
    return out


def _tensorboard(tb: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    for events in sorted(tb.glob("events.out.tfevents.*")):  # one file per launch
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return scalars


@pytest.fixture(scope="module", params=[(t, j) for t in TAGS for j in JOBS], ids=lambda p: f"{p[0]}-{p[1]}")
def run(request, tmp_path_factory):
    tag, job = request.param
    tag_dir = checkout(tag)
    python = python_for(TAGS[tag])
    require(python, NEEDS)
    out = tmp_path_factory.mktemp(f"{tag}-{job}")
    if job == "dp2_distopt":
        ckpt = str(out / "ckpt")
        _launch(python, tag_dir, out, JOBS[job] + ["--save", ckpt, "--save-interval", str(RESUME_AT),
                                                   "--exit-interval", str(RESUME_AT)])
        assert (out / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == str(RESUME_AT)
        _launch(python, tag_dir, out, JOBS[job] + ["--load", ckpt])
    else:
        _launch(python, tag_dir, out, JOBS[job])
    return dict(job=job, jsonl=_lines(out / "zclip.jsonl", "step"), trace=_lines(out / "trace.jsonl", "iteration"),
                tb=_tensorboard(out / "tb"))


def _reference(norms: list[float]) -> list[tuple[float, float | None, float | None]]:
    """zclip 1.0.0 (the same settings as the flags) fed each norm: (norm it clips to, mean, var) after it."""
    from tests.oracle import ReferenceOracle
    from zclip_dist.config import ZClipConfig

    ref = ReferenceOracle(ZClipConfig(warmup_steps=WARMUP, max_grad_norm=CLIP_GRAD))
    out = []
    for norm in norms:
        coef = ref.step(norm)
        stats = ref.stats
        out.append((norm * coef, *(stats if stats is not None else (None, None))))
    return out


def test_every_iteration_reaches_jsonl_and_tensorboard(run):
    iterations = list(range(1, ITERS + 1))
    assert sorted(run["jsonl"]) == iterations  # ZClip's own step count: one decision per iteration
    assert sorted(run["trace"]) == iterations
    for name in METRICS:
        logged = run["tb"][f"zclip/{name}"]
        assert sorted(logged) == iterations, name
        for i in iterations:  # TensorBoard stores float32
            assert logged[i] == pytest.approx(float(run["jsonl"][i][name]), rel=1e-6, abs=1e-30), (name, i)


def test_zclip_decides_on_the_true_norm(run):
    for i, record in run["jsonl"].items():
        assert record["grad_norm"] == pytest.approx(run["trace"][i]["true_norm"], rel=1e-5), i


def test_updates_use_the_reference_clip_of_the_true_norm(run):
    true = [run["trace"][i]["true_norm"] for i in range(1, ITERS + 1)]
    ref = _reference(true)
    for i, (clip_to, _, _) in enumerate(ref, start=1):
        assert run["trace"][i]["post_clip_norm"] == pytest.approx(clip_to, rel=1e-5), i
    spike = run["jsonl"][SPIKE_AT]
    assert spike["spike"] and spike["clipped"]
    assert true[SPIKE_AT - 1] > 10 * true[SPIKE_AT - 2]  # the injected spike is in the true norm
    assert run["trace"][SPIKE_AT]["post_clip_norm"] < 2 * true[SPIKE_AT - 2]  # and clipped to the usual level
    assert sum(r["clipped"] for r in run["jsonl"].values()) < ITERS // 2  # ordinary steps mostly pass


def test_statistics_follow_the_reference_across_the_resume(run):
    """The statistics each decision used are the reference's after the previous iteration, fed the same
    norms; for dp2_distopt the second launch starts from the checkpoint's (iteration 21 on)."""
    norms = [run["jsonl"][i]["grad_norm"] for i in range(1, ITERS + 1)]
    ref = _reference(norms)
    for i in range(WARMUP + 1, ITERS + 1):
        _, mean, var = ref[i - 2]
        assert mean is not None, i
        assert run["jsonl"][i]["mean"] == pytest.approx(mean, rel=1e-9), i
        assert run["jsonl"][i]["std"] == pytest.approx(math.sqrt(var), rel=1e-9), i


def test_spike_forensics_name_model_parameters(run):
    """Forensics is on by default: the spike's line carries its event, naming the model's parameters (as
    ``named_parameters`` gives them, without ``module.``) by share, and TensorBoard has the same shares at
    that iteration; a line carries an event exactly when its step was clipped (or a spike)."""
    for i, record in run["jsonl"].items():
        assert ("events" in record) == bool(record["clipped"] or record["spike"]), i
    (event,) = run["jsonl"][SPIKE_AT]["events"]
    assert event["step"] == SPIKE_AT and set(event["kinds"]) >= {"clipped", "spike"}
    shares = [p["share"] for p in event["params"]]
    assert len(shares) == 3 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    for p in event["params"]:
        assert p["name"].split(".")[0] in ("embedding", "decoder", "output_layer"), p["name"]
        logged = run["tb"][f"zclip/event/param/{p['name']}"]
        assert logged[SPIKE_AT] == pytest.approx(p["share"], rel=1e-6)
