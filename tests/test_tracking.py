"""rayjobs.tracking on a hand-made run directory: the layout in MLflow, no double logging on a
rerun, a redone stage replacing its run, tracking off, and failures that never fail a stage."""

from __future__ import annotations

import json
import logging
import os

import pandas as pd
import pytest

from rayjobs import tracking
from rayjobs.common import JobContext, update_manifest
from selfcorrect.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "configs", "smoke.yaml")


def _fake_run(out: str) -> None:
    """A run dir as the pipeline leaves it: one trained model, its eval, a report."""
    m = os.path.join(out, "multiplication")
    os.makedirs(os.path.join(m, "models", "eift"))
    os.makedirs(os.path.join(m, "eval"))
    os.makedirs(os.path.join(out, "figures"))
    pd.DataFrame(
        {
            "step": [5, 10],
            "loss": [2.0, 1.5],
            "decision_loss": [0.9, None],
            "bf16": [False] * 2,
            "tokens": [100, 200],
        }
    ).to_parquet(os.path.join(m, "models", "eift", "metrics.parquet"))
    rows = [
        {
            "task": "multiplication",
            "model": "eift",
            "condition": c,
            "temperature": t,
            "n": 20,
            "accuracy": 0.5,
            "recognition_rate": 0.25,
            "correction_rate": 0.1,
            "parrot_rate": float("nan"),
            "false_alarm_rate": 0.0,
        }
        for c in ("clean", "synthetic")
        for t in (0.0, 1.0)
    ]
    pd.DataFrame(rows).to_parquet(os.path.join(m, "eval", "summary.parquet"))
    open(os.path.join(out, "report.md"), "w").write("# report\n")
    open(os.path.join(out, "figures", "figure6.png"), "wb").write(b"png")
    open(os.path.join(out, "config.yaml"), "w").write("name: smoke\n")
    stages = {
        "multiplication/eift": {
            "status": "done",
            "config_hash": "h1",
            "finished": 1.0,
            "seconds": 3.0,
            "final": {"loss": 1.5},
        },
        "multiplication/eval/eift": {"status": "done", "config_hash": "h2", "finished": 2.0},
        "multiplication/grpo": {"status": "running", "config_hash": "h3"},
        "report": {"status": "done", "config_hash": "h4", "finished": 3.0},
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({"stages": stages}, f)


def _client(out: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(load_config(SMOKE), out))


def _mark_done(ctx, key: str, config_hash: str, finished: float) -> None:
    """Record a finished stage in the manifest, as a stage job would."""

    def done(m: dict) -> None:
        m["stages"][key] = {
            "status": "done",
            "config_hash": config_hash,
            "finished": finished,
            "seconds": 1.0,
        }

    update_manifest(ctx, done)


def _children(client, out: str) -> dict[str, object]:
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    parent = manifest["tracking"]["parent_run_id"]
    exp = manifest["tracking"]["experiment_id"]
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    return {r.data.tags[tracking.TAG_STAGE]: r for r in runs}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tracked") / "run")
    _fake_run(out)
    ctx = JobContext(load_config(SMOKE), out)
    tracking.start(ctx)
    tracking.sync(ctx)
    tracking.finish(ctx)
    return ctx, _client(out)


def test_the_store_is_in_the_run_dir_with_its_artifacts(tracked):
    ctx, client = tracked
    assert os.path.exists(os.path.join(ctx.output_dir, "mlruns", "mlflow.db"))
    manifest = json.load(open(ctx.path("manifest.json")))
    parent = client.get_run(manifest["tracking"]["parent_run_id"])
    assert parent.info.artifact_uri.startswith("file://" + ctx.path("mlruns", "artifacts"))
    assert parent.data.params["train.lr"] == "0.001"
    assert parent.data.params["tasks"] == '["multiplication", "sudoku"]'
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "manifest.json", "config.yaml", "figures"} <= arts
    assert parent.info.status == "FINISHED"


def test_one_child_per_finished_stage_with_curves_and_rates(tracked):
    ctx, client = tracked
    children = _children(client, ctx.output_dir)
    assert set(children) == {"multiplication/eift", "multiplication/eval/eift"}
    train = children["multiplication/eift"]
    hist = client.get_metric_history(train.info.run_id, "loss")
    assert [(m.step, m.value) for m in hist] == [(5, 2.0), (10, 1.5)]
    assert [m.step for m in client.get_metric_history(train.info.run_id, "decision_loss")] == [5]
    assert "bf16" not in train.data.metrics
    assert train.data.metrics["tokens"] == 200  # int64 columns too
    assert train.data.metrics["final_loss"] == 1.5
    assert train.data.params["model"] == "eift" and train.data.params["train.lr"] == "0.001"
    assert train.data.tags[tracking.TAG_HASH] == "h1"
    ev = children["multiplication/eval/eift"].data.metrics
    assert ev["synthetic/T0/recognition_rate"] == 0.25
    assert ev["clean/T1/accuracy"] == 0.5 and ev["clean/T1/n"] == 20
    assert "synthetic/T0/parrot_rate" not in ev  # NaN: left out


def test_a_rerun_logs_nothing_twice_and_a_redone_stage_replaces_its_run(tracked):
    ctx, client = tracked
    before = _children(client, ctx.output_dir)
    tracking.start(ctx)
    tracking.sync(ctx)
    same = _children(client, ctx.output_dir)
    assert {k: r.info.run_id for k, r in same.items()} == {
        k: r.info.run_id for k, r in before.items()
    }

    def redo(m: dict) -> None:
        m["stages"]["multiplication/eift"].update(finished=9.0, config_hash="h9")

    update_manifest(ctx, redo)
    tracking.sync(ctx)
    after = _children(client, ctx.output_dir)
    old = before["multiplication/eift"].info.run_id
    assert after["multiplication/eift"].info.run_id != old
    assert after["multiplication/eift"].data.tags[tracking.TAG_HASH] == "h9"
    assert client.get_run(old).info.lifecycle_stage == "deleted"
    assert after["multiplication/eval/eift"].info.run_id == (
        before["multiplication/eval/eift"].info.run_id
    )


def test_tune_trials_nest_under_the_tune_run(tracked):
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    ctx, client = tracked
    (cb,) = tracking.tune_callbacks(ctx.cfg, ctx.output_dir, "multiplication", "th")
    assert isinstance(cb, MLflowLoggerCallback)
    tune_run = _children(client, ctx.output_dir)["multiplication/tune"]
    assert cb.tags["mlflow.parentRunId"] == tune_run.info.run_id
    assert tune_run.data.tags[tracking.TAG_FINISHED] == ""

    _mark_done(ctx, "multiplication/tune", "th", 5.0)
    tracking.sync(ctx)
    finished = _children(client, ctx.output_dir)["multiplication/tune"]
    assert finished.info.run_id == tune_run.info.run_id  # the trials' parent is kept
    assert finished.data.tags[tracking.TAG_FINISHED] == "5.0"


def test_a_half_logged_stage_is_redone_by_the_next_run(tracked, monkeypatch):
    from mlflow.exceptions import MlflowException

    ctx, client = tracked

    _mark_done(ctx, "multiplication/insec", "hi", 7.0)

    def down(*a, **k):
        raise MlflowException("server went away")

    with monkeypatch.context() as mp:
        mp.setattr(tracking.Tracker, "log_metrics", down)
        assert tracking.sync(ctx) is None  # one warning; no more tracking in this run
    half = _children(client, ctx.output_dir)["multiplication/insec"]
    assert half.data.tags[tracking.TAG_FINISHED] == ""
    tracking._BROKEN.discard(ctx.output_dir)  # as in the next run's fresh process
    tracking.sync(ctx)
    redone = _children(client, ctx.output_dir)["multiplication/insec"]
    assert redone.info.run_id != half.info.run_id
    assert redone.data.tags[tracking.TAG_FINISHED] == "7.0"
    assert redone.data.metrics["stage_seconds"] == 1.0


def test_backend_none_writes_no_store(tmp_path):
    out = str(tmp_path / "run")
    _fake_run(out)
    ctx = JobContext(load_config(SMOKE, ["tracking.backend=none"]), out)
    tracking.start(ctx)
    tracking.sync(ctx)
    tracking.finish(ctx)
    assert tracking.tune_callbacks(ctx.cfg, out, "multiplication", "h") == []
    assert not os.path.exists(os.path.join(out, "mlruns"))
    assert "tracking" not in json.load(open(os.path.join(out, "manifest.json")))


def test_tracking_uri():
    cfg = load_config(SMOKE)
    assert tracking.tracking_uri(cfg, "/r/run") == "sqlite:////r/run/mlruns/mlflow.db"
    server = load_config(SMOKE, ["tracking.uri=http://mlflow:5000"])
    assert tracking.tracking_uri(server, "s3://b/run") == "http://mlflow:5000"
    assert tracking.tracking_uri(server, "/r/run") == "http://mlflow:5000"
    assert tracking.experiment_name(cfg, "/r/run") == "smoke: /r/run"


def test_object_store_without_uri_is_off_with_one_note(caplog):
    cfg = load_config(SMOKE)
    with caplog.at_level(logging.WARNING, logger="selfcorrect.tracking"):
        assert tracking.tracking_uri(cfg, "s3://b/other") is None
        assert tracking.tracking_uri(cfg, "s3://b/other") is None
    assert len([r for r in caplog.records if "object-store" in r.getMessage()]) == 1


def test_a_failing_tracking_call_is_one_warning(tmp_path, monkeypatch, caplog):
    def boom(ctx):
        raise RuntimeError("store unreachable")

    monkeypatch.setattr(tracking, "open_tracker", boom)
    ctx = JobContext(load_config(SMOKE), str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="selfcorrect.tracking"):
        assert tracking.sync(ctx) is None
        assert tracking.start(ctx) is None
        assert tracking.tune_callbacks(ctx.cfg, str(tmp_path), "sudoku", "h") is None
    (msg,) = [r.getMessage() for r in caplog.records]  # then no more tracking in this run
    assert "store unreachable" in msg and caplog.records[0].exc_info is None


def test_a_pipeline_step_survives_failing_tracking(tmp_path, monkeypatch):
    from rayjobs import pipeline

    def boom(ctx):
        raise RuntimeError("store unreachable")

    monkeypatch.setattr(tracking, "open_tracker", boom)
    out = str(tmp_path / "run")
    cfg = load_config(SMOKE, ["data.n_train=20", "data.n_test=5"])
    pipeline.run(JobContext(cfg, out), [s for s in pipeline.STEPS if s.name == "data"])
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["stages"]["sudoku/data"]["status"] == "done"


def test_the_config_section_validates():
    from selfcorrect.config import ConfigError, describe

    with pytest.raises(ConfigError, match="tracking.backend"):
        load_config(SMOKE, ["tracking.backend=wandb"])
    keys = {line.split(":")[0] for line in describe()}
    assert {"tracking.backend", "tracking.uri", "tracking.experiment"} <= keys
