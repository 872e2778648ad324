"""Stage `report`: every result of a run -> report.md + figures/*.png (local, no Ray needed).

python -m rayjobs.report --output-dir runs/tiny

Redone whenever any other stage in manifest.json finished again since the last report.
"""

from __future__ import annotations

import hashlib
import json

from rayjobs.common import (
    JobContext,
    hold_output_dir,
    job_main,
    parse_args,
    read_manifest,
    run_stage,
)
from selfcorrect import io
from selfcorrect.report import write_report


def report_hash(ctx: JobContext) -> str:
    """Changes whenever an upstream stage was (re)done: the report reflects the latest outputs."""
    stages = read_manifest(ctx)["stages"]
    upstream = {
        k: [v.get("status"), v.get("config_hash"), v.get("finished")]
        for k, v in sorted(stages.items())
        if k != "report"
    }
    return hashlib.sha256(json.dumps(upstream, sort_keys=True).encode()).hexdigest()[:16]


def run(ctx: JobContext) -> str:
    """Write the report; returns the path of report.md."""

    def build(rec: dict) -> None:
        write_report(ctx.output_dir)
        rec["artifacts"].append("report.md")

    run_stage(ctx, "report", report_hash(ctx), build)
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
