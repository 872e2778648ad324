"""Stage `eval`: every trained model -> <task>/eval/<model>.parquet and eval_summary.parquet.

python -m rayjobs.evaluate --config configs/tiny.yaml --output-dir runs/tiny

Conditions (DESIGN 7): clean, synthetic, ft_errors, matched_synthetic, own_errors, at
every temperature of ``eval.temperatures``, on the same items for every model. The
continuations come from the one generation engine (``selfcorrect.generation``),
fanned out over a Ray Data actor pool; scoring is the pure code in
``selfcorrect.evaluate``. Same seed -> same items, same sampling seeds, same
numbers. Next to ``eval_summary.parquet`` the stage writes ``eval_gaps.parquet``: the
headline gap (synthetic minus own / FT / matched recognition) with 95% intervals.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from rayjobs.common import (
    JobContext,
    init_ray,
    job_main,
    parse_args,
    read_manifest,
    save_resolved_config,
    stages_in_one_pass,
)
from rayjobs.grpo import grpo_hash
from rayjobs.train import model_hash
from selfcorrect import console, io
from selfcorrect.config import Config
from selfcorrect.data import DATA_COLUMNS
from selfcorrect.evaluate import (
    CONDITIONS,
    clean_items,
    ft_error_items,
    generation_seed,
    matched_synthetic_items,
    rows_frame,
    score_items,
    sort_rows,
    summarize,
    synthetic_items,
)
from selfcorrect.stats import GAP_SCHEMA, gap_table
from selfcorrect.tasks import get_task, signal_line

HARVEST_COLUMNS = ["error_id", "problem_id", "prompt", "wrong_step", "error_type"]
FT_ERRORS_FILE = "ft-test.parquet"
FT_CONDITIONS = ("ft_errors", "matched_synthetic")  # the conditions built on the FT harvest


def eval_path(output_dir: str, task: str, model: str) -> str:
    return io.join(output_dir, task, "eval", f"{model}.parquet")


def ft_errors_path(output_dir: str, task: str) -> str:
    return io.join(output_dir, task, "harvest", FT_ERRORS_FILE)


# ---------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------


def build_items(
    cfg: Config, task_name: str, output_dir: str, conditions: Sequence[str]
) -> list[dict[str, Any]]:
    """Every item to continue, for the requested conditions (before the temperature sweep).

    ``own_errors`` is read off the free generations of ``clean``, so either one
    brings in the clean items.
    """
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad:
        raise ValueError(f"unknown eval conditions {bad}; choose from {list(CONDITIONS)}")
    task = get_task(task_name, **cfg.task_options(task_name))
    test = io.read_parquet(
        io.join(output_dir, task_name, "data", "test.parquet"), required=DATA_COLUMNS
    ).to_pylist()
    items: list[dict[str, Any]] = []
    if "clean" in conditions or "own_errors" in conditions:
        items += clean_items(test, cfg.eval.max_problems)
    if "synthetic" in conditions:
        items += synthetic_items(
            task, test, cfg.seed, cfg.eval.max_problems, cfg.error_weights(task_name)
        )
    ft_conds = [c for c in FT_CONDITIONS if c in conditions]
    if ft_conds:
        path = ft_errors_path(output_dir, task_name)
        if not io.exists(path):
            names = " and ".join(ft_conds)
            raise FileNotFoundError(
                f"condition {names} needs {path} (errors the FT model made on the test split); "
                f"run the harvest stage first (python -m rayjobs.harvest), or drop {names} "
                "from eval.conditions"
            )
        table = io.read_parquet(path, required=HARVEST_COLUMNS)
        if "prefix_steps" not in table.column_names and "prefix" not in table.column_names:
            raise io.CorruptFileError(
                f"{path} has neither 'prefix_steps' nor 'prefix'; rerun the harvest stage"
            )
        ft_items = ft_error_items(task, table.to_pylist(), cfg.seed, cfg.eval.max_errors)
        if "ft_errors" in conditions:
            items += ft_items
        if "matched_synthetic" in conditions:
            # The same (seeded) FT errors, so the two conditions are on the same states.
            items += matched_synthetic_items(task, ft_items, cfg.seed, cfg.error_weights(task_name))
    return items


def expand_temperatures(
    items: list[dict[str, Any]], task: str, model: str, temperatures: Sequence[float], seed: int
) -> list[dict[str, Any]]:
    """Items x temperatures, each with its own sampling seed (the same for every model)."""
    out = []
    for t in temperatures:
        for it in items:
            out.append(
                {
                    **it,
                    "task": task,
                    "model": model,
                    "temperature": float(t),
                    "seed": generation_seed(seed, task, it["item_id"], t),
                }
            )
    return out


# ---------------------------------------------------------------------------
# Generation over Ray Data (the shared engine)
# ---------------------------------------------------------------------------


def _local(path: str) -> str:
    """A model path the pool's actors can open (they may run in another cwd)."""
    return path if io.is_uri(path) else os.path.abspath(path)


def _n_blocks(n_rows: int, ev: Any) -> int:
    """Blocks of the feed: whole generation batches, a few per actor."""
    return max(1, min(math.ceil(n_rows / ev.batch_size), 4 * ev.num_actors))


def by_length(feed: list[dict[str, Any]], *text: str) -> list[dict[str, Any]]:
    """The feed grouped by model (in order of first appearance) and temperature, shortest
    text first within a group. Ray Data cuts consecutive rows into batches, and a batch
    pads to its longest row (left for generation, right for scoring): in item order the
    `tiny` sudoku eval's prompts were 43% padding, sorted 8%. Rows are matched back by
    ``key``; the completions stay the same (scores move by float rounding)."""
    first: dict[Any, int] = {}
    for r in feed:
        first.setdefault(r.get("model_path"), len(first))
    return sorted(
        feed,
        key=lambda r: (
            first[r.get("model_path")],
            r.get("temperature", 0.0),
            sum(len(r[c]) for c in text),
        ),
    )


def generate_completions(
    cfg: Config, model_path: str | None, rows: list[dict[str, Any]]
) -> list[str]:
    """Continue every row's ``prefix`` with its ``seed`` and ``temperature``, in input order.

    One model copy per actor (``GenerationActor``); rows are matched back by key,
    so the order Ray Data returns them in does not matter. ``model_path=None``: each row
    names its model in ``model_path`` (several models, one pass; rows grouped by model).
    """
    import ray

    from selfcorrect.generation import map_generate

    if not rows:
        return []
    ev = cfg.eval

    feed = [
        {"key": i, "prefix": r["prefix"], "seed": int(r["seed"]), "temperature": r["temperature"]}
        | ({} if model_path is not None else {"model_path": _local(r["model_path"])})
        for i, r in enumerate(rows)
    ]
    feed = by_length(feed, "prefix")
    console.add_total(len(feed))  # the stage's progress bar counts generated rows
    ds = map_generate(
        ray.data.from_items(feed, override_num_blocks=_n_blocks(len(feed), ev)),
        None if model_path is None else _local(model_path),
        max_new_tokens=ev.max_new_tokens,
        batch_size=ev.batch_size,
        num_actors=ev.num_actors,
        use_gpu=ev.use_gpu,
        cpus_per_actor=ev.cpus_per_actor,
    )
    out: list[str | None] = [None] * len(rows)
    for rec in ds.select_columns(["key", "completion"]).iter_rows():
        out[int(rec["key"])] = str(rec["completion"])
    missing = [i for i, c in enumerate(out) if c is None]
    if missing:
        raise RuntimeError(f"generation returned no completion for {len(missing)} rows")
    return [c for c in out if c is not None]


def add_step_surprise(
    cfg: Config, models: dict[str, str], rows: dict[str, list[dict[str, Any]]]
) -> None:
    """Teacher-forced scores of every error row of every model (name -> saved model dir;
    name -> its scored rows), all models in one pass on one actor pool (as their generations
    are); each distinct (model, prefix, step) is scored once:

    * ``wrong_step_surprise``: how surprising the wrong step was to that model after its
      prefix (``generation.step_surprise``);
    * ``signal_logp`` / ``paired_signal_logp``: the log-probability that the model writes its
      recognition signal (``signal_line``) next, after the wrong step / after the paired
      correct step at the same state (``paired_step``; ``generation.step_scores``).
      Recognition without the greedy threshold: ``summarize`` turns the pair into
      ``discrimination_rate``.
    """
    import ray

    from selfcorrect.generation import map_step_surprise

    keys = [
        (name, p, s)
        for name in models
        for p, s in sorted(
            {(r["prefix"], r["wrong_step"]) for r in rows[name] if r.get("wrong_step")}
            | {(r["prefix"], r["paired_step"]) for r in rows[name] if _paired(r)}
        )
    ]
    if not keys:
        return
    ev = cfg.eval
    feed = [
        {
            "key": i,
            "prefix": p,
            "step": s,
            "signal": signal_line(name),
            "model_path": _local(models[name]),
        }
        for i, (name, p, s) in enumerate(keys)
    ]
    feed = by_length(feed, "prefix", "step")
    console.add_total(len(feed))
    ds = map_step_surprise(
        ray.data.from_items(feed, override_num_blocks=_n_blocks(len(feed), ev)),
        None,
        batch_size=ev.batch_size,
        num_actors=ev.num_actors,
        use_gpu=ev.use_gpu,
        cpus_per_actor=ev.cpus_per_actor,
    )
    scores = {
        keys[int(rec["key"])]: (float(rec["surprise"]), float(rec["signal_logp"]))
        for rec in ds.select_columns(["key", "surprise", "signal_logp"]).iter_rows()
    }
    for name in models:
        for r in rows[name]:
            if r.get("wrong_step"):
                key = (name, r["prefix"], r["wrong_step"])
                r["wrong_step_surprise"], r["signal_logp"] = scores[key]
            if _paired(r):
                r["paired_signal_logp"] = scores[(name, r["prefix"], r["paired_step"])][1]


def _paired(row: dict[str, Any]) -> bool:
    """An error row with a correct step of its state to rank the wrong one against."""
    return bool(row.get("wrong_step")) and bool(row.get("paired_step"))


# ---------------------------------------------------------------------------
# One model
# ---------------------------------------------------------------------------


def evaluate_model(
    cfg: Config,
    task_name: str,
    model_path: str,
    model_name: str,
    output_dir: str,
    conditions: Sequence[str] | None = None,
    temperatures: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate one saved model on one task; writes ``<output_dir>/<task>/eval/<model_name>.parquet``.

    Reads ``<output_dir>/<task>/data/test.parquet`` (and ``harvest/ft-test.parquet``
    for ft_errors). Returns the summary rows (DESIGN 7 columns, aggregate rows with
    ``error_type == "all"`` plus one row per error type). Ray must be initialised.
    """
    return evaluate_models(
        cfg, task_name, {model_name: model_path}, output_dir, conditions, temperatures
    )[model_name]


def evaluate_models(
    cfg: Config,
    task_name: str,
    models: dict[str, str],
    output_dir: str,
    conditions: Sequence[str] | None = None,
    temperatures: Sequence[float] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``evaluate_model`` for several models (name -> saved model dir) of one task, their
    generations in ONE Ray Data pass: one actor pool for the task instead of one per model
    (on small models the pool's start-up was most of the stage). Every model gets the same
    items and sampling seeds, as before; returns name -> summary rows."""
    from selfcorrect.models import check_model_dir

    conditions = list(conditions if conditions is not None else cfg.eval.conditions)
    temperatures = [float(t) for t in (temperatures or cfg.eval.temperatures)]
    for model_path in models.values():
        if not io.exists(io.join(model_path, "config.json")):
            raise FileNotFoundError(
                f"no saved model at {model_path} (config.json missing); train it first "
                "(python -m rayjobs.train) or remove it from eval.models"
            )
        if not io.is_uri(model_path):
            check_model_dir(model_path)  # a corrupt model: one message, not an actor crash
    t0 = time.time()
    task = get_task(task_name, **cfg.task_options(task_name))
    items = build_items(cfg, task_name, output_dir, conditions)
    rows = {
        name: expand_temperatures(items, task_name, name, temperatures, cfg.seed) for name in models
    }
    for name, r in rows.items():
        print(
            f"[eval] {task_name}/{name}: {len(items)} items x {len(temperatures)} "
            f"temperatures = {len(r)} generations"
        )
    feed = [{**r, "model_path": models[name]} for name in models for r in rows[name]]
    completions = generate_completions(cfg, None, feed)
    keep = set(conditions) | ({"clean"} if "own_errors" in conditions else set())
    scored: dict[str, list[dict[str, Any]]] = {}
    start = 0
    for name in models:
        done = completions[start : start + len(rows[name])]
        start += len(rows[name])
        scored[name] = [r for r in score_items(task, rows[name], done) if r["condition"] in keep]
    if cfg.eval.surprise:
        add_step_surprise(cfg, models, scored)
    out: dict[str, list[dict[str, Any]]] = {}
    for name in models:
        df = sort_rows(rows_frame(scored[name]))
        path = eval_path(output_dir, task_name, name)
        io.write_parquet(path, df)
        summary = summarize(df, seed=cfg.seed)
        out[name] = summary[summary["condition"].isin(conditions)].to_dict("records")
        print(f"[eval] {task_name}/{name}: {len(df)} rows -> {path} ({time.time() - t0:.1f}s)")
    return out


# ---------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------


def _fingerprint(path: str) -> list[Any]:
    """Names, sizes and mtimes under ``path``: a changed model or harvest reruns eval."""
    if not io.exists(path):
        return []
    fs, p = (
        pafs.FileSystem.from_uri(path)
        if io.is_uri(path)
        else (pafs.LocalFileSystem(), os.path.abspath(path))
    )
    info = fs.get_file_info(p)
    infos = (
        fs.get_file_info(pafs.FileSelector(p, recursive=True))
        if info.type == pafs.FileType.Directory
        else [info]
    )
    return sorted(
        (i.path[len(p) :], i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File
    )


def eval_hash(ctx: JobContext, task: str, model: str) -> str:
    """What decides an eval result: seed, task, data, eval settings, the model and FT harvest."""
    cfg = ctx.cfg
    ev = {
        k: v
        for k, v in cfg.to_dict()["eval"].items()
        if k not in ("models", "num_actors", "batch_size", "use_gpu", "cpus_per_actor")
    }
    blob = {
        "sections": cfg.section_hash("seed", task, "data"),
        "eval": ev,
        "model": _fingerprint(ctx.path(task, "models", model)),
        "harvest": _fingerprint(ft_errors_path(ctx.output_dir, task))
        if any(c in cfg.eval.conditions for c in FT_CONDITIONS)
        else None,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run(ctx: JobContext) -> list[str]:
    """Evaluate every model of eval.models that exists; returns the summary paths written."""
    cfg = ctx.cfg
    saved = {
        task: [m for m in cfg.eval.models if io.exists(ctx.path(task, "models", m, "config.json"))]
        for task in cfg.tasks
    }
    stale = {task: other_config_models(ctx, task, saved[task]) for task in cfg.tasks}
    found = {task: [m for m in saved[task] if m not in stale[task]] for task in cfg.tasks}
    for task in cfg.tasks:
        for m, why in stale[task].items():
            print(
                f"[eval] {task}: not evaluating models/{m}: {why}. Train it with this config "
                f"(python -m rayjobs.train / rayjobs.grpo, --output-dir {ctx.output_dir}) or "
                "evaluate with the config that trained it; its earlier results stay on disk "
                "and leave this run's summary and report"
            )
    if not any(found.values()):
        raise FileNotFoundError(
            f"no model of eval.models={cfg.eval.models} trained with this config found under "
            f"{ctx.output_dir}/<task>/models/; run training first (python -m rayjobs.train)"
        )
    init_ray(cfg)
    written = []
    for task in cfg.tasks:
        skipped = [m for m in cfg.eval.models if m not in saved[task]]
        if skipped:
            print(f"[eval] {task}: no saved model for {skipped}, not evaluated")
        hashes = {f"{task}/eval/{m}": eval_hash(ctx, task, m) for m in found[task]}
        # One pass for every model still to evaluate, each its own manifest stage; quiet
        # mode logs it to logs/<task>/eval/<model>+<model>.log.
        scope = f"{task}/eval/" + "+".join(found[task])
        with stages_in_one_pass(ctx, hashes, scope) as recs:
            paths = {
                m: ctx.path(task, "models", m) for m in found[task] if f"{task}/eval/{m}" in recs
            }
            if paths:
                evaluate_models(cfg, task, paths, ctx.output_dir)
            for m in paths:
                recs[f"{task}/eval/{m}"]["artifacts"].append(f"{task}/eval/{m}.parquet")
        task_summary = []
        for model in found[task]:
            # The summary is a pure function of the item rows: rebuilt even for skipped stages.
            df = io.read_parquet(eval_path(ctx.output_dir, task, model)).to_pandas()
            s = summarize(df, seed=cfg.seed)
            task_summary.append(s[s["condition"].isin(cfg.eval.conditions)])
        if task_summary:
            s = pd.concat(task_summary, ignore_index=True)
            path = ctx.path(task, "eval", "summary.parquet")
            io.write_parquet(path, s)
            written.append(path)
    written.append(write_run_summary(ctx))
    return written


def other_config_models(ctx: JobContext, task: str, models: Sequence[str]) -> dict[str, str]:
    """model -> why, for the saved ``models`` whose manifest record says another config trained
    them (another hash, or a run that did not finish). A run directory reused with other
    training settings keeps the old models; evaluating them would put another experiment's
    rows into this run's summary. A model with no record (placed by hand) is evaluated."""
    stages = read_manifest(ctx)["stages"]
    out = {}
    for m in models:
        rec = stages.get(f"{task}/{m}")
        if rec is None:
            continue
        want = grpo_hash(ctx.cfg, task) if m == "grpo" else model_hash(ctx, task, m)
        if rec.get("status") != "done":
            out[m] = f"its training is recorded as {rec.get('status')!r}, not done"
        elif rec.get("config_hash") != want:
            out[m] = (
                f"it was trained under another config (manifest hash {rec.get('config_hash')}, "
                f"this config's {want})"
            )
    return out


GAPS_FILE = "eval_gaps.parquet"
_SUMMARY_LOCK = threading.Lock()  # the pipeline evaluates tasks in concurrent driver threads


def write_run_summary(ctx: JobContext) -> str:
    """``eval_summary.parquet`` from every ``<task>/eval/summary.parquet`` of the run's tasks,
    and ``eval_gaps.parquet`` (``selfcorrect.stats.gap_table``) from that summary.

    The run's tasks are those of its resolved ``config.yaml`` (the pipeline evaluates each
    task on a narrowed config, possibly at the same time): under the lock, whichever task
    finishes last sees every task's summary, so no task's rows are lost.
    """
    import yaml

    with _SUMMARY_LOCK:
        tasks: list[str] = []
        if io.exists(ctx.path("config.yaml")):
            run_cfg = yaml.safe_load(io.read_bytes(ctx.path("config.yaml")).decode()) or {}
            tasks = list(run_cfg.get("tasks") or [])
        tasks += [t for t in ctx.cfg.tasks if t not in tasks]
        frames = [
            io.read_parquet(ctx.path(t, "eval", "summary.parquet")).to_pandas()
            for t in tasks
            if io.exists(ctx.path(t, "eval", "summary.parquet"))
        ]
        path = ctx.path("eval_summary.parquet")
        summary = pd.concat(frames, ignore_index=True)
        io.write_parquet(path, summary)
        gaps = pa.Table.from_pandas(gap_table(summary), schema=GAP_SCHEMA, preserve_index=False)
        io.write_parquet(ctx.path(GAPS_FILE), gaps)
        return path


@job_main
def main(argv: list[str] | None = None) -> None:
    ctx = parse_args(__doc__, argv)
    save_resolved_config(ctx)
    paths = run(ctx)
    print(f"eval written: {', '.join(paths)} and <task>/eval/<model>.parquet")


if __name__ == "__main__":
    main()
