"""Stage `report`: every result of a run -> report.md + figures/*.png (local, no Ray needed).

python -m rayjobs.report --output-dir runs/tiny

Redone whenever any other stage in manifest.json finished again since the last report.
The results of stages recorded under another config (a run directory reused with other
settings and ``--skip`` for those stages) are left out of the report and listed in it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import yaml

from rayjobs.common import (
    JobContext,
    hold_output_dir,
    job_main,
    parse_args,
    read_manifest,
    run_stage,
)
from selfcorrect import io
from selfcorrect.config import config_from_dict
from selfcorrect.report import write_report


def report_hash(ctx: JobContext, stale: dict[str, str]) -> str:
    """Changes whenever an upstream stage was (re)done, or what is stale changed: the report
    reflects the latest outputs of this config."""
    stages = read_manifest(ctx)["stages"]
    upstream = {
        k: [v.get("status"), v.get("config_hash"), v.get("finished")]
        for k, v in sorted(stages.items())
        if k != "report"
    }
    upstream["stale"] = sorted(stale)
    return hashlib.sha256(json.dumps(upstream, sort_keys=True).encode()).hexdigest()[:16]


def stale_stages(ctx: JobContext) -> dict[str, str]:
    """Harvest, coverage and tune records that are not this config's: stage key -> why and
    what to run (eval checks the models itself, ``rayjobs.evaluate.other_config_models``).
    Coverage and the sweep: their recorded hash is not the one this config gives them. The
    harvest: the FT model it read was retrained after it (its own hash fingerprints the model
    by file times, which a copied run directory does not keep)."""
    from rayjobs.coverage import coverage_hash
    from rayjobs.tune import sweep_hash

    # The run's config.yaml is the config its stages ran under (the pipeline writes it first;
    # a lone `rayjobs.report --output-dir` has no --config of its own to go by).
    if io.exists(ctx.path("config.yaml")):
        saved = yaml.safe_load(io.read_bytes(ctx.path("config.yaml")).decode()) or {}
        ctx = replace(ctx, cfg=config_from_dict(saved))
    cfg = ctx.cfg
    stages = read_manifest(ctx)["stages"]
    redo = "redo it: python -m rayjobs.{} --config <this config> --output-dir " + ctx.output_dir
    stale = {}
    for task in cfg.tasks:
        ft_done = stages.get(f"{task}/ft", {}).get("finished") or 0
        for split in cfg.harvest.splits:
            key = f"{task}/harvest/ft-{split}"
            if key in stages and (stages[key].get("started") or 0) < ft_done:
                stale[key] = f"FT was retrained after this harvest; {redo.format('harvest')}"
        want = {f"{task}/coverage/ft": (coverage_hash(ctx, task), "coverage")}
        if cfg.tune.enabled:
            want[f"{task}/tune"] = (sweep_hash(cfg, task), "tune")
        for key, (h, job) in want.items():
            if key in stages and stages[key].get("config_hash") != h:
                stale[key] = (
                    f"recorded under another config (hash {stages[key].get('config_hash')}, "
                    f"this config's {h}); {redo.format(job)}"
                )
    return stale


def run(ctx: JobContext) -> str:
    """Write the report; returns the path of report.md."""
    stale = stale_stages(ctx)

    def build(rec: dict) -> None:
        write_report(ctx.output_dir, stale=stale)
        rec["artifacts"].append("report.md")
        # For load_run in a notebook, which has no config: the same stages stay out while
        # their records are unchanged.
        stages = read_manifest(ctx)["stages"]
        rec["stale"] = {
            k: {"config_hash": stages[k].get("config_hash"), "why": why} for k, why in stale.items()
        }

    run_stage(ctx, "report", report_hash(ctx, stale), build)
    return io.join(ctx.output_dir, "report.md")


@job_main
def main(argv: list[str] | None = None) -> None:
    ctx = parse_args(__doc__, argv, lock=False)  # locked once it is known to exist
    if not io.exists(ctx.output_dir):
        raise FileNotFoundError(
            f"{ctx.output_dir} does not exist; pass --output-dir of a run "
            "(python -m rayjobs.pipeline writes one)"
        )
    hold_output_dir(ctx)
    path = run(ctx)
    print(f"report: {path}")


if __name__ == "__main__":
    main()
