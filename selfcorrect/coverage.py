"""Coverage: could the synthetic injector have produced the errors a model really makes?

For each harvested error, draw ``n_samples`` synthetic errors at the same state
(the same correct step / grid) with the vectorised injector and count exact
matches, comparing the task's integer step codes (``task.encode_step``) rather
than strings. ``p_exact_analytic`` is the injector's exact probability of the
wrong step by enumeration (``error_probability``); the sampled ``p_exact`` must
agree with it within its binomial interval, which tests both.

Pure functions (no Ray): ``rayjobs/coverage.py`` runs ``coverage_batch`` over
the errors with Ray Data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa

from selfcorrect.data import stream_rng
from selfcorrect.tasks import OTHER, Task, applicable_weights, error_probability, sample_errors

COVERAGE_COLUMNS = [
    "error_id",
    "n_samples",
    "n_exact",
    "covered",
    "p_exact",
    "p_exact_analytic",
    "error_type",
    "p_exact_lo",
    "p_exact_hi",
    "encodable",
    "task",
    "model",
    "step_index",
]


def wilson(k: float, n: float, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default); (nan, nan) if n = 0."""
    if n <= 0:
        return math.nan, math.nan
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k <= 0 else max(0.0, centre - half)
    hi = 1.0 if k >= n else min(1.0, centre + half)
    return lo, hi


def state_at(task: Task, prompt: str, prefix_steps: list[str]) -> Any:
    """Replay the model's own correct steps: the state its wrong step was written in."""
    problem = task.parse_prompt(prompt)
    state = task.initial_state(problem)
    for step in prefix_steps:
        state = task.apply_step(state, step)
    return state


class _OneStateTask:
    """Delegates to a task but computes ``type_distributions`` once per state.

    ``sample_errors``, ``applicable_weights`` and ``error_probability`` each ask
    for the (enumerated, Python-heavy) distributions of the same state; sharing
    one copy makes coverage ~3x faster without touching the task code.
    """

    def __init__(self, task: Task) -> None:
        self._task = task
        self._state: Any = None
        self._dists: dict[str, dict[int, float]] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def type_distributions(self, state: Any) -> dict[str, dict[int, float]]:
        if self._dists is None or self._state != state:
            self._state, self._dists = state, self._task.type_distributions(state)
        return self._dists


def error_coverage(
    task: Task,
    state: Any,
    wrong_step: str,
    n_samples: int,
    rng: np.random.Generator,
    weights: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Sample ``n_samples`` synthetic errors at ``state`` and count exact hits of ``wrong_step``.

    Returns counts, the analytic probability (None when no injector type applies
    here), and how many samples each synthetic type contributed (for the histogram).
    """
    task = task if isinstance(task, _OneStateTask) else _OneStateTask(task)
    code = task.encode_step(state, wrong_step)
    live = applicable_weights(task, state, weights)
    codes, tidx = sample_errors(task, state, n_samples, rng, weights)  # int64[n], int16[n]
    n = int(codes.shape[0])
    n_exact = int(np.count_nonzero(codes == code)) if code is not None else 0
    analytic = error_probability(task, state, wrong_step, weights) if live else None
    type_counts = np.bincount(tidx.astype(np.int64), minlength=len(task.error_types))
    return {
        "n_samples": n,
        "n_exact": n_exact,
        "encodable": code is not None,
        "p_exact_analytic": analytic,
        "type_counts": type_counts.tolist(),
    }


def coverage_schema(task: Task) -> pa.Schema:
    return pa.schema(
        [
            ("error_id", pa.string()),
            ("n_samples", pa.int64()),
            ("n_exact", pa.int64()),
            ("covered", pa.bool_()),
            ("p_exact", pa.float64()),
            ("p_exact_analytic", pa.float64()),
            ("error_type", pa.string()),
            ("p_exact_lo", pa.float64()),
            ("p_exact_hi", pa.float64()),
            ("encodable", pa.bool_()),
            ("task", pa.string()),
            ("model", pa.string()),
            ("step_index", pa.int64()),
        ]
        + [(f"n_synthetic_{t}", pa.int64()) for t in task.error_types]
    )


def coverage_batch(
    batch: dict[str, np.ndarray],
    task: Task,
    n_samples: int,
    seed: int,
    weights: dict[str, float] | None = None,
) -> pa.Table:
    """Harvest rows -> coverage rows. Each error has its own RNG stream (seed, error_id),
    so results do not depend on how Ray Data batches or orders the errors."""
    memo = _OneStateTask(task)
    rows = []
    for i in range(len(batch["error_id"])):
        eid = str(batch["error_id"][i])
        state = state_at(task, str(batch["prompt"][i]), [str(s) for s in batch["prefix_steps"][i]])
        res = error_coverage(
            memo,
            state,
            str(batch["wrong_step"][i]),
            n_samples,
            stream_rng(seed, "coverage", eid),
            weights,
        )
        n, k = res["n_samples"], res["n_exact"]
        lo, hi = wilson(k, n)
        rows.append(
            {
                "error_id": eid,
                "n_samples": n,
                "n_exact": k,
                "covered": k > 0,
                "p_exact": k / n if n else None,
                "p_exact_analytic": res["p_exact_analytic"],
                "error_type": str(batch["error_type"][i]),
                "p_exact_lo": lo if n else None,
                "p_exact_hi": hi if n else None,
                "encodable": res["encodable"],
                "task": str(batch["task"][i]),
                "model": str(batch["model"][i]),
                "step_index": int(batch["step_index"][i]),
                **{
                    f"n_synthetic_{t}": int(c)
                    for t, c in zip(task.error_types, res["type_counts"], strict=True)
                },
            }
        )
    return pa.Table.from_pylist(rows, schema=coverage_schema(task))


SUMMARY_COLUMNS = [
    "task",
    "model",
    "error_type",
    "n_errors",
    "n_covered",
    "coverage_rate",
    "coverage_lo",
    "coverage_hi",
    "mean_p_exact",
    "onpolicy_frac",
    "synthetic_frac",
]


def summarize_coverage(table: pa.Table, task: Task, model: str) -> pa.Table:
    """Coverage rate overall (``error_type == 'all'``) and per on-policy type, with Wilson 95%
    intervals, plus the type histogram: the share of on-policy errors classified as each type
    next to the share of synthetic samples the injector drew of that type (at the same states).
    """
    types = table.column("error_type").to_pylist()
    covered = np.array(table.column("covered").to_pylist(), dtype=bool)
    p = np.array(
        [np.nan if v is None else v for v in table.column("p_exact").to_pylist()], dtype=float
    )
    syn = {t: int(np.sum(table.column(f"n_synthetic_{t}").to_numpy())) for t in task.error_types}
    syn_total = sum(syn.values())
    n_all = len(types)
    rows = []
    for group in ["all", *task.error_types, OTHER]:
        sel = (
            np.ones(n_all, bool)
            if group == "all"
            else np.array([t == group for t in types], dtype=bool)  # bool even when empty
        )
        n = int(sel.sum())
        k = int(covered[sel].sum())
        lo, hi = wilson(k, n)
        if group == "all":
            syn_frac = 1.0 if syn_total else 0.0
        else:
            syn_frac = syn.get(group, 0) / syn_total if syn_total else 0.0
        rows.append(
            {
                "task": task.name,
                "model": model,
                "error_type": group,
                "n_errors": n,
                "n_covered": k,
                "coverage_rate": k / n if n else None,
                "coverage_lo": lo if n else None,
                "coverage_hi": hi if n else None,
                "mean_p_exact": float(np.nanmean(p[sel]))
                if n and np.any(~np.isnan(p[sel]))
                else None,
                "onpolicy_frac": n / n_all if n_all else 0.0,
                "synthetic_frac": syn_frac,
            }
        )
    return pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("task", pa.string()),
                ("model", pa.string()),
                ("error_type", pa.string()),
                ("n_errors", pa.int64()),
                ("n_covered", pa.int64()),
                ("coverage_rate", pa.float64()),
                ("coverage_lo", pa.float64()),
                ("coverage_hi", pa.float64()),
                ("mean_p_exact", pa.float64()),
                ("onpolicy_frac", pa.float64()),
                ("synthetic_frac", pa.float64()),
            ]
        ),
    )
