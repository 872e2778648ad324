"""Stage `tune`: Ray Tune over the EIFT injection rate -> <task>/tune/results.parquet + plots.

python -m rayjobs.tune --config configs/tiny.yaml --output-dir runs/tiny
python -m rayjobs.tune --config configs/smoke.yaml tune.injection_rates=[0.1,0.5] tune.asha=true

Ray's documented Tune-over-Train pattern (Train V2): every trial is a Tune
*function* that drives one Ray Train ``TorchTrainer`` run (the training job's
own code, method ``eift`` with the trial's injection rate, optional max errors
per trace and loss weights), then evaluates the model in one Ray task:
validation loss on held-out traces of the trial's mixture, and accuracy /
recognition / correction on ``synthetic`` and ``own_errors`` (greedy).
With one CPU worker and no ZeRO (``tune.trainer`` auto / in_trial) the trial's own
process runs the same loop and the evaluation instead: the ``TorchTrainer`` would add
only its start-up (``selfcorrect.tune.trains_in_trial``).

Resources: the trial function reserves only memory (it is a driver); the Train
workers reserve the cores / GPUs, and ``max_concurrent_trials`` is how many
trials' workers fit in the cluster at once (``tune.max_concurrent``, 0 = auto).
A trial that trains in its own process reserves its worker's cores itself.

Resuming: the experiment lives in ``<task>/tune/ray/<sweep-hash>/`` (Tune's
``storage_path`` + ``name``). Rerunning after an interruption restores it
(``Tuner.can_restore`` / ``Tuner.restore``): finished trials are kept, unfinished
ones resume (Ray Train picks up their last checkpoint from the same run name; a trial
training in its own process, its newest checkpoint in the same place).
A trial whose ``trials/<name>/result.json`` exists is never trained again,
even when the driver died before Tune saved its own state.

Outputs per task: ``tune/results.parquet`` (one row per trial: parameters and
metrics), ``tune/<metric>-vs-injection-rate.png``, and per trial
``tune/trials/<name>/{model/,eval.parquet,result.json}``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any

import pandas as pd

from rayjobs import tracking
from rayjobs.common import (
    JobContext,
    init_ray,
    job_main,
    parse_args,
    run_stage,
    save_resolved_config,
)
from selfcorrect import console, io
from selfcorrect.config import Config, config_from_dict
from selfcorrect.tune import (
    PLOT_METRICS,
    TRIAL_CONDITIONS,
    TrialParams,
    check_space,
    eval_resources,
    figure_png,
    max_concurrent,
    num_samples,
    param_space,
    plot_metric,
    plot_name,
    results_table,
    scheduler,
    search_alg,
    segment_ends,
    summary_metrics,
    sweep_hash,
    trains_in_trial,
    trial_config,
    trial_function_resources,
    trial_hash,
    trial_params,
    validation_examples,
    validation_loss,
)

RESULT_FILE = "result.json"
# One sweep at a time in a driver: each sizes its concurrent trials for the whole cluster
# (``max_concurrent``), so concurrent callers queue their sweeps here (the pipeline starts
# one sweep at a time anyway: rayjobs.pipeline.ONE_AT_A_TIME).
_SWEEP_LOCK = threading.Lock()


def tune_dir(output_dir: str, task: str) -> str:
    return io.join(output_dir, task, "tune")


def trial_dir(output_dir: str, task: str, params: TrialParams) -> str:
    return io.join(tune_dir(output_dir, task), "trials", params.name)


def experiment_storage(output_dir: str, task: str) -> str:
    """Tune's ``storage_path`` (absolute locally, as Tune requires; URIs as they are)."""
    p = io.join(tune_dir(output_dir, task), "ray")
    return p if io.is_uri(p) else os.path.abspath(p)


def experiment_name(cfg: Config, task: str) -> str:
    """Stable across restarts of the same sweep, new for a changed config."""
    return f"sweep-{task}-{sweep_hash(cfg, task)}"


# ---------------------------------------------------------------------------
# One trial (runs inside the Tune trial actor)
# ---------------------------------------------------------------------------


def train_trial_model(
    cfg: Config, task: str, output_dir: str, params: TrialParams, stop_at: int
) -> dict[str, Any]:
    """Train the trial's EIFT model up to step ``stop_at`` with the training job's worker loop
    (``selfcorrect.training.train_loop_per_worker`` in a ``TorchTrainer``, or the same
    ``run_training`` in this process: ``trains_in_trial``) and publish it to
    ``trials/<name>/model``; returns the last training metrics.

    The Ray Train run is named after the trial (never a timestamp) and stored under
    ``tune/ray/train``: a restarted trial, or the next segment of this one, resumes
    the same run from its last checkpoint (in this process: the newest one kept there).
    """
    from rayjobs.train import make_trainer
    from selfcorrect.training import MODEL_DIR, LocalSession, run_training

    tcfg = trial_config(cfg, params)
    init = None
    if cfg.tune.init == "ft":
        init = io.join(output_dir, task, "models", "ft")
        if not io.exists(io.join(init, "config.json")):
            raise FileNotFoundError(
                f"tune.init=ft starts every trial from the FT model, but {init} holds none; "
                "train it first (python -m rayjobs.train) or set tune.init=scratch"
            )
        init = init if io.is_uri(init) else os.path.abspath(init)
    train_tab = io.read_parquet(io.join(output_dir, task, "data", "train.parquet"), ["prompt"])
    loop_config = {
        "cfg": tcfg.to_dict(),
        "task": task,
        "method": "eift",
        "prompts": train_tab.column("prompt").to_pylist(),
        "onpolicy": None,
        "init_model_path": init,
        "max_steps": stop_at,
    }
    run_name = f"{params.name}-{trial_hash(cfg, task, params)}"
    storage = io.join(experiment_storage(output_dir, task), "train")
    model_dir = io.join(trial_dir(output_dir, task, params), "model")
    if trains_in_trial(cfg, output_dir):
        if io.is_uri(storage):
            raise ValueError(
                f"tune.trainer=in_trial keeps a trial's checkpoints on its own disk, but the "
                f"output dir {output_dir} is remote; use tune.trainer=ray_train (or auto)"
            )
        # The same loop in this process; a restarted trial resumes from its newest checkpoint
        # (the place the Ray Train run of this name would keep its own).
        session = LocalSession(os.path.join(storage, run_name), resume=True, keep=1)
        metrics = run_training(loop_config, session)
        src = os.path.join(session.latest or "", MODEL_DIR)
        if not os.path.isdir(src):
            raise RuntimeError(f"tune trial {task}/{params.name}: final checkpoint has no model")
        io.upload_dir(src, model_dir)  # atomic replace locally
        return metrics
    trainer = make_trainer(tcfg, loop_config, name=run_name, storage_path=storage, keep=1)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"tune trial {task}/{params.name}: training left no checkpoint")
    with result.checkpoint.as_directory() as d:
        src = os.path.join(d, MODEL_DIR)
        if not os.path.isdir(src):
            raise RuntimeError(f"tune trial {task}/{params.name}: final checkpoint has no model")
        io.upload_dir(src, model_dir)  # atomic replace locally
    return dict(result.metrics or {})


def evaluate_trial(
    cfg_dict: dict[str, Any],
    task_name: str,
    output_dir: str,
    params: TrialParams,
    full: bool = True,
) -> dict[str, Any]:
    """Validation loss (+ with ``full``, synthetic / own_errors metrics) of a trial's model.

    Runs as a Ray task on the resources the trial's training just released. Same
    items and metric code as the eval stage (``rayjobs.evaluate.build_items``,
    ``selfcorrect.evaluate``), greedy decoding; the item rows are kept in the
    trial's ``eval.parquet``.
    """
    import torch

    from rayjobs.evaluate import build_items, expand_temperatures
    from selfcorrect.data import DATA_COLUMNS, load_problems
    from selfcorrect.evaluate import rows_frame, score_items, sort_rows, summarize
    from selfcorrect.generation import generate
    from selfcorrect.models import load_model
    from selfcorrect.tasks import get_task

    cfg = config_from_dict(cfg_dict)
    t0 = time.time()
    use_gpu = torch.cuda.is_available() and (cfg.eval.use_gpu or cfg.train.use_gpu)
    if not use_gpu:
        torch.set_num_threads(max(1, int(eval_resources(cfg)["num_cpus"])))
    tdir = trial_dir(output_dir, task_name, params)
    model, tokenizer = load_model(
        io.join(tdir, "model"),
        dtype=torch.bfloat16 if use_gpu else torch.float32,
        device="cuda" if use_gpu else "cpu",
    )
    task = get_task(task_name, **cfg.task_options(task_name))
    test = io.read_parquet(
        io.join(output_dir, task_name, "data", "test.parquet"), required=DATA_COLUMNS
    )
    problems = load_problems(task, test)
    metrics: dict[str, Any] = {}
    for key, clean in (("val_loss", False), ("val_loss_clean", True)):
        examples = validation_examples(cfg, task, problems, params, clean=clean)
        metrics[key] = validation_loss(model, tokenizer, examples, params, cfg.model.max_length)
    if full:
        n = cfg.tune.eval_problems or cfg.eval.max_problems
        ecfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_problems=n))
        items = build_items(ecfg, task_name, output_dir, list(TRIAL_CONDITIONS))
        rows = expand_temperatures(items, task_name, f"tune/{params.name}", [0.0], cfg.seed)
        completions = generate(
            model,
            tokenizer,
            [r["prefix"] for r in rows],
            max_new_tokens=cfg.eval.max_new_tokens,
            temperature=0.0,
            seeds=[int(r["seed"]) for r in rows],
            batch_size=cfg.eval.batch_size,
        )
        df = sort_rows(rows_frame(score_items(task, rows, completions)))
        io.write_parquet(io.join(tdir, "eval.parquet"), df)
        metrics.update(summary_metrics(summarize(df)))
    metrics["eval_seconds"] = round(time.time() - t0, 2)
    return metrics


def run_trial(
    config: dict[str, Any],
    cfg_dict: dict[str, Any],
    task: str,
    output_dir: str,
    console_spec: dict[str, Any] | None = None,
) -> None:
    """The Tune function trainable: train (Ray Train) and evaluate (Ray task) segment by
    segment, reporting the validation loss after each (ASHA's rungs), then remember the result.

    console_spec: the tune stage's log and progress file (quiet mode; ``selfcorrect.console``).
    """
    import ray
    import ray.tune

    console.attach_worker(console_spec)
    progress = console.Progress(console_spec)
    cfg = config_from_dict(cfg_dict)
    params = trial_params(cfg, config)
    tdir = trial_dir(output_dir, task, params)
    done_path = io.join(tdir, RESULT_FILE)
    th = trial_hash(cfg, task, params)
    if io.exists(done_path):
        done = io.read_json(done_path)
        if done.get("trial_hash") == th:
            print(f"[tune] {task}/{params.name}: finished earlier, reporting its result")
            progress.add(1)
            ray.tune.report(done["metrics"])
            return
    started_at = time.time()
    if trains_in_trial(cfg, output_dir):
        # The trial holds its worker's cores and evaluates on them, in this process.
        def evaluate(full: bool) -> dict[str, Any]:
            return evaluate_trial(cfg_dict, task, output_dir, params, full=full)
    else:
        # Outside the trial's placement group (which holds only the driver's memory): the
        # evaluation takes the cores its training just released.
        ev = ray.remote(evaluate_trial).options(
            scheduling_strategy="DEFAULT", **eval_resources(cfg)
        )

        def evaluate(full: bool) -> dict[str, Any]:
            return ray.get(ev.remote(cfg_dict, task, output_dir, params, full=full))

    ends = segment_ends(cfg)
    train_seconds = 0.0
    for i, stop_at in enumerate(ends):
        last = i == len(ends) - 1
        t0 = time.time()
        train = train_trial_model(cfg, task, output_dir, params, stop_at)
        train_seconds += time.time() - t0
        metrics = evaluate(full=last)
        metrics.update(
            trial=params.name if last else None,
            **dataclasses.asdict(params),
            step=stop_at,
            max_steps=cfg.tune.max_steps,
            init=cfg.tune.init,
            train_loss=_train_loss(train),
            train_seconds=round(train_seconds, 2),
            model_path=io.join(tdir, "model"),
            started_at=started_at,
            finished_at=time.time(),
        )
        if last:
            io.write_json(done_path, {"trial_hash": th, "metrics": metrics})
            progress.add(1)
        ray.tune.report(metrics)


def _train_loss(train_metrics: dict) -> float | None:
    for k in ("loss", "train_loss"):
        if isinstance(train_metrics.get(k), (int, float)):
            return float(train_metrics[k])
    return None


# ---------------------------------------------------------------------------
# The sweep of one task
# ---------------------------------------------------------------------------


def make_tuner(cfg: Config, task: str, output_dir: str, resources: dict[str, float]) -> Any:
    """A fresh Tuner, or the interrupted experiment of this config restored."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            cfg_dict=cfg.to_dict(),
            task=task,
            output_dir=output_dir,
            console_spec=console.worker_spec(),  # quiet mode: trials log to the stage's log
        ),
        trial_function_resources(cfg, output_dir),
    )
    storage, name = experiment_storage(output_dir, task), experiment_name(cfg, task)
    path = io.join(storage, name)
    if tune.Tuner.can_restore(path):
        print(f"[tune] {task}: resuming the interrupted sweep in {path}")
        # Unfinished trials resume; errored trials are retried (they may have died with the driver).
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            num_samples=num_samples(cfg),
            search_alg=search_alg(cfg),
            scheduler=scheduler(cfg),
            max_concurrent_trials=max_concurrent(cfg, resources),
            trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}",
            # A finished trial's process takes the next trial: no new process, imports and
            # Ray actor per trial (3-8 s each on a 2-core machine). Trials share no state:
            # each seeds, loads and builds everything it uses from its own config.
            reuse_actors=cfg.tune.reuse_actors,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
            verbose=0 if console.quiet() else 1,  # quiet: our progress bar counts the trials
            # Each trial an MLflow run under the <task>/tune run (rayjobs.tracking).
            callbacks=tracking.tune_callbacks(cfg, output_dir, task, sweep_hash(cfg, task)) or [],
        ),
    )


def sweep(cfg: Config, task: str, output_dir: str) -> pd.DataFrame:
    """Run (or resume) the sweep of one task; returns the results table (not yet written)."""
    import ray

    check_space(cfg)
    test = io.join(output_dir, task, "data", "test.parquet")
    if not io.exists(test):
        raise FileNotFoundError(
            f"tune needs {test}; run the data stage first (python -m rayjobs.data)"
        )
    console.add_total(_trial_count(cfg))  # the stage's progress bar counts finished trials
    with _SWEEP_LOCK:
        tuner = make_tuner(cfg, task, output_dir, ray.cluster_resources())
        grid = tuner.fit()
    records = []
    for result in grid:
        records.append(
            {
                "config": result.config,
                "metrics": result.metrics,
                "trial_id": (result.metrics or {}).get("trial_id"),
                "error": result.error,
                "status": "error" if result.error else _status(result.metrics),
            }
        )
    return results_table(task, records)


def _trial_count(cfg: Config) -> int:
    """How many trials the sweep runs (grid: every point times ``num_samples``)."""
    from selfcorrect.tune import swept_lists

    if cfg.tune.search != "grid":
        return cfg.tune.num_samples
    n = cfg.tune.num_samples
    for values in swept_lists(cfg).values():
        n *= len(values)
    return n


def _status(metrics: dict | None) -> str:
    """done: trained and evaluated; stopped: ASHA ended it before evaluation."""
    return "done" if metrics and metrics.get("trial") is not None else "stopped"


def write_results(output_dir: str, task: str, df: pd.DataFrame) -> list[str]:
    """results.parquet and one PNG per metric; returns the paths (relative to the output dir)."""
    rel = [f"{task}/tune/results.parquet"]
    io.write_parquet(io.join(output_dir, rel[0]), df)
    for metric in PLOT_METRICS:
        fig = plot_metric(df, metric, task)
        if fig is None:
            continue
        r = f"{task}/tune/{plot_name(metric)}"
        io.write_bytes(io.join(output_dir, r), figure_png(fig))
        rel.append(r)
    return rel


def run(ctx: JobContext) -> list[str]:
    """Sweep every task (skipping tasks whose sweep is done for this config); returns paths."""
    cfg = ctx.cfg
    if not cfg.tune.enabled:
        print("[tune] disabled (tune.enabled=false)")
        return []
    check_space(cfg)
    init_ray(cfg)
    written: list[str] = []
    for task in cfg.tasks:

        def do(rec: dict, task: str = task) -> None:
            t0 = time.time()
            df = sweep(cfg, task, ctx.output_dir)
            rec["artifacts"] += write_results(ctx.output_dir, task, df)
            failed = df[df["status"] == "error"]
            print(
                f"[tune] {task}: {len(df)} trials ({len(failed)} failed) in "
                f"{time.time() - t0:.0f}s -> {ctx.path(task, 'tune', 'results.parquet')}"
            )
            if len(failed) == len(df):
                raise RuntimeError(
                    f"every tune trial of {task} failed; first error: {failed['error'].iloc[0]}"
                )

        run_stage(ctx, f"{task}/tune", sweep_hash(cfg, task), do)
        written.append(ctx.path(task, "tune", "results.parquet"))
    return written


@job_main
def main(argv: list[str] | None = None) -> None:
    ctx = parse_args(__doc__, argv)
    check_space(ctx.cfg)
    save_resolved_config(ctx)
    paths = run(ctx)
    print(f"tune written: {', '.join(paths) or 'nothing'} (+ <metric>-vs-injection-rate.png)")


if __name__ == "__main__":
    main()
