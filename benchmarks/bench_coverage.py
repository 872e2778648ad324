"""Coverage throughput: 1,000 errors x 10,000 synthetic samples each.

    python benchmarks/bench_coverage.py [--errors 1000] [--samples 10000] [--cpus 2]

Errors are synthetic wrong steps (plus 10% malformed 'other' lines) at random
golden states of the paper-scale tasks (4x4-digit multiplication, 4x4 Sudoku
with default empties): the same work per error as on-policy errors. Reports:

* baseline: the one-sample string injector (``sample_error``) called 10,000 times
  per error and compared as strings, timed on a few errors and scaled;
* vectorised ``coverage_batch`` in this process (one core);
* the stage itself: ``rayjobs.coverage.run_coverage`` over Ray Data on a local
  Ray with ``--cpus`` CPUs (Ray start-up excluded, dataset start-up included).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rayjobs.coverage import run_coverage  # noqa: E402
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


def naive_seconds_per_error(task, rows, n_samples: int, k: int = 3) -> float:
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    for i in range(k):
        state = state_at(task, rows["prompt"][i], rows["prefix_steps"][i])
        hits = 0
        for _ in range(n_samples):
            hits += sample_error(task, state, rng)[0] == rows["wrong_step"][i]
    return (time.perf_counter() - t0) / k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--errors", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--tasks", nargs="+", default=["multiplication", "sudoku"])
    args = ap.parse_args()
    import ray

    ray.init(
        num_cpus=args.cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}},
    )
    cfg = load_config(None, [f"coverage.n_samples={args.samples}"])
    print(f"{args.errors} errors x {args.samples} samples; local Ray with {args.cpus} CPUs")
    # Warm-up: start Ray's worker processes once (a pipeline's earlier stages already did).
    t0 = time.perf_counter()
    warm = get_task("sudoku")
    run_coverage(pa.table(make_errors(warm, 16)), "sudoku", cfg, n_blocks=args.cpus)
    print(
        f"cold start of the first Ray Data run (not counted below): {time.perf_counter() - t0:.2f}s"
    )
    for name in args.tasks:
        task = get_task(name, **cfg.task_options(name))
        rows = make_errors(task, args.errors)
        naive = naive_seconds_per_error(task, rows, args.samples) * args.errors
        batch = {k: np.array(v, dtype=object) for k, v in rows.items()}
        t0 = time.perf_counter()
        coverage_batch(batch, task, args.samples, seed=0)
        t_vec = time.perf_counter() - t0
        table = pa.table(rows)
        t0 = time.perf_counter()
        out = run_coverage(table, name, cfg)
        t_ray = time.perf_counter() - t0
        assert out.num_rows == args.errors
        print(f"{name}: naive string injector (scaled from 3 errors) {naive:8.1f}s")
        print(
            f"{name}: vectorised, in process (1 core)               {t_vec:8.2f}s"
            f"  x{naive / t_vec:6.0f}"
        )
        print(
            f"{name}: Ray Data stage ({args.cpus} CPUs)                    {t_ray:8.2f}s"
            f"  x{naive / t_ray:6.0f}  covered {np.mean(out.column('covered').to_numpy()):.3f}"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
