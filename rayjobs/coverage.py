"""Stage `coverage`: how often the synthetic injector reproduces a model's real errors.

python -m rayjobs.coverage --config configs/tiny.yaml --output-dir runs/tiny

For every error in ``<task>/harvest/<model>-<split>.parquet``: ``coverage.n_samples``
(10,000 by default) synthetic errors at the same state, vectorised, in parallel
over errors with Ray Data -> ``<task>/coverage/<model>.parquet`` (one row per
error: n_exact, covered, p_exact, p_exact_analytic) and
``<task>/coverage/<model>-summary.parquet`` (coverage rate overall and per type
with Wilson 95% intervals; on-policy vs synthetic type histogram).
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from rayjobs.common import (
    JobContext,
    init_ray,
    job_main,
    parse_args,
    run_stage,
    save_resolved_config,
)
from selfcorrect import io
from selfcorrect.config import Config
from selfcorrect.coverage import coverage_batch, coverage_schema, summarize_coverage
from selfcorrect.harvest import HARVEST_COLUMNS
from selfcorrect.tasks import get_task

NEEDED = ["error_id", "prompt", "prefix_steps", "wrong_step", "error_type", "task", "model"]


def coverage_paths(task_name: str, model_name: str) -> tuple[str, str]:
    base = f"{task_name}/coverage/{model_name}"
    return f"{base}.parquet", f"{base}-summary.parquet"


def run_coverage(
    errors: pa.Table,
    task_name: str,
    cfg: Config,
    *,
    n_blocks: int | None = None,
) -> pa.Table:
    """Per-error coverage of a harvest table, parallel over errors with Ray Data."""
    import ray

    task = get_task(task_name, **cfg.task_options(task_name))
    if errors.num_rows == 0:
        return coverage_schema(task).empty_table()
    cols = errors.select([*NEEDED, "step_index"])
    if n_blocks is None:
        cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
        n_blocks = max(1, min(cols.num_rows // 50 or 1, 4 * cpus))
    size = -(-cols.num_rows // n_blocks)
    blocks = [cols.slice(i, size) for i in range(0, cols.num_rows, size)]
    ds = ray.data.from_arrow(blocks).map_batches(
        coverage_batch,
        batch_size=None,  # one block = one task: per-error RNG streams make this order-free
        batch_format="numpy",
        fn_kwargs={
            "task": task,
            "n_samples": cfg.coverage.n_samples,
            "seed": cfg.seed,
            "weights": cfg.error_weights(task_name),
        },
        num_cpus=1,
    )
    rows = ds.take_all()
    table = pa.Table.from_pylist(rows, schema=coverage_schema(task))
    return table.sort_by("error_id")


def coverage(
    cfg: Config, task_name: str, model_name: str, output_dir: str, split: str = "test"
) -> dict[str, Any]:
    """Coverage of ``model_name``'s harvested errors on ``split``; writes both Parquet files."""
    src = io.join(output_dir, task_name, "harvest", f"{model_name}-{split}.parquet")
    if not io.exists(src):
        raise FileNotFoundError(
            f"{src} does not exist; harvest it first (python -m rayjobs.harvest with "
            f"harvest.splits including {split!r})"
        )
    errors = io.read_parquet(src, required=[c for c in HARVEST_COLUMNS if c in NEEDED])
    t0 = time.time()
    table = run_coverage(errors, task_name, cfg)
    task = get_task(task_name, **cfg.task_options(task_name))
    summary = summarize_coverage(table, task, model_name)
    rel, rel_sum = coverage_paths(task_name, model_name)
    io.write_parquet(io.join(output_dir, rel), table)
    io.write_parquet(io.join(output_dir, rel_sum), summary)
    overall = summary.slice(0, 1).to_pylist()[0]
    secs = round(time.time() - t0, 2)
    rate = overall["coverage_rate"]
    print(
        f"[coverage] {task_name}/{model_name}: {table.num_rows} errors x "
        f"{cfg.coverage.n_samples} samples in {secs}s, coverage "
        f"{'n/a' if rate is None else f'{rate:.3f}'} -> {rel}, {rel_sum}"
    )
    return {
        "task": task_name,
        "model": model_name,
        "split": split,
        "n_errors": table.num_rows,
        "coverage_rate": rate,
        "seconds": secs,
        "artifacts": [rel, rel_sum],
    }


def run(ctx: JobContext) -> None:
    """Coverage of the FT model's test-split errors (train split if test was not harvested)."""
    init_ray(ctx.cfg)
    split = coverage_split(ctx.cfg)
    for task_name in ctx.cfg.tasks:

        def body(rec: dict, task_name: str = task_name) -> None:
            summary = coverage(ctx.cfg, task_name, "ft", ctx.output_dir, split)
            rec["artifacts"].extend(summary.pop("artifacts"))
            rec["summary"] = summary

        run_stage(ctx, f"{task_name}/coverage/ft", coverage_hash(ctx, task_name), body)


def coverage_split(cfg: Config) -> str:
    """The harvested split whose errors coverage measures: test, else the first harvested."""
    return "test" if "test" in cfg.harvest.splits else cfg.harvest.splits[0]


def coverage_hash(ctx: JobContext, task_name: str) -> str:
    """Changes with the injector config or the harvest output coverage reads."""
    from rayjobs.harvest import harvest_paths

    src = ctx.path(harvest_paths(task_name, "ft", coverage_split(ctx.cfg))[0])
    return ctx.cfg.section_hash("seed", task_name, "coverage") + (
        _file_stamp(src) if io.exists(src) else ""
    )


def _file_stamp(path: str) -> str:
    import hashlib

    return hashlib.sha256(io.read_bytes(path)).hexdigest()[:16]


@job_main
def main(argv: list[str] | None = None) -> None:
    ctx = parse_args(__doc__, argv)
    save_resolved_config(ctx)
    run(ctx)
    print(f"coverage written under {ctx.output_dir}/<task>/coverage/")


if __name__ == "__main__":
    main()
