"""Integration: a real Ray Tune sweep on the smoke preset (nano model, 10 steps per trial).

* a 2-trial sweep writes tune/results.parquet (one row per trial), the plots and
  each trial's model / eval rows, with both trials running at once on 2 CPUs, each
  training in its own process (``tune.trainer`` auto);
* a sweep whose driver is killed after the first trial finished resumes
  (Tuner.restore of the same experiment) without redoing that trial; its trials are
  Ray Train runs (``tune.trainer=ray_train``) and give the same models.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from rayjobs import data as data_job
from rayjobs import tune as tune_job
from rayjobs.common import JobContext
from selfcorrect.config import load_config
from selfcorrect.tune import PLOT_METRICS, plot_name, trial_params

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "tasks=[multiplication]",
    "tune.injection_rates=[0.1,0.5]",
    "tune.max_steps=10",
    "tune.eval_problems=8",
    "tune.val_examples=16",
    "eval.max_new_tokens=64",
]


def smoke(*extra: str):
    return load_config(REPO / "configs" / "smoke.yaml", OVERRIDES + list(extra))


def with_data(tmp_path: Path, *extra: str) -> JobContext:
    ctx = JobContext(smoke(*extra), str(tmp_path / "run"))
    data_job.run(ctx)
    return ctx


@pytest.fixture(scope="module")
def in_trial_sweep(ray_session, tmp_path_factory) -> tuple[Path, list[str]]:
    """The 2-trial sweep with the default trainer (one CPU worker: in the trial)."""
    tmp = tmp_path_factory.mktemp("sweep")
    return tmp, tune_job.run(with_data(tmp))


def _trial_weights(output_dir: Path, name: str) -> dict:
    from safetensors.torch import load_file

    path = output_dir / "multiplication" / "tune" / "trials" / name / "model" / "model.safetensors"
    return load_file(str(path))


def test_two_trial_sweep_writes_results(in_trial_sweep):
    tmp_path, written = in_trial_sweep
    ctx = JobContext(smoke(), str(tmp_path / "run"))
    out = tmp_path / "run" / "multiplication" / "tune"
    assert written == [str(out / "results.parquet")]
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 2
    assert sorted(df["injection_rate"]) == [0.1, 0.5]
    assert (df["status"] == "done").all(), df[["status", "error"]]
    assert df["trial_id"].nunique() == 2 and (df["max_steps"] == 10).all()
    for _, r in df.iterrows():
        assert 0 < r["val_loss"] < 10 and 0 < r["val_loss_clean"] < 10
        assert r["synthetic_n"] == 8  # one synthetic item per eval problem
        for c in ("synthetic", "own_errors"):
            for rate in ("accuracy", "recognition_rate", "correction_rate"):
                v = r[f"{c}_{rate}"]
                assert (math.isnan(v) and r[f"{c}_n"] == 0) or 0 <= v <= 1
        tdir = out / "trials" / r["trial"]
        assert (tdir / "model" / "config.json").exists()
        # One CPU worker: the trial trained in its own process (tune.trainer auto), and kept
        # its one newest checkpoint where a restart looks for it.
        assert [p.name for p in (out / "ray" / "train").glob(f"{r['trial']}-*/*")] == [
            "checkpoint_000001"
        ]
        ev = pd.read_parquet(tdir / "eval.parquet")
        assert set(ev["condition"]) >= {"synthetic", "clean"}
        assert (ev["temperature"] == 0.0).all()
    # The two rates train on different mixtures, so their validation losses differ.
    assert df["val_loss"].iloc[0] != df["val_loss"].iloc[1]
    for metric in ("val_loss", "synthetic_accuracy"):
        assert (out / plot_name(metric)).stat().st_size > 1000
    assert all(m in PLOT_METRICS for m in ("val_loss", "own_errors_correction_rate"))
    # Both trials ran at once: 1 CPU per trial's worker, 2 CPUs in the cluster.
    a, b = df["started_at"].tolist(), df["finished_at"].tolist()
    assert max(a) < min(b), "the two trials never overlapped"
    # A second run of the stage is skipped by the manifest.
    mtime = (out / "results.parquet").stat().st_mtime_ns
    tune_job.run(ctx)
    assert (out / "results.parquet").stat().st_mtime_ns == mtime


def _wait_for(pred, timeout: float, proc: subprocess.Popen) -> None:
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"sweep driver exited early with {proc.returncode}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out waiting for the first trial")
        time.sleep(0.5)


def test_interrupted_sweep_resumes_without_redoing_finished_trials(
    ray_session, in_trial_sweep, tmp_path, capsys
):
    # One trial at a time: the kill lands mid-second-trial. Each trial a Ray Train run (the
    # multi-worker and GPU path; the smoke preset's one CPU worker trains in the trial).
    extra = ["tune.max_concurrent=1", "tune.trainer=ray_train"]
    ctx = with_data(tmp_path, *extra)
    cfg = ctx.cfg
    first, second = (trial_params(cfg, {"injection_rate": r}) for r in (0.1, 0.5))
    tdir = Path(ctx.output_dir) / "multiplication" / "tune" / "trials"
    env = dict(
        os.environ,
        RAY_ADDRESS=ray_session.get_runtime_context().gcs_address,
        PYTHONPATH=str(REPO),
    )
    cmd = [sys.executable, "-m", "rayjobs.tune", "--config", "configs/smoke.yaml",
           "--output-dir", ctx.output_dir, *OVERRIDES, *extra]  # fmt: skip
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # Grid order is deterministic: 0.1 first; kill as soon as its result is written.
        done = tdir / first.name / "result.json"
        _wait_for(done.exists, 400, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert not (tdir / second.name / "result.json").exists()
    stamp = done.stat().st_mtime_ns
    model_stamp = (tdir / first.name / "model" / "model.safetensors").stat().st_mtime_ns
    storage = Path(tune_job.experiment_storage(ctx.output_dir, "multiplication"))
    exp = storage / tune_job.experiment_name(cfg, "multiplication")
    from ray import tune

    assert tune.Tuner.can_restore(str(exp)), "no restorable experiment state was left"
    ids_before = {p.name.removeprefix("trial-") for p in exp.glob("trial-*")}
    assert ids_before

    capsys.readouterr()
    tune_job.run(ctx)  # the restart, in this process
    assert "resuming the interrupted sweep" in capsys.readouterr().out

    df = pd.read_parquet(Path(ctx.output_dir) / "multiplication" / "tune" / "results.parquet")
    assert sorted(df["injection_rate"]) == [0.1, 0.5]
    assert (df["status"] == "done").all(), df[["status", "error"]]
    # Restored, not started anew: trials that existed before keep their Tune trial ids.
    assert ids_before <= set(df["trial_id"])
    # The finished trial was not trained or evaluated again.
    assert done.stat().st_mtime_ns == stamp
    assert (tdir / first.name / "model" / "model.safetensors").stat().st_mtime_ns == model_stamp
    assert (tdir / second.name / "result.json").exists()
    # A Ray Train run per trial gives the models the trial's own process gave.
    import torch

    for name in (first.name, second.name):
        a = _trial_weights(Path(ctx.output_dir), name)
        b = _trial_weights(in_trial_sweep[0] / "run", name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
