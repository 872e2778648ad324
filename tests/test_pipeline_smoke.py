"""The smoke pipeline end to end (every stage, both tasks) in the session's local Ray, then:
the DESIGN 7 layout, a rerun that skips everything, a config change that redoes only what
depends on it, and the analysis notebook executed against the real run directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from pipeline_checks import check_layout, check_mlflow, check_notebook, check_report

from rayjobs import pipeline
from rayjobs.common import JobContext
from selfcorrect import io
from selfcorrect.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "configs", "smoke.yaml")

pytestmark = pytest.mark.integration


# The README's main-job command may print at most this many lines (progress bars redraw in
# place on a TTY and are absent here); Ray's and the workers' output goes to <out>/logs/.
MAX_TERMINAL_LINES = 60


@pytest.fixture(scope="module")
def smoke(ray_session, tmp_path_factory):
    """The README-style command as a user runs it (a subprocess, default quiet console),
    connected to the session's Ray instance; its terminal output is in ``<out>.terminal``."""
    out = str(tmp_path_factory.mktemp("smoke") / "run")
    cfg = load_config(SMOKE)
    env = dict(os.environ)
    env.update(
        RAY_ADDRESS=ray_session.get_runtime_context().gcs_address,
        DS_ACCELERATOR="cpu",
        RAY_TRAIN_V2_ENABLED="1",
        PYTHONPATH=os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p),
    )
    cmd = [sys.executable, "-m", "rayjobs.pipeline", "--config", SMOKE, "--output-dir", out]
    t0 = time.time()
    proc = subprocess.run(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    with open(out + ".terminal", "w") as f:
        f.write(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-5000:]
    steps = json.loads(open(os.path.join(out, "manifest.json")).read())["pipeline"]["steps"]
    timings = {k: steps[k] for k in pipeline.STEP_NAMES if k in steps}  # the JSON sorts keys
    print(f"smoke pipeline: {time.time() - t0:.0f}s {timings}")
    return out, cfg, timings


def test_quiet_console_and_stage_logs(smoke):
    """The terminal holds the plan, a line per finished step and the summary; each stage's
    log holds its workers' output (a training loss line), Ray's driver log is in ray.log."""
    out, cfg, _ = smoke
    printed = open(out + ".terminal").read()
    lines = printed.splitlines()
    assert len(lines) <= MAX_TERMINAL_LINES, printed
    shown = [ln for ln in lines if ln.strip()]
    assert len(shown) == len(set(shown)), "a line printed twice"
    assert "PlacementGroupCleaner" not in printed and "past_key_values" not in printed
    for step in pipeline.STEP_NAMES:
        # hybrid reads FT's harvest, so FT's chain trains the base: its own step has no work
        said = "nothing to do" if step == "base" else "done in"
        assert any(f"] {step}" in ln and said in ln for ln in lines), step
    assert f"report: {os.path.join(out, 'report.md')}" in printed
    logs = os.path.join(out, "logs")
    for task in cfg.tasks:
        # base and FT are one Ray Train run (a chain), logged as one stage
        train_log = open(os.path.join(logs, task, "base+ft.log")).read()
        assert f"[train] {task}/ft step {cfg.train.max_steps}/{cfg.train.max_steps}" in train_log
        assert "'loss'" in train_log
        assert f"[train] {task}/base step" in train_log
        for rel in (
            "eift+hybrid+insec.log",
            "harvest/ft-train+test.log",  # both splits, one Ray Data pass
            "eval/ft+eift+hybrid+insec+grpo.log",  # every model, one Ray Data pass
            "grpo.log",
            "tune.log",
        ):
            assert os.path.getsize(os.path.join(logs, task, rel)) > 0, f"{task}/{rel}"
    assert os.path.exists(os.path.join(logs, "ray.log"))


def test_every_stage_ran_and_wrote_the_design_layout(smoke):
    check_layout(*smoke)


def test_report_and_figures(smoke):
    out, cfg, _ = smoke
    check_report(out, cfg)
    # The preset leaves the surprise pass off: the column is empty, the report says how to
    # get it (the pass itself is test_evaluate_integration's).
    assert not cfg.eval.surprise
    rows = io.read_parquet(os.path.join(out, "sudoku", "eval", "eift.parquet")).to_pandas()
    assert rows["wrong_step_surprise"].isna().all()
    assert "`eval.surprise=true`" in open(os.path.join(out, "report.md")).read()


def test_rerun_skips_every_stage(smoke, capsys):
    out, cfg, _ = smoke
    before = json.loads(open(os.path.join(out, "manifest.json")).read())["stages"]
    capsys.readouterr()
    pipeline.run(JobContext(cfg, out))
    printed = capsys.readouterr().out
    after = json.loads(open(os.path.join(out, "manifest.json")).read())["stages"]
    for key in before:
        assert f"[skip] {key}:" in printed, key
        assert after[key]["finished"] == before[key]["finished"], key


def test_changed_section_redoes_only_its_stages(smoke, capsys):
    out, _, _ = smoke
    cfg = load_config(SMOKE, ["coverage.n_samples=2000"])
    before = json.loads(open(os.path.join(out, "manifest.json")).read())["stages"]
    capsys.readouterr()
    pipeline.run(JobContext(cfg, out), [s for s in pipeline.STEPS if s.name != "tune"])
    after = json.loads(open(os.path.join(out, "manifest.json")).read())["stages"]
    redone = {k for k in after if after[k].get("finished") != before.get(k, {}).get("finished")}
    assert redone == {f"{t}/coverage/ft" for t in cfg.tasks} | {"report"}
    cov = io.read_parquet(os.path.join(out, "sudoku", "coverage", "ft.parquet")).to_pandas()
    assert (cov["n_samples"] == 2000).all()


def test_notebook_on_the_smoke_run(smoke):
    check_notebook(smoke[0], task="multiplication")


def test_mlflow_tracking_of_the_smoke_run(smoke):
    """The run read back through the MLflow client (rayjobs.tracking): the parent with the
    config and report, a curve per trained model, eval rates, the Tune trials."""
    out, cfg, _ = smoke
    check_mlflow(out, cfg)


def test_tracking_none_writes_no_store(tmp_path):
    out = str(tmp_path / "run")
    cfg = load_config(SMOKE, ["tracking.backend=none"])
    pipeline.run(JobContext(cfg, out), [s for s in pipeline.STEPS if s.name == "data"])
    assert os.path.exists(os.path.join(out, "multiplication", "data", "train.parquet"))
    assert not os.path.exists(os.path.join(out, "mlruns"))
    assert "tracking" not in json.loads(open(os.path.join(out, "manifest.json")).read())


def test_without_hybrid_the_methods_chain_trains_beside_ft(ray_session, tmp_path):
    """premise-* shape on real Ray: the base is its own Ray Train run, then FT's and EIFT's
    runs overlap (two trainings of one task at once), each model in its own manifest record."""
    out = str(tmp_path / "run")
    cfg = load_config(SMOKE, ["tasks=[multiplication]", "train.methods=[ft,eift]"])
    steps = [s for s in pipeline.STEPS if s.name in ("data", "base", "ft", "methods")]
    timings = pipeline.run(JobContext(cfg, out), steps)
    assert timings["base"] > 0
    stages = json.loads(open(os.path.join(out, "manifest.json")).read())["stages"]
    runs = {}
    for m in ("base", "ft", "eift"):
        rec = stages[f"multiplication/{m}"]
        assert rec["status"] == "done" and rec["chain"] == [f"multiplication/{m}"], rec
        runs[m] = (rec["started"] - rec["startup_s"], rec["finished"])  # Ray Train run
    assert runs["base"][1] <= min(runs["ft"][0], runs["eift"][0])
    assert runs["ft"][0] < runs["eift"][1] and runs["eift"][0] < runs["ft"][1]
