"""Coverage throughput: errors x 10,000 synthetic samples each, as samples/s.

    python benchmarks/bench_coverage.py [--errors 200] [--samples 10000] [--cpus 2]

Reported as samples/s (one sample = one synthetic error drawn and compared).
Errors are synthetic wrong steps (plus 10% malformed 'other' lines) at random
golden states of the paper-scale tasks (4x4-digit multiplication, 4x4 Sudoku
with default empties): the same work per error as on-policy errors. Reports:

* baseline: the one-sample string injector (``sample_error``) called once per sample
  and compared as strings, timed on a few errors;
* vectorised ``coverage_batch`` in this process (one core);
* the stage itself: ``rayjobs.coverage.run_coverage`` over Ray Data on a local
  Ray with ``--cpus`` CPUs (Ray start-up excluded, dataset start-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import alternate, median_ratio  # noqa: E402
from selfcorrect.config import load_config  # noqa: E402
from selfcorrect.coverage import coverage_batch, state_at  # noqa: E402
from selfcorrect.tasks import classify_error, get_task, sample_error  # noqa: E402


def make_errors(task, n: int, seed: int = 0) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {
        k: []
        for k in (
            "error_id",
            "prompt",
            "prefix_steps",
            "wrong_step",
            "error_type",
            "task",
            "model",
            "step_index",
        )
    }
    for i in range(n):
        p = task.sample_problem(rng)
        steps = task.golden_steps(p)
        j = int(rng.integers(len(steps)))
        state = task.initial_state(p)
        for s in steps[:j]:
            state = task.apply_step(state, s)
        wrong = "12=" if i % 10 == 9 else sample_error(task, state, rng)[0]
        for k, v in zip(
            rows,
            [
                f"e{i:05d}",
                task.prompt(p),
                steps[:j],
                wrong,
                classify_error(task, state, wrong),
                task.name,
                "bench",
                j,
            ],
            strict=True,
        ):
            rows[k].append(v)
    return rows


def naive_samples_per_s(task, rows, n_samples: int, k: int = 3) -> float:
    """The one-sample reference: ``sample_error`` once per sample, compared as strings."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    for i in range(k):
        state = state_at(task, rows["prompt"][i], rows["prefix_steps"][i])
        hits = 0
        for _ in range(n_samples):
            hits += sample_error(task, state, rng)[0] == rows["wrong_step"][i]
    return k * n_samples / (time.perf_counter() - t0)


def vectorised_samples_per_s(task, rows, n_samples: int) -> float:
    """``coverage_batch`` over every error in this process (one core)."""
    batch = {k: np.array(v, dtype=object) for k, v in rows.items()}
    t0 = time.perf_counter()
    coverage_batch(batch, task, n_samples, seed=0)
    return len(rows["prompt"]) * n_samples / (time.perf_counter() - t0)


def run(
    errors: int = 200,
    samples: int = 10_000,
    naive_errors: int = 3,
    naive_samples: int = 1_000,
    rounds: int = 3,
    tasks: Sequence[str] = ("multiplication", "sudoku"),
    ray_cpus: int = 0,
) -> dict[str, Any]:
    """Samples/s of the vectorised path vs the one-sample reference, per task.

    Both sides alternate per round on the same errors (the reference on the first
    ``naive_errors`` of them: its cost per sample does not depend on the error). With
    ``ray_cpus`` > 0 the Ray Data stage (``rayjobs.coverage.run_coverage``) is timed too,
    after a warm-up dataset (Ray start-up and the first dataset's cold start excluded).
    """
    cfg = load_config(None, [f"coverage.n_samples={samples}"])
    res: dict[str, Any] = {
        "errors": errors,
        "samples": samples,
        "naive_errors": naive_errors,
        "naive_samples": naive_samples,
        "rounds": rounds,
        "tasks": {},
    }
    for name in tasks:
        task = get_task(name, **cfg.task_options(name))
        rows = make_errors(task, errors)
        med, rates = alternate(
            {
                "naive": lambda task=task, rows=rows: naive_samples_per_s(
                    task, rows, naive_samples, naive_errors
                ),
                "vectorised": lambda task=task, rows=rows: vectorised_samples_per_s(
                    task, rows, samples
                ),
            },
            rounds,
        )
        res["tasks"][name] = {
            "samples_per_s": med,
            "vectorised_over_naive": median_ratio(rates, "vectorised", "naive"),
        }
    if ray_cpus:
        import ray

        from rayjobs.coverage import run_coverage

        ray.init(
            num_cpus=ray_cpus,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": REPO}},
        )
        try:
            t0 = time.perf_counter()
            warm = get_task("sudoku")
            run_coverage(pa.table(make_errors(warm, 16)), "sudoku", cfg, n_blocks=ray_cpus)
            res["ray_cold_start_s"] = time.perf_counter() - t0
            for name in tasks:
                task = get_task(name, **cfg.task_options(name))
                rows = make_errors(task, errors)
                t0 = time.perf_counter()
                out = run_coverage(pa.table(rows), name, cfg)
                secs = time.perf_counter() - t0
                assert out.num_rows == errors
                r = res["tasks"][name]
                r["samples_per_s"]["ray_data"] = errors * samples / secs
                r["ray_data_over_naive"] = (
                    r["samples_per_s"]["ray_data"] / r["samples_per_s"]["naive"]
                )
                r["covered"] = float(np.mean(out.column("covered").to_numpy()))
        finally:
            ray.shutdown()
        res["ray_cpus"] = ray_cpus
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--errors", type=int, default=200)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--naive-errors", type=int, default=3)
    ap.add_argument("--naive-samples", type=int, default=1_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2, help="Ray CPUs for the stage (0: skip Ray)")
    ap.add_argument("--tasks", nargs="+", default=["multiplication", "sudoku"])
    args = ap.parse_args()
    res = run(
        args.errors,
        args.samples,
        args.naive_errors,
        args.naive_samples,
        args.rounds,
        args.tasks,
        args.cpus,
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
