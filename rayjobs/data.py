"""Stage `data`: seed -> <task>/data/{train,test}.parquet.

python -m rayjobs.data --config configs/tiny.yaml --output-dir runs/tiny
"""

from __future__ import annotations

from rayjobs.common import JobContext, job_main, parse_args, run_stage, save_resolved_config
from selfcorrect import io
from selfcorrect.data import make_splits
from selfcorrect.tasks import get_task


def data_hash(ctx: JobContext, task: str) -> str:
    return ctx.cfg.section_hash("seed", task, "data", clean=True)


def run(ctx: JobContext) -> None:
    for name in ctx.cfg.tasks:

        def build(rec: dict, name: str = name) -> None:
            task = get_task(name, **ctx.cfg.task_options(name))
            splits = make_splits(task, ctx.cfg.data.n_train, ctx.cfg.data.n_test, ctx.cfg.seed)
            for split, table in splits.items():
                rel = f"{name}/data/{split}.parquet"
                io.write_parquet(ctx.path(rel), table)
                rec["artifacts"].append(rel)
            print(
                f"[data] {name}: {splits['train'].num_rows} train, {splits['test'].num_rows} test"
            )

        run_stage(ctx, f"{name}/data", data_hash(ctx, name), build)


@job_main
def main(argv: list[str] | None = None) -> None:
    ctx = parse_args(__doc__, argv)
    save_resolved_config(ctx)
    run(ctx)
    print(f"data written under {ctx.output_dir}/<task>/data/")


if __name__ == "__main__":
    main()
