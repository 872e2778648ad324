"""Stage `base`: <task>/data/train.parquet -> <task>/models/base/, the shared clean base alone.

python -m rayjobs.base --config configs/premise-multiplication.yaml --output-dir runs/premise

The base is normally the first model of a task's FT chain (``rayjobs.train``: one Ray
Train run trains the base, then FT). The pipeline trains it on its own when the methods
need nothing of FT's (no hybrid, which reads FT's harvest): then the methods' chain starts
from the base beside FT's instead of after it, and a one-task run keeps a second core busy.
"""

from __future__ import annotations

from rayjobs.common import (
    JobContext,
    init_ray,
    job_main,
    parse_args,
    save_resolved_config,
    stage_done,
)
from rayjobs.train import base_job, check_shape, train_pending
from selfcorrect import console


def run(ctx: JobContext) -> None:
    """Train every task's base model that is not already published for this config."""
    check_shape(ctx.cfg)
    for name in ctx.cfg.tasks:
        job = base_job(ctx, name)
        key = f"{name}/base"
        if job is None:
            console.note(f"[skip] {key}: train.base_steps is 0, the methods start from scratch")
        elif stage_done(ctx, key, job.model_hash):
            console.note(f"[skip] {key}: outputs exist for this config")
        else:
            init_ray(ctx.cfg)
            train_pending(ctx, name, [(key, job)])


@job_main
def main(argv: list[str] | None = None) -> None:
    ctx = parse_args(__doc__, argv)
    save_resolved_config(ctx)
    run(ctx)
    print(f"base models written under {ctx.output_dir}/<task>/models/base/")


if __name__ == "__main__":
    main()
