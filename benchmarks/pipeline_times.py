"""Per-stage wall time of an existing pipeline run, read from its ``manifest.json``.

The ``tiny`` pipeline takes ~30 minutes, too long to rerun inside ``python -m benchmarks``;
its manifest records ``seconds`` per stage and, after a full run, per step. Training stages
also record Ray Train's start-up (``startup_s``, on the first model of a chain) and the
seconds of their optimizer steps (``compute_s``): the overhead share of training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def run(run_dir: str | None) -> dict[str, Any]:
    """Stage and step seconds from ``<run_dir>/manifest.json``; ``found: False`` without one."""
    if not run_dir:
        return {"found": False, "run_dir": None}
    p = Path(run_dir, "manifest.json")
    if not p.exists():
        return {"found": False, "run_dir": run_dir}
    m = json.loads(p.read_text())
    keep = ("seconds", "status", "startup_s", "compute_s")
    stages = {k: {f: v.get(f) for f in keep} for k, v in m.get("stages", {}).items()}
    pipe = m.get("pipeline", {})
    return {
        "found": True,
        "run_dir": run_dir,
        "stages": stages,
        "steps": pipe.get("steps", {}),
        "total_seconds": pipe.get("total_seconds"),
        "finished": pipe.get("finished"),
    }
