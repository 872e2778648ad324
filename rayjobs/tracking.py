"""Experiment tracking with MLflow: the run directory's results, browsable in ``mlflow ui``.

Embedded by default: a SQLite store in ``<output-dir>/mlruns/mlflow.db`` (artifacts under
``<output-dir>/mlruns/artifacts``), no server; ``tracking.uri`` names a server instead (a
cluster's), ``tracking.backend: none`` turns tracking off.

Layout: one MLflow experiment per run directory; in it one *parent* run (its id kept in
``manifest.json``, so a rerun in the same directory resumes it) holding the resolved config
as params and ``report.md``, ``figures/``, ``config.yaml`` and ``manifest.json`` as
artifacts; under it one child run per finished stage (``multiplication/eift``,
``sudoku/eval/grpo``, ...) tagged with the stage key, config hash and finish time:

* models (``<task>/base``, ``<task>/<method>``, ``<task>/grpo``): the curves of
  ``models/<m>/metrics.parquet`` (loss, decision metrics, probes; GRPO's reward and KL) at
  each logged step, the config sections that trained the model as params;
* ``<task>/eval/<model>``: every rate of ``<task>/eval/summary.parquet`` for that model as
  ``<condition>/T<temperature>/<rate>``;
* ``<task>/tune``: the sweep, with one nested run per trial from Ray Tune's own
  ``MLflowLoggerCallback`` (``tune_callbacks``).

The pipeline calls ``sync`` after each step: it logs the manifest's finished stages that have
no child run yet, so a stage skipped on a rerun is not logged twice and a redone stage (new
finish time) replaces its old child run. Every call goes through ``_safe``: a tracking
failure is one warning on the ``selfcorrect.tracking`` logger, never a failed stage. The
pipeline runs tasks in threads of one driver: all calls use ``MlflowClient`` with explicit
run ids (no fluent active run) under one lock.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import numbers
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np

from rayjobs.common import JobContext, read_manifest, update_manifest
from selfcorrect import io
from selfcorrect.config import Config

log = logging.getLogger("selfcorrect.tracking")

STORE_DIR = "mlruns"
MODEL_STAGES = ("base", "ft", "eift", "hybrid", "insec", "grpo")
RATES = ("accuracy", "recognition_rate", "correction_rate", "parrot_rate", "false_alarm_rate")
TAG_STAGE = "selfcorrect.stage"
TAG_HASH = "selfcorrect.config_hash"
TAG_FINISHED = "selfcorrect.finished"  # "" while the stage runs (the tune child)
TAG_PARENT = "mlflow.parentRunId"

_LOCK = threading.RLock()  # one tracker per run dir, shared by the pipeline's task threads
_TRACKERS: dict[tuple[str, str], Tracker] = {}
_NOTED: set[str] = set()
_BROKEN: set[str] = set()  # run dirs whose tracking failed in this process

T = TypeVar("T")


def _safe(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Tracking never fails a stage: an exception becomes one warning line, no traceback, and
    tracking of that run dir stops for this process (an unreachable server would otherwise
    cost its retries at every step); the next run there logs what was missed (``sync``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        where = args[0].output_dir if isinstance(args[0], JobContext) else str(args[1])
        if where in _BROKEN:
            return None
        try:
            with _LOCK:
                return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking is best effort by design
            _BROKEN.add(where)
            msg = " ".join(str(e).split())[:300]
            log.warning(
                "[tracking] %s failed (%s: %s); no more tracking in this run, the next run in "
                "%s logs what was missed",
                fn.__name__,
                type(e).__name__,
                msg,
                where,
            )
            return None

    return wrapper


def _note_once(msg: str) -> None:
    if msg not in _NOTED:
        _NOTED.add(msg)
        log.warning("[tracking] %s", msg)


def tracking_uri(cfg: Config, output_dir: str) -> str | None:
    """Where this run logs: ``tracking.uri``, else the run directory's SQLite store; None when
    tracking is off, or the output dir is an object store (no SQLite there) and no URI is set."""
    t = cfg.tracking
    if t.backend == "none":
        return None
    if t.uri:
        return t.uri
    if io.is_uri(output_dir):
        _note_once(
            f"tracking is off for an object-store output dir ({output_dir}) unless "
            "tracking.uri names an MLflow server; set tracking.backend=none to silence this"
        )
        return None
    return "sqlite:///" + os.path.join(os.path.abspath(output_dir), STORE_DIR, "mlflow.db")


def experiment_name(cfg: Config, output_dir: str) -> str:
    """``tracking.experiment``, else one experiment per run directory."""
    return cfg.tracking.experiment or f"{cfg.name}: {output_dir}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys -> MLflow param strings (lists and mappings as JSON)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v) and prefix == "":
            out.update(flatten(v, key + "."))
        else:
            s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
            out[key] = s[:6000]  # MLflow's param value limit
    return out


def _quiet_mlflow() -> None:
    # "Creating initial MLflow database tables..." and alembic's migrations are INFO lines.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _chunks(items: list[T], n: int) -> Iterator[list[T]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class Tracker:
    """The MLflow side of one run directory: its experiment, parent run and child runs."""

    def __init__(self, client: Any, uri: str, experiment_id: str, parent_id: str) -> None:
        self.client, self.uri = client, uri
        self.experiment_id, self.parent_id = experiment_id, parent_id
        self.children: dict[str, Any] = {}  # stage key -> Run (this parent's, not deleted)
        for run in client.search_runs(
            [experiment_id], filter_string=f"tags.{TAG_PARENT} = '{parent_id}'", max_results=5000
        ):
            key = run.data.tags.get(TAG_STAGE)
            if key:
                self.children[key] = run

    # -- children -----------------------------------------------------------------------

    def child(self, key: str, config_hash: str, finished: str) -> tuple[str, bool]:
        """The child run of a stage: (run id, True) when it must be (re)logged."""
        old = self.children.get(key)
        if old is not None:
            tags = old.data.tags
            if tags.get(TAG_FINISHED) == finished:
                return old.info.run_id, False
            pending = tags.get(TAG_FINISHED) == "" and tags.get(TAG_HASH) == config_hash
            if pending and key.endswith("/tune"):
                return old.info.run_id, True  # opened while running, trials under it: finish it
            self.delete_tree(old.info.run_id)
        tags = {
            TAG_PARENT: self.parent_id,
            TAG_STAGE: key,
            TAG_HASH: config_hash,
            TAG_FINISHED: "",  # until finish_child: a half-logged run is redone next time
        }
        run = self.client.create_run(self.experiment_id, run_name=key, tags=tags)
        self.children[key] = run
        return run.info.run_id, True

    def delete_tree(self, run_id: str) -> None:
        """Delete a run and the runs nested under it (an old tune child's trials)."""
        for run in self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.{TAG_PARENT} = '{run_id}'"
        ):
            self.delete_tree(run.info.run_id)
        self.client.delete_run(run_id)

    def finish_child(self, key: str, run_id: str, finished: str) -> None:
        self.client.set_tag(run_id, TAG_FINISHED, finished)
        self.client.set_terminated(run_id)
        self.children[key] = self.client.get_run(run_id)

    # -- logging ------------------------------------------------------------------------

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        """Log the params the run does not have yet (params are immutable in MLflow)."""
        from mlflow.entities import Param

        have = self.client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in have]
        for chunk in _chunks(new, 100):
            self.client.log_batch(run_id, params=chunk)

    def log_metrics(self, run_id: str, rows: list[tuple[str, float, int]]) -> None:
        """(name, value, step) rows; NaN and non-numbers are left out."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [
            Metric(k, float(v), now, int(s))
            for k, v, s in rows
            if isinstance(v, numbers.Real)
            and not isinstance(v, (bool, np.bool_))
            and math.isfinite(v)
        ]
        for chunk in _chunks(ms, 1000):
            self.client.log_batch(run_id, metrics=chunk)

    def log_artifact(self, run_id: str, path: str, under: str | None = None) -> None:
        if os.path.isdir(path):
            self.client.log_artifacts(run_id, path, under)
        elif os.path.exists(path):
            self.client.log_artifact(run_id, path, under)


def open_tracker(ctx: JobContext) -> Tracker | None:
    """The run directory's tracker: resumes the parent run named in manifest.json, or makes
    the experiment and parent run (resolved config as params). None when tracking is off."""
    uri = tracking_uri(ctx.cfg, ctx.output_dir)
    if uri is None:
        return None
    with _LOCK:
        cached = _TRACKERS.get((ctx.output_dir, uri))
        if cached is not None:
            return cached
        import mlflow

        _quiet_mlflow()
        embedded = not ctx.cfg.tracking.uri
        if embedded:
            os.makedirs(ctx.path(STORE_DIR), exist_ok=True)
        client = mlflow.MlflowClient(tracking_uri=uri)
        rec = read_manifest(ctx).get("tracking") or {}
        parent = None
        if rec.get("uri") == uri and rec.get("parent_run_id"):
            try:
                run = client.get_run(rec["parent_run_id"])
                if run.info.lifecycle_stage == "active":
                    parent = run
                    client.update_run(run.info.run_id, status="RUNNING")
            except mlflow.exceptions.MlflowException:
                parent = None
        if parent is None:
            name = experiment_name(ctx.cfg, ctx.output_dir)
            exp = client.get_experiment_by_name(name)
            if exp is not None:
                eid = exp.experiment_id
            else:
                where = None
                if embedded:
                    where = "file://" + os.path.abspath(ctx.path(STORE_DIR, "artifacts"))
                # The UI opens a "model training" experiment on its runs table, not the
                # GenAI traces overview that MLflow 3 shows for untagged experiments.
                eid = client.create_experiment(
                    name,
                    artifact_location=where,
                    tags={"mlflow.experimentKind": "custom_model_development"},
                )
            parent = client.create_run(
                eid, run_name=ctx.cfg.name, tags={"selfcorrect.output_dir": ctx.output_dir}
            )

            def record(m: dict[str, Any]) -> None:
                m["tracking"] = {
                    "uri": uri,
                    "experiment_id": eid,
                    "parent_run_id": parent.info.run_id,
                }

            update_manifest(ctx, record)
        tracker = Tracker(client, uri, parent.info.experiment_id, parent.info.run_id)
        _TRACKERS[(ctx.output_dir, uri)] = tracker
        return tracker


@_safe
def start(ctx: JobContext) -> None:
    """Open (or resume) the parent run and log the resolved config as its params."""
    tr = open_tracker(ctx)
    if tr is not None:
        tr.log_params(tr.parent_id, flatten(ctx.cfg.to_dict()))


@_safe
def sync(ctx: JobContext, tasks: list[str] | None = None) -> None:
    """Log every finished stage of the manifest (of ``tasks``; None = all) not logged yet."""
    tr = open_tracker(ctx)
    if tr is None:
        return
    for key, rec in read_manifest(ctx).get("stages", {}).items():
        if rec.get("status") != "done":
            continue
        if tasks is not None and "/" in key and key.split("/")[0] not in tasks:
            continue
        _log_stage(tr, ctx, key, rec)


@_safe
def finish(ctx: JobContext) -> None:
    """Close the pipeline: every stage logged, manifest.json and config.yaml as artifacts."""
    tr = open_tracker(ctx)
    if tr is None:
        return
    sync.__wrapped__(ctx)
    for name in ("manifest.json", "config.yaml"):
        tr.log_artifact(tr.parent_id, ctx.path(name))
    tr.client.set_terminated(tr.parent_id)


def _log_stage(tr: Tracker, ctx: JobContext, key: str, rec: dict[str, Any]) -> None:
    finished = str(rec.get("finished", ""))
    if key == "report":
        parent = tr.client.get_run(tr.parent_id)
        if parent.data.tags.get("selfcorrect.report_finished") == finished:
            return
        for name in ("report.md", "figures", "manifest.json", "config.yaml"):
            tr.log_artifact(tr.parent_id, ctx.path(name), "figures" if name == "figures" else None)
        tr.client.set_tag(tr.parent_id, "selfcorrect.report_finished", finished)
        return
    run_id, new = tr.child(key, str(rec.get("config_hash", "")), finished)
    if not new:
        return
    try:
        _log_stage_content(tr, ctx, key, rec, run_id)
    except Exception as e:  # noqa: BLE001 - a bad output file: keep the child, say what is missing
        from mlflow.exceptions import MlflowException

        if isinstance(e, (MlflowException, OSError)):  # the store or server: redo next time
            raise
        _note_once(f"{key}: logged without some of its contents ({type(e).__name__}: {e})")
    tr.finish_child(key, run_id, finished)


def _log_stage_content(
    tr: Tracker, ctx: JobContext, key: str, rec: dict[str, Any], run_id: str
) -> None:
    parts = key.split("/")
    task = parts[0]
    rows: list[tuple[str, float, int]] = [("stage_seconds", rec.get("seconds", 0.0), 0)]
    cfg = ctx.cfg.to_dict()
    if len(parts) == 2 and parts[1] in MODEL_STAGES:
        model = parts[1]
        sections = ("model", "grpo") if model == "grpo" else ("model", "train")
        params = {"task": task, "model": model}
        params.update(flatten({s: cfg[s] for s in sections}))
        if model == "base":  # the base stage trains with its own steps and lr
            t = ctx.cfg.train
            params["train.max_steps"] = str(t.base_steps_by_task.get(task, t.base_steps))
            params["train.lr"] = str(t.base_lr or t.lr)
        elif model != "grpo":  # the methods train the task's own budget
            params["train.max_steps"] = str(ctx.cfg.train.method_steps(task))
        tr.log_params(run_id, params)
        rows += _curves(ctx.path(task, "models", model, "metrics.parquet"))
    elif len(parts) == 3 and parts[1] == "eval":
        tr.log_params(run_id, {"task": task, "model": parts[2]})
        rows += _eval_rates(ctx.path(task, "eval", "summary.parquet"), parts[2])
    elif len(parts) == 2 and parts[1] == "tune":
        tr.log_params(run_id, {"task": task, **flatten({"tune": cfg["tune"]})})
    rows += [(f"final_{k}", v, 0) for k, v in (rec.get("final") or {}).items()]
    tr.log_metrics(run_id, rows)


def _curves(path: str) -> list[tuple[str, float, int]]:
    """Every numeric column of a metrics.parquet at its ``step``."""
    if not io.exists(path):
        return []
    df = io.read_parquet(path).to_pandas()
    if "step" not in df.columns:
        return []
    out = []
    for col in df.columns:
        if col == "step" or not _numeric(df[col]):
            continue
        out += [(col, v, s) for s, v in zip(df["step"], df[col], strict=True)]
    return out


def _numeric(series: Any) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _eval_rates(path: str, model: str) -> list[tuple[str, float, int]]:
    """``<condition>/T<temperature>/<rate>`` (and ``/n``) for one model's summary rows."""
    if not io.exists(path):
        return []
    df = io.read_parquet(path).to_pandas()
    out = []
    for _, r in df[df["model"] == model].iterrows():
        head = f"{r['condition']}/T{float(r['temperature']):g}"
        out += [(f"{head}/{rate}", r[rate], 0) for rate in RATES + ("n",) if rate in r]
    return out


# ---------------------------------------------------------------------------
# Ray Tune
# ---------------------------------------------------------------------------


@_safe
def tune_callbacks(cfg: Config, output_dir: str, task: str, config_hash: str) -> list[Any]:
    """Ray Tune's ``MLflowLoggerCallback`` logging each trial as a run nested under the
    ``<task>/tune`` child (opened here, finished by ``sync``); [] when tracking is off."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    tr = open_tracker(JobContext(cfg, output_dir))
    if tr is None:
        return []
    run_id, _ = tr.child(f"{task}/tune", config_hash, "")
    name = tr.client.get_experiment(tr.experiment_id).name
    return [
        MLflowLoggerCallback(
            tracking_uri=tr.uri,
            experiment_name=name,
            tags={TAG_PARENT: run_id, TAG_STAGE + "_trial_of": f"{task}/tune"},
        )
    ]
