"""Pipeline: step selection, config narrowing, skip / redo / resume through manifest.json.

Fast tier: the steps that need no Ray (data, report). The whole smoke pipeline end to
end is in tests/test_pipeline_smoke.py (integration).
"""

from __future__ import annotations

import json
import os
import threading

import pytest

from rayjobs import pipeline, tracking
from rayjobs.common import JobContext
from selfcorrect.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "configs", "smoke.yaml")


@pytest.fixture(autouse=True)
def _no_tracking(monkeypatch):
    """Steps and the manifest only: MLflow tracking has its own tests (tests/test_tracking.py),
    and a SQLite store per run dir would add half a minute here."""
    monkeypatch.setattr(tracking, "tracking_uri", lambda cfg, output_dir: None)


def _steps(*names: str) -> list[pipeline.Step]:
    return [s for s in pipeline.STEPS if s.name in names]


def test_steps_follow_the_design_order():
    assert pipeline.STEP_NAMES == [
        "data",
        "base",
        "ft",
        "harvest",
        "coverage",
        "methods",
        "grpo",
        "eval",
        "tune",
        "report",
    ]


def test_ft_first_then_the_other_methods():
    cfg = load_config(SMOKE, ["train.methods=[eift,ft,hybrid]"])
    assert pipeline._ft(cfg).train.methods == ["ft"]
    assert pipeline._methods(cfg).train.methods == ["eift", "hybrid"]
    assert pipeline._methods(load_config(SMOKE, ["train.methods=[ft]"])) is None
    # the original config is untouched (dataclasses.replace makes copies)
    assert cfg.train.methods == ["eift", "ft", "hybrid"]
    # every other section is shared unchanged, so their config hashes do not move
    assert pipeline._ft(cfg).section_hash("data", "harvest", "eval") == cfg.section_hash(
        "data", "harvest", "eval"
    )


def test_eval_only_models_the_pipeline_trains():
    cfg = load_config(SMOKE, ["train.methods=[ft,insec]", "grpo.enabled=false"])
    assert pipeline.produced_models(cfg) == ["ft", "insec"]
    assert pipeline._eval(cfg).eval.models == ["ft", "insec"]
    assert pipeline.produced_models(load_config(SMOKE))[-1] == "grpo"


def test_switched_off_stages_have_nothing_to_do():
    cfg = load_config(SMOKE, ["tune.enabled=false", "grpo.enabled=false"])
    by_name = {s.name: s for s in pipeline.STEPS}
    assert by_name["tune"].narrow(cfg) is None
    assert by_name["grpo"].narrow(cfg) is None
    assert by_name["data"].narrow(cfg) is cfg


def test_stages_and_skip_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output dir runs/smoke is made (and locked) here
    ctx, steps = pipeline.parse(
        ["--config", SMOKE, "--output-dir", str(tmp_path), "--stages", "data,eval,report"]
    )
    assert [s.name for s in steps] == ["data", "eval", "report"]
    assert ctx.output_dir == str(tmp_path) and ctx.cfg.name == "smoke"
    _, steps = pipeline.parse(["--config", SMOKE, "--skip", "tune,grpo", "seed=3"])
    assert "tune" not in [s.name for s in steps] and len(steps) == len(pipeline.STEPS) - 2
    with pytest.raises(SystemExit, match="unknown step.*choose from data"):
        pipeline.parse(["--config", SMOKE, "--stages", "data,trian"])


def test_missing_stage_module_is_a_clear_error():
    step = pipeline.Step("ghost", "no_such_stage", lambda c: c)
    with pytest.raises(SystemExit, match="needs rayjobs.no_such_stage.*--skip ghost"):
        pipeline.load_stage(step)


def test_skip_redo_and_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    cfg = load_config(SMOKE, ["data.n_train=30", "data.n_test=10"])
    steps = _steps("data", "report")
    timings = pipeline.run(JobContext(cfg, out), steps)
    assert set(timings) == {"data", "report"}
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    for key in ("multiplication/data", "sudoku/data", "report"):
        assert manifest["stages"][key]["status"] == "done"
    assert manifest["pipeline"]["steps"].keys() == {"data", "report"}
    report = open(os.path.join(out, "report.md")).read()
    assert "_Skipped: no eval_summary.parquet" in report and "sudoku/data" in report
    assert "report: " + os.path.join(out, "report.md") in pipeline.summary(
        JobContext(cfg, out), timings
    )

    # Same config: every stage is skipped, files untouched.
    train_file = os.path.join(out, "sudoku", "data", "train.parquet")
    mtime = os.stat(train_file).st_mtime_ns
    capsys.readouterr()
    pipeline.run(JobContext(cfg, out), steps)
    printed = capsys.readouterr().out
    assert "[skip] sudoku/data" in printed and "[skip] report" in printed
    assert os.stat(train_file).st_mtime_ns == mtime

    # An interrupted stage (status 'running') is redone on the next run.
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    manifest["stages"]["sudoku/data"]["status"] = "running"
    open(os.path.join(out, "manifest.json"), "w").write(json.dumps(manifest))
    capsys.readouterr()
    pipeline.run(JobContext(cfg, out), steps)
    printed = capsys.readouterr().out
    assert "[skip] multiplication/data" in printed and "[skip] sudoku/data" not in printed
    assert "[skip] report" not in printed  # an upstream stage finished again

    # A changed sudoku section redoes sudoku's data, not multiplication's.
    cfg2 = load_config(SMOKE, ["data.n_train=30", "data.n_test=10", "sudoku.max_empty=5"])
    capsys.readouterr()
    pipeline.run(JobContext(cfg2, out, overwrite=True), steps)
    printed = capsys.readouterr().out
    assert "[skip] multiplication/data" in printed and "[skip] sudoku/data" not in printed


def test_changed_experiment_needs_overwrite(tmp_path):
    out = str(tmp_path / "run")
    steps = _steps("data")
    pipeline.run(JobContext(load_config(SMOKE, ["data.n_train=20", "data.n_test=5"]), out), steps)
    from selfcorrect.config import ConfigError

    with pytest.raises(ConfigError, match="different experiment"):
        pipeline.run(
            JobContext(load_config(SMOKE, ["data.n_train=20", "data.n_test=5", "seed=1"]), out),
            steps,
        )


def _fake_stages(monkeypatch, behave) -> list[tuple[str, str, str]]:
    """Replace every stage module by ``behave(name, task)`` and record start / end events."""
    events: list[tuple[str, str, str]] = []
    lock = threading.Lock()

    def stage(name: str) -> object:
        def run(ctx: JobContext) -> None:
            task = ctx.cfg.tasks[0]
            with lock:
                events.append(("start", name, task))
            behave(name, task)
            with lock:
                events.append(("end", name, task))

        return type("M", (), {"run": staticmethod(run)})

    monkeypatch.setattr(pipeline, "load_stage", lambda step: stage(step.name))
    monkeypatch.setattr(pipeline, "init_ray", lambda cfg: None)
    return events


PER_TASK = ("data", "base", "ft", "harvest", "coverage", "methods", "grpo", "eval", "tune")


def test_a_free_core_takes_the_next_ready_step_of_any_task(tmp_path, monkeypatch):
    """With parallel tasks the per-task steps form a graph: sudoku's GRPO and sweep need only
    its FT, so they run on the thread multiplication leaves free while sudoku's methods still
    train (as chains, sudoku's methods would wait here for ever: the 30 s assertion), and no
    step ever starts before a step of its own task that it reads has ended."""
    grpo_and_tune = {"grpo": threading.Event(), "tune": threading.Event()}
    tunes_running = []

    def behave(name: str, task: str) -> None:
        if task == "sudoku" and name in grpo_and_tune:
            grpo_and_tune[name].set()
        if (name, task) == ("methods", "sudoku"):
            for ev in grpo_and_tune.values():
                assert ev.wait(timeout=30), "sudoku's methods waited for its own grpo / tune"
        if name == "tune":
            tunes_running.append(1)
            assert len(tunes_running) == 1, "two sweeps ran at once"
            threading.Event().wait(0.05)
            tunes_running.pop()

    events = _fake_stages(monkeypatch, behave)
    cfg = load_config(SMOKE, ["data.n_train=20", "data.n_test=5"])
    timings = pipeline.run(JobContext(cfg, str(tmp_path / "run")), _steps(*PER_TASK))
    assert set(timings) == set(PER_TASK)
    for task in cfg.tasks:
        # hybrid reads FT's harvest: FT's chain trains the base, the base step has no work
        assert ("start", "base", task) not in events
        for name in set(PER_TASK) - {"base"}:
            start = events.index(("start", name, task))
            waits = pipeline.needs(name, pipeline._only_task(cfg, task), set(PER_TASK))
            for need in set(waits) - {"base"}:
                assert events.index(("end", need, task)) < start, (name, need, task)
        methods = events.index(("start", "methods", task))
        assert events.index(("end", "harvest", task)) < methods
    # sudoku's GRPO and sweep started while its methods ran
    for name in ("grpo", "tune"):
        assert events.index(("start", name, "sudoku")) < events.index(("end", "methods", "sudoku"))


def test_without_hybrid_the_methods_train_beside_ft(tmp_path, monkeypatch):
    """One task, FT and EIFT (premise-multiplication's shape): the base is its own step,
    and EIFT's chain trains from it while FT's does, on a second thread (the 30 s waits:
    one after the other, FT would wait for ever); harvest still follows FT, eval both."""
    side_by_side = {"ft": threading.Event(), "methods": threading.Event()}

    def behave(name: str, task: str) -> None:
        if name in side_by_side:
            side_by_side[name].set()
            other = side_by_side["methods" if name == "ft" else "ft"]
            assert other.wait(timeout=30), f"{name} ran alone"

    events = _fake_stages(monkeypatch, behave)
    cfg = load_config(SMOKE, ["tasks=[multiplication]", "train.methods=[ft,eift]"])
    assert pipeline._base(cfg) is cfg and pipeline.graph_threads(cfg, set(PER_TASK), {}) == 2
    pipeline.run(JobContext(cfg, str(tmp_path / "run")), _steps(*PER_TASK))
    at = {(kind, name): i for i, (kind, name, _) in enumerate(events)}
    assert at["end", "data"] < at["start", "base"]
    assert at["end", "base"] < min(at["start", "ft"], at["start", "methods"])
    assert at["end", "ft"] < at["start", "harvest"]
    assert max(at["end", "methods"], at["end", "harvest"]) < at["start", "eval"]

    # Left out with --skip base, FT's chain trains the base and the methods wait for it.
    assert pipeline.needs("methods", cfg, set(PER_TASK) - {"base"}) == ("harvest",)
    # With hybrid the methods read FT's harvest: no base step, one thread per task.
    hybrid = load_config(SMOKE, ["tasks=[multiplication]", "train.methods=[ft,eift,hybrid]"])
    assert pipeline._base(hybrid) is None
    assert pipeline.needs("methods", hybrid, set(PER_TASK)) == ("harvest",)
    assert pipeline.graph_threads(hybrid, set(PER_TASK), {}) == 1
    # Never more concurrent trainings than the cluster has CPUs for.
    assert pipeline.graph_threads(cfg, set(PER_TASK), {"CPU": 1.0}) == 1
    two_tasks = load_config(SMOKE, ["train.methods=[ft,eift]"])
    assert pipeline.graph_threads(two_tasks, set(PER_TASK), {"CPU": 2.0}) == 2
    assert pipeline.graph_threads(two_tasks, set(PER_TASK), {"CPU": 8.0}) == 4
    # Tasks one after the other (no graph): FT's chain trains the base, as before.
    seq = load_config(
        SMOKE, ["tasks=[multiplication]", "train.methods=[ft,eift]", "ray.parallel_tasks=false"]
    )
    assert pipeline._base(seq) is None


def test_a_failed_step_stops_only_what_reads_it(tmp_path, monkeypatch, capsys):
    """sudoku's methods fail: its eval (which reads them) never starts, its GRPO and sweep
    (which do not) still run, multiplication finishes, and the run fails with the error."""

    def behave(name: str, task: str) -> None:
        if (name, task) == ("methods", "sudoku"):
            raise RuntimeError("sudoku methods broke")

    events = _fake_stages(monkeypatch, behave)
    cfg = load_config(SMOKE, ["data.n_train=20", "data.n_test=5"])
    with pytest.raises(RuntimeError, match="sudoku methods broke"):
        pipeline.run(JobContext(cfg, str(tmp_path / "run")), _steps(*PER_TASK, "report"))
    ended = {(name, task) for kind, name, task in events if kind == "end"}
    assert {(n, "multiplication") for n in PER_TASK if n != "base"} <= ended
    assert {("grpo", "sudoku"), ("tune", "sudoku")} <= ended
    assert ("start", "eval", "sudoku") not in events
    assert ("start", "report", "sudoku") not in events and ("end", "report", "") not in events
    assert "eval (sudoku): not run, a step it reads failed" in capsys.readouterr().out


def test_parallel_tasks_match_sequential_and_surface_failures(tmp_path):
    """Tasks in driver threads write the same files and manifest records as one after the
    other, and a failing task fails the run without losing the other task's finished stage."""
    steps = _steps("data")
    base = ["data.n_train=30", "data.n_test=10"]
    par, seq = str(tmp_path / "par"), str(tmp_path / "seq")
    pipeline.run(JobContext(load_config(SMOKE, base), par), steps)
    pipeline.run(JobContext(load_config(SMOKE, [*base, "ray.parallel_tasks=false"]), seq), steps)
    for task in ("multiplication", "sudoku"):
        for split in ("train", "test"):
            rel = os.path.join(task, "data", f"{split}.parquet")
            assert (
                open(os.path.join(par, rel), "rb").read()
                == open(os.path.join(seq, rel), "rb").read()
            )
    stages = json.loads(open(os.path.join(par, "manifest.json")).read())["stages"]
    assert {stages[f"{t}/data"]["status"] for t in ("multiplication", "sudoku")} == {"done"}

    def boom(ctx: JobContext) -> None:
        if ctx.cfg.tasks == ["sudoku"]:
            raise RuntimeError("sudoku broke")
        from rayjobs import data

        data.run(ctx)

    bad = pipeline.Step("data", "data", lambda c: c, needs_ray=False)
    out = str(tmp_path / "bad")
    modules = {"data": type("M", (), {"run": staticmethod(boom)})}
    ctx = JobContext(load_config(SMOKE, base), out)
    with pytest.raises(RuntimeError, match="sudoku broke"):
        pipeline._in_threads(
            [
                lambda t=t: pipeline._run_steps(
                    ctx, pipeline._only_task(ctx.cfg, t), [bad], modules, 0.0, t
                )
                for t in ctx.cfg.tasks
            ]
        )
    assert os.path.exists(os.path.join(out, "multiplication", "data", "train.parquet"))


def test_a_sweep_beside_other_steps_takes_the_free_share_of_its_trials():
    """tiny on 2 cores: a sweep started while the other task trains runs one trial at a time
    (a second would queue for the busy core and take it from that task's next step); alone it
    runs two; a configured tune.max_concurrent is kept."""
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"))
    two_cpus = {"CPU": 2.0, "memory": 8e9}
    assert pipeline._sweep_share(cfg, 1, 2, two_cpus).tune.max_concurrent == 1
    assert pipeline._sweep_share(cfg, 0, 2, two_cpus) is cfg
    assert pipeline._sweep_share(cfg, 1, 2, {"CPU": 8.0}).tune.max_concurrent == 4
    fixed = load_config(os.path.join(REPO, "configs", "tiny.yaml"), ["tune.max_concurrent=2"])
    assert pipeline._sweep_share(fixed, 1, 2, two_cpus).tune.max_concurrent == 2
    assert pipeline._sweep_share(cfg, 1, 2, {}) is cfg  # no Ray: nothing to size
    from selfcorrect.tune import sweep_hash  # the share is resources only: same sweep

    shared = pipeline._sweep_share(cfg, 1, 2, two_cpus)
    assert sweep_hash(shared, "sudoku") == sweep_hash(cfg, "sudoku")
