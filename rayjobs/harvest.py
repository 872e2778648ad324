"""Stage `harvest`: a model's own first errors on train/test problems, with Ray Data.

python -m rayjobs.harvest --config configs/tiny.yaml --output-dir runs/tiny

problems Parquet -> requests (problem x sample, each with its own seed) ->
``map_batches`` over a fixed actor pool (one model copy per actor, batched
KV-cached generation) -> parse + verify -> ``<task>/harvest/<model>-<split>.parquet``
(one row per first wrong step) and ``<model>-<split>-outcomes.parquet`` (one row
per sample: correct, first-error index), so accuracy and error rates come from
the same pass. A crashed actor is restarted by Ray Data and its batches re-run;
the driver checks that no sample is lost or duplicated before writing.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from rayjobs.common import (
    JobContext,
    init_ray,
    job_main,
    parse_args,
    save_resolved_config,
    stages_in_one_pass,
)
from selfcorrect import console, io
from selfcorrect.config import Config
from selfcorrect.data import DATA_COLUMNS
from selfcorrect.generation import map_generate
from selfcorrect.harvest import (
    check_complete,
    requests_table,
    score_batch,
    split_results,
    summarize,
)
from selfcorrect.tasks import get_task


def harvest_paths(task_name: str, model_name: str, split: str) -> tuple[str, str]:
    """Relative paths of (error records, per-sample outcomes)."""
    base = f"{task_name}/harvest/{model_name}-{split}"
    return f"{base}.parquet", f"{base}-outcomes.parquet"


def model_fingerprint(model_path: str) -> str:
    """Changes whenever the model directory is rewritten (retraining reruns the harvest)."""
    p = Path(model_path)
    if not p.is_dir():
        return model_path  # a hub id: its name is its identity
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def harvest(
    cfg: Config,
    task_name: str,
    model_path: str,
    model_name: str,
    split: str,
    output_dir: str,
    *,
    actor_cls: type | None = None,
) -> dict[str, Any]:
    """Harvest ``model_name``'s first errors on ``split``; writes both Parquet files atomically.

    Returns a summary (accuracy, n_errors, error types, paths). ``actor_cls``
    replaces ``GenerationActor`` (fault-injection tests).
    """
    return harvest_splits(
        cfg, task_name, model_path, model_name, [split], output_dir, actor_cls=actor_cls
    )[split]


def harvest_splits(
    cfg: Config,
    task_name: str,
    model_path: str,
    model_name: str,
    splits: list[str],
    output_dir: str,
    *,
    actor_cls: type | None = None,
) -> dict[str, dict[str, Any]]:
    """``harvest`` for several splits in ONE Ray Data pass: one actor pool (and one model
    load per actor) instead of one per split, which on a small model is most of the time.
    Returns split -> summary; each split's files are written as ``harvest`` writes them."""
    import ray

    hc = cfg.harvest
    task = get_task(task_name, **cfg.task_options(task_name))
    requests, blocks = {}, []
    bs = hc.batch_size
    for split in splits:
        problems = io.read_parquet(
            io.join(output_dir, task_name, "data", f"{split}.parquet"), required=DATA_COLUMNS
        )
        if hc.max_problems:
            problems = problems.slice(0, hc.max_problems)
        req = requests_table(
            problems,
            samples_per_problem=hc.samples_per_problem,
            temperature=hc.temperature,
            seed=cfg.seed,
        )
        requests[split] = req
        req = req.append_column("split", pa.array([split] * req.num_rows, pa.string()))
        # One block per generation batch (each of one split), so every actor gets work.
        blocks += [req.slice(i, bs) for i in range(0, req.num_rows, bs)]
    t0 = time.time()
    console.add_total(sum(r.num_rows for r in requests.values()))  # the bar counts rows
    ds = ray.data.from_arrow(blocks)
    ds = map_generate(
        ds,
        # Actors may run elsewhere (another cwd or node): give them an absolute local path.
        model_path
        if io.is_uri(model_path) or not os.path.exists(model_path)
        else os.path.abspath(model_path),
        max_new_tokens=hc.max_new_tokens,
        batch_size=bs,
        num_actors=hc.num_actors,
        actor_cls=actor_cls,
    )
    ds = ds.map_batches(
        score_batch,
        batch_size=bs,
        batch_format="numpy",
        fn_kwargs={"task": task, "model_name": model_name},
        # Verifying is light; with zero CPUs it never waits behind a pool that holds every core.
        num_cpus=0,
    )
    scored = ds.take_all()
    seconds = round(time.time() - t0, 2)
    summaries = {}
    for split in splits:
        errors, outcomes = split_results([r for r in scored if r["split"] == split])
        check_complete(outcomes, requests[split])
        rel_err, rel_out = harvest_paths(task_name, model_name, split)
        io.write_parquet(io.join(output_dir, rel_err), errors)
        io.write_parquet(io.join(output_dir, rel_out), outcomes)
        summary = summarize(errors, outcomes)
        summary.update(
            task=task_name,
            model=model_name,
            split=split,
            seconds=seconds,
            artifacts=[rel_err, rel_out],
        )
        print(
            f"[harvest] {task_name}/{model_name}/{split}: {summary['n_samples']} samples, "
            f"accuracy {summary['accuracy']:.3f}, {summary['n_errors']} errors "
            f"{summary['error_types']} in {seconds}s (all splits) -> {rel_err}, {rel_out}"
        )
        summaries[split] = summary
    return summaries


def harvest_hash(cfg: Config, task_name: str, model_path: str) -> str:
    h = hashlib.sha256()
    h.update(cfg.section_hash("seed", task_name, "data", "harvest", clean=True).encode())
    h.update(model_fingerprint(model_path).encode())
    return h.hexdigest()[:16]


def run(ctx: JobContext) -> None:
    """Harvest the FT model of every task on every split in ``harvest.splits``: the splits
    still to do in one pass, each recorded in the manifest as its own stage."""
    init_ray(ctx.cfg)
    for task_name in ctx.cfg.tasks:
        model_path = ctx.path(task_name, "models", "ft")
        if not io.is_uri(model_path) and not os.path.isdir(model_path):
            raise FileNotFoundError(
                f"no FT model at {model_path}; train it first: python -m rayjobs.train "
                f"--output-dir {ctx.output_dir}"
            )
        h = harvest_hash(ctx.cfg, task_name, model_path)
        keys = {split: f"{task_name}/harvest/ft-{split}" for split in ctx.cfg.harvest.splits}
        # Quiet mode: one log for the pass, logs/<task>/harvest/ft-train+test.log.
        scope = f"{task_name}/harvest/ft-" + "+".join(keys)
        with stages_in_one_pass(ctx, {k: h for k in keys.values()}, scope) as recs:
            pending = [split for split, key in keys.items() if key in recs]
            if not pending:
                continue
            summaries = harvest_splits(
                ctx.cfg, task_name, model_path, "ft", pending, ctx.output_dir
            )
            for split in pending:
                recs[keys[split]]["artifacts"].extend(summaries[split].pop("artifacts"))
                recs[keys[split]]["summary"] = summaries[split]


@job_main
def main(argv: list[str] | None = None) -> None:
    ctx = parse_args(__doc__, argv)
    save_resolved_config(ctx)
    run(ctx)
    print(f"harvest written under {ctx.output_dir}/<task>/harvest/")


if __name__ == "__main__":
    main()
