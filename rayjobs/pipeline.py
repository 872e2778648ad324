"""The whole experiment, one command: every stage for every task, then report.md.

python -m rayjobs.pipeline --config configs/tiny.yaml --output-dir runs/tiny
ray job submit --working-dir . -- python -m rayjobs.pipeline --config configs/tiny.yaml

Order: data -> ft (the clean base, then FT) -> harvest (FT model on train and test) ->
coverage -> eift, hybrid, insec (hybrid uses the harvested train errors) -> grpo (from
FT) -> eval (every model) -> tune -> report. With ``ray.parallel_tasks`` the per-task
steps form a graph instead (``needs``): a step starts once the steps of its own task that
it reads are done, on a driver thread per task, so a core that one task leaves free takes
the next ready step of any task. When no method reads FT's harvest (no hybrid), the base
is its own step and the methods train from it beside FT, on a second thread of that task.
Each stage records itself in manifest.json (status, config hash, artifacts, seconds): a
rerun skips stages that are done with the same config, redoes those whose config changed,
and resumes an interrupted run.

Extra flags: --stages a,b (run only these pipeline steps) and --skip a,b; steps are
data, base, ft, harvest, coverage, methods, grpo, eval, tune, report (``base`` has work
only when the methods train beside FT).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from rayjobs import tracking
from rayjobs.common import (
    JobContext,
    init_ray,
    job_main,
    parse_args,
    read_manifest,
    save_resolved_config,
    update_manifest,
)
from selfcorrect import console, io
from selfcorrect.config import Config


@dataclass(frozen=True)
class Step:
    """One pipeline step: a stage module's ``run(ctx)`` on a (possibly narrowed) config."""

    name: str
    module: str  # rayjobs.<module>
    narrow: Callable[[Config], Config | None]  # None = nothing to do for this config
    needs_ray: bool = True


def _with(cfg: Config, section: str, **changes: object) -> Config:
    return dataclasses.replace(
        cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)}
    )


def _base(cfg: Config) -> Config | None:
    """The base on its own when the methods can start from it beside FT: tasks run as a
    graph, some method besides FT trains, none reads FT's harvest (hybrid), and a task
    has a base. Otherwise FT's chain trains it first (one Ray Train start-up fewer)."""
    t = cfg.train
    others = [m for m in t.methods if m != "ft"]
    has_base = any(t.base_steps_by_task.get(name, t.base_steps) > 0 for name in cfg.tasks)
    apart = cfg.ray.parallel_tasks and others and "hybrid" not in others and has_base
    return cfg if apart else None


def _ft(cfg: Config) -> Config:
    # FT is trained first and always: harvest, hybrid, GRPO and the ft_errors condition build on it.
    return _with(cfg, "train", methods=["ft"])


def _methods(cfg: Config) -> Config | None:
    rest = [m for m in cfg.train.methods if m != "ft"]
    return _with(cfg, "train", methods=rest) if rest else None


def produced_models(cfg: Config) -> list[str]:
    """Models this config's pipeline trains, in DESIGN order."""
    out = ["ft"] + [m for m in cfg.train.methods if m != "ft"]
    return out + (["grpo"] if cfg.grpo.enabled else [])


def _eval(cfg: Config) -> Config | None:
    models = [m for m in cfg.eval.models if m in produced_models(cfg)]
    return _with(cfg, "eval", models=models) if models else None


STEPS = (
    Step("data", "data", lambda c: c, needs_ray=False),
    Step("base", "base", _base),
    Step("ft", "train", _ft),
    Step("harvest", "harvest", lambda c: c),
    Step("coverage", "coverage", lambda c: c),
    Step("methods", "train", _methods),
    Step("grpo", "grpo", lambda c: c if c.grpo.enabled else None),
    Step("eval", "evaluate", _eval),
    Step("tune", "tune", lambda c: c if c.tune.enabled else None),
    Step("report", "report", lambda c: c, needs_ray=False),
)
STEP_NAMES = [s.name for s in STEPS]
# Steps in which one task's stages never read another task's outputs. Report (every task)
# comes after them.
PER_TASK_STEPS = ("data", "base", "ft", "harvest", "coverage", "methods", "grpo", "eval", "tune")
# What each per-task step reads from its own task's earlier steps: with ``ray.parallel_tasks``
# it starts once those are done (or are not part of this run). ft trains the clean base (if
# the base step has not) and FT; hybrid (methods) trains on the harvested FT errors; GRPO
# and the sweep's trials (tune.init=ft) start from FT; eval scores every model and the
# harvested FT errors. So GRPO and tune do not wait for the methods, and eval for nothing
# but its inputs. Without hybrid the methods need only the base (``needs``).
NEEDS: dict[str, tuple[str, ...]] = {
    "data": (),
    "base": ("data",),
    "ft": ("data", "base"),
    "harvest": ("ft",),
    "coverage": ("harvest",),
    "methods": ("harvest",),
    "grpo": ("ft",),
    "eval": ("harvest", "methods", "grpo"),
    "tune": ("ft",),
}
# Steps that run one task at a time: a sweep sizes its concurrent trials for the whole
# cluster (rayjobs.tune), so a second one would only queue its trials behind the first.
ONE_AT_A_TIME = ("tune",)


def needs(step: str, cfg: Config, names: set[str]) -> tuple[str, ...]:
    """The steps among ``names`` (this run's) that ``step`` of ``cfg``'s task waits for.

    The methods start from the base alone when the base is its own step (``_base``); with
    that step left out (``--skip base``) FT's chain trains the base, and the methods wait
    for it there rather than train a second copy beside it.
    """
    if step == "methods" and "base" in names and _base(cfg) is not None:
        return ("base",)
    return tuple(n for n in NEEDS.get(step, ()) if n in names)


def graph_threads(cfg: Config, names: set[str], cluster: dict[str, float]) -> int:
    """Driver threads for the graph: one per task, two for a task whose methods train
    beside its FT, but no more concurrent trainings than the cluster has CPUs for."""
    wanted = sum(
        2 if "base" in names and _base(_only_task(cfg, t)) is not None else 1 for t in cfg.tasks
    )
    per_run = cfg.train.num_workers * cfg.train.cpus_per_worker
    fits = int(cluster.get("CPU", 0) // per_run) if cluster and per_run else wanted
    return max(len(cfg.tasks), min(wanted, fits))


def _names(arg: str | None, flag: str) -> list[str] | None:
    if arg is None:
        return None
    names = [n.strip() for n in arg.split(",") if n.strip()]
    bad = [n for n in names if n not in STEP_NAMES]
    if bad:
        raise SystemExit(f"{flag}: unknown step(s) {bad}; choose from {', '.join(STEP_NAMES)}")
    return names


def parse(argv: list[str] | None = None) -> tuple[JobContext, list[Step]]:
    """The common job flags plus --stages / --skip, which choose the steps to run."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--stages", default=None)
    pre.add_argument("--skip", default=None)
    known, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    only, skip = _names(known.stages, "--stages"), _names(known.skip, "--skip") or []
    ctx = parse_args(__doc__, rest)
    steps = [s for s in STEPS if (only is None or s.name in only) and s.name not in skip]
    return ctx, steps


def load_stage(step: Step) -> object:
    """The stage module; a missing one is a clear error naming the way around it."""
    try:
        return importlib.import_module(f"rayjobs.{step.module}")
    except ModuleNotFoundError as e:
        if e.name != f"rayjobs.{step.module}":
            raise
        raise SystemExit(
            f"pipeline step '{step.name}' needs rayjobs.{step.module}, which this checkout does "
            f"not have; update the checkout or leave the step out with --skip {step.name}"
        ) from e


def run(ctx: JobContext, steps: list[Step] | None = None) -> dict[str, float]:
    """Run the steps in order; returns step -> wall seconds (0 for steps with nothing to do).

    With ``ray.parallel_tasks`` and several tasks, the per-task steps of every task run as a
    graph (``_run_graph``); a step's seconds are then its longest task's.
    """
    steps = list(STEPS if steps is None else steps)
    modules = {s.name: load_stage(s) for s in steps}  # fail before any work on a missing module
    save_resolved_config(ctx)
    tracking.start(ctx)  # the MLflow parent run (rayjobs.tracking); never fails the run
    if console.quiet():
        console.line(plan(ctx, steps))
    if any(s.needs_ray and s.narrow(ctx.cfg) is not None for s in steps):
        init_ray(ctx.cfg)
    t_start = time.time()
    chained = [s for s in steps if s.name in PER_TASK_STEPS]
    rest = [s for s in steps if s.name not in PER_TASK_STEPS]
    threads = graph_threads(ctx.cfg, {s.name for s in chained}, _cluster())
    if ctx.cfg.ray.parallel_tasks and threads > 1 and chained:
        per_task = _run_graph(ctx, chained, modules, t_start, threads)
        timings = {s.name: max(pt.get(s.name, 0.0) for pt in per_task.values()) for s in chained}
    else:
        timings = _run_steps(ctx, ctx.cfg, chained, modules, t_start)
    timings.update(_run_steps(ctx, ctx.cfg, rest, modules, t_start))
    timings = {s.name: timings[s.name] for s in steps}
    total = round(time.time() - t_start, 2)

    def record(manifest: dict) -> None:
        manifest["pipeline"] = {"steps": timings, "total_seconds": total, "finished": time.time()}

    update_manifest(ctx, record)
    tracking.finish(ctx)
    return timings


def _in_threads(jobs: list[Callable[[], object]]) -> list[object]:
    """Run the jobs in daemon threads (Ctrl-C in the driver stops the job, not waits for it);
    re-raises the first failure once every job has ended."""
    results: list[object] = [None] * len(jobs)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised in the driver thread below
            errors.append(e)
            # Say so now: the other tasks go on (their results are kept) and may take a while.
            print(f"[pipeline] chain {i + 1}/{len(jobs)} failed; the others go on:", flush=True)
            traceback.print_exc()

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        while th.is_alive():
            th.join(timeout=0.5)  # short joins keep the main thread responsive to Ctrl-C
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]


def _run_graph(
    ctx: JobContext,
    steps: list[Step],
    modules: dict[str, object],
    t_start: float,
    threads: int,
) -> dict[str, dict[str, float]]:
    """Every task's per-task ``steps`` on ``threads`` driver threads (``graph_threads``): a
    free thread takes the first ready (step, task) in step order, then task order. A task
    whose step fails runs nothing that reads it; the other tasks go on,
    and the first failure is re-raised once all runnable work has ended.

    Returns task -> step -> wall seconds.
    """
    tasks = list(ctx.cfg.tasks)
    names = {s.name for s in steps}
    jobs = [(s, t) for s in steps for t in tasks]  # priority order
    state: dict[tuple[str, str], str] = {}  # running | done | failed | blocked
    timings: dict[str, dict[str, float]] = {t: {} for t in tasks}
    errors: list[BaseException] = []
    cond = threading.Condition()

    def take() -> tuple[Step, str] | None:  # under cond
        running = {name for (name, _), st in state.items() if st == "running"}
        for step, task in jobs:
            if (step.name, task) in state:
                continue
            waits = needs(step.name, _only_task(ctx.cfg, task), names)
            needs_state = [state.get((n, task)) for n in waits]
            if any(st in ("failed", "blocked") for st in needs_state):
                state[(step.name, task)] = "blocked"
                _say(f"[pipeline] {step.name} ({task}): not run, a step it reads failed")
            elif all(st == "done" for st in needs_state) and not (
                step.name in ONE_AT_A_TIME and step.name in running
            ):
                return step, task
        return None

    def worker() -> None:
        while True:
            with cond:
                while (job := take()) is None:
                    if len(state) == len(jobs) and "running" not in state.values():
                        cond.notify_all()
                        return
                    if "running" not in state.values():  # nothing can start: a bug in NEEDS
                        raise RuntimeError(f"pipeline: no step can start ({state})")
                    cond.wait(timeout=1.0)
                step, task = job
                busy = list(state.values()).count("running")
                state[(step.name, task)] = "running"
            try:
                cfg = _only_task(ctx.cfg, task)
                if step.name == "tune" and busy:
                    cfg = _sweep_share(cfg, busy, threads, _cluster())
                timings[task].update(_run_steps(ctx, cfg, [step], modules, t_start, task))
                outcome = "done"
            except BaseException as e:  # noqa: BLE001 - re-raised in the driver thread below
                errors.append(e)
                outcome = "failed"
                # Say so now: the other tasks go on (their results are kept) and may take a while.
                print(f"[pipeline] {step.name} ({task}) failed; the other tasks go on:", flush=True)
                traceback.print_exc()
            with cond:
                state[(step.name, task)] = outcome
                cond.notify_all()

    _in_threads([worker] * threads)
    if errors:
        raise errors[0]
    return timings


def _cluster() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources()) if ray.is_initialized() else {}


def _sweep_share(cfg: Config, busy: int, workers: int, cluster: dict[str, float]) -> Config:
    """A sweep that starts beside ``busy`` other steps runs the free threads' share of its
    concurrent trials (``tune.max_concurrent`` = 0 sizes them for the whole ``cluster``). A
    trial queued for a core that another step holds would take that core from the step its
    task's thread starts next (in `tiny` an eval waited ~170 s behind the sweep's second
    trial); a sweep started alone keeps the whole cluster."""
    if busy == 0 or cfg.tune.max_concurrent > 0 or not cluster:
        return cfg
    from selfcorrect.tune import max_concurrent

    whole = max_concurrent(cfg, cluster)
    return _with(cfg, "tune", max_concurrent=max(1, whole * (workers - busy) // workers))


def _only_task(cfg: Config, task: str) -> Config:
    return dataclasses.replace(cfg, tasks=[task])


def _run_steps(
    ctx: JobContext,
    cfg: Config,
    steps: list[Step],
    modules: dict[str, object],
    t_start: float,
    label: str = "",
) -> dict[str, float]:
    timings: dict[str, float] = {}
    for step in steps:
        narrowed = step.narrow(cfg)
        i = STEP_NAMES.index(step.name) + 1
        head = f"[pipeline {i}/{len(STEP_NAMES)}] {step.name}" + (f" ({label})" if label else "")
        if narrowed is None:
            _say(f"{head}: nothing to do for this config")
            timings[step.name] = 0.0
            continue
        if not console.quiet():  # quiet: the running stages' progress bars say it
            print(f"{head}: start ({time.time() - t_start:.0f}s elapsed)", flush=True)
        t0 = time.time()
        console.set_scope(head)  # quiet: this line, not one per stage inside the step
        try:
            modules[step.name].run(JobContext(narrowed, ctx.output_dir, ctx.overwrite))
            tracking.sync(JobContext(narrowed, ctx.output_dir), narrowed.tasks)
        finally:
            console.set_scope(None)
        timings[step.name] = round(time.time() - t0, 2)
        _say(f"{head}: done in {timings[step.name]:.1f}s ({time.time() - t_start:.0f}s elapsed)")
    return timings


def _say(msg: str) -> None:
    """A pipeline line: past the progress bars in quiet mode, plain print otherwise."""
    if console.quiet():
        console.line(msg)
    else:
        print(msg, flush=True)


def plan(ctx: JobContext, steps: list[Step]) -> str:
    """The stage plan, printed first in quiet mode: what runs, in which order, where logs go."""
    cfg = ctx.cfg
    todo = [s.name for s in steps if s.narrow(cfg) is not None]
    many = len(cfg.tasks) > 1
    how = "one after the other" if many else "one step at a time"
    if cfg.ray.parallel_tasks and many:
        how = "in parallel"
    if _base(cfg) is not None:
        how = ("in parallel, " if many else "") + "the methods beside FT"
    return (
        f"[pipeline] {cfg.name}: {' -> '.join(todo)} for {', '.join(cfg.tasks)} ({how}); "
        f"output {ctx.output_dir}; logs {console.log_dir()}/ (--verbose streams them here)"
    )


def summary(ctx: JobContext, timings: dict[str, float]) -> str:
    """The closing lines: wall time per step, the headline numbers (report.md's "Headline"),
    and where the report, the logs and the MLflow store are."""
    total = read_manifest(ctx).get("pipeline", {}).get("total_seconds", sum(timings.values()))
    parts = ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
    report = io.join(ctx.output_dir, "report.md")
    has_report = io.exists(report)
    where = report if has_report else f"{ctx.output_dir} (no report.md: report step skipped)"
    lines = [f"pipeline finished in {total:.0f}s ({parts})"]
    if has_report:
        from selfcorrect.report import PRECISION

        text = io.read_bytes(report).decode()
        lines += headline_lines(text)
        # The precision path: metrics compare only between runs trained on the same one.
        lines += [ln[2:].split(" (")[0] for ln in text.splitlines() if ln.startswith(PRECISION)]
    lines.append(f"report: {where}")
    if console.log_dir():
        lines.append(f"logs: {console.log_dir()}/ (one file per stage; ray.log: Ray's own)")
    mlruns = io.join(ctx.output_dir, "mlruns")
    if io.exists(mlruns):
        store = tracking.tracking_uri(ctx.cfg, ctx.output_dir) or mlruns
        lines.append(f"MLflow: {mlruns} (open it: mlflow ui --backend-store-uri {store})")
    return "\n".join(lines)


def headline_lines(report_md: str, limit: int = 10) -> list[str]:
    """The bullet lines of report.md's "## Headline" section, markdown stripped, at most
    ``limit`` (the closing summary's headline numbers)."""
    out: list[str] = []
    inside = False
    for raw in report_md.splitlines():
        if raw.startswith("## "):
            if inside:
                break
            inside = raw.strip() == "## Headline"
            continue
        text = raw.strip()
        if inside and text:
            out.append(text.replace("**", "").replace("`", ""))
    return out[:limit]


@job_main
def main(argv: list[str] | None = None) -> None:
    ctx, steps = parse(argv)
    timings = run(ctx, steps)
    print(summary(ctx, timings), flush=True)


if __name__ == "__main__":
    main()
