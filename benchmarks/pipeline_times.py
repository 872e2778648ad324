"""Per-stage wall time of an existing pipeline run, read from its ``manifest.json``.

The ``tiny`` pipeline takes ~30 minutes, too long to rerun inside ``python -m benchmarks``;
its manifest records ``seconds`` per stage and, after a full run, per step.
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
    stages = {
        k: {"seconds": v.get("seconds"), "status": v.get("status")}
        for k, v in m.get("stages", {}).items()
    }
    pipe = m.get("pipeline", {})
    return {
        "found": True,
        "run_dir": run_dir,
        "stages": stages,
        "steps": pipe.get("steps", {}),
        "total_seconds": pipe.get("total_seconds"),
        "finished": pipe.get("finished"),
    }
