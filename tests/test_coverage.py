"""Coverage: sampled exact-match rates agree with the injector's analytic probabilities."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from selfcorrect.config import load_config
from selfcorrect.coverage import (
    coverage_batch,
    error_coverage,
    state_at,
    summarize_coverage,
    wilson,
)
from selfcorrect.tasks import classify_error, get_task, sample_error

TASKS = {
    "multiplication": get_task("multiplication", digits_a=3, digits_b=2),
    "sudoku": get_task("sudoku", min_empty=4, max_empty=8),
}


def _errors(task, n, seed=0, extra_other=True) -> dict[str, np.ndarray]:
    """Harvest-shaped rows: synthetic errors at random golden states, plus some 'other' errors."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        p = task.sample_problem(rng)
        steps = task.golden_steps(p)
        j = int(rng.integers(len(steps)))
        state = task.initial_state(p)
        for s in steps[:j]:
            state = task.apply_step(state, s)
        wrong, _ = sample_error(task, state, rng)
        if extra_other and i % 10 == 9:
            wrong = "not a step"
        rows.append(
            {
                "error_id": f"e{i:04d}",
                "prompt": task.prompt(p),
                "prefix_steps": steps[:j],
                "wrong_step": wrong,
                "error_type": classify_error(task, state, wrong),
                "task": task.name,
                "model": "ft",
                "step_index": j,
            }
        )
    out = {}
    for k in rows[0]:
        arr = np.empty(len(rows), dtype=object)
        arr[:] = [r[k] for r in rows]
        out[k] = arr
    return out


@pytest.mark.parametrize("name", sorted(TASKS))
def test_sampled_p_exact_agrees_with_analytic(name):
    """Across a test set of errors: the analytic probability lies in the binomial interval."""
    task = TASKS[name]
    cov = coverage_batch(_errors(task, 120, seed=1), task, 10_000, seed=0).to_pylist()
    inside95 = 0
    for r in cov:
        k, n, p = r["n_exact"], r["n_samples"], r["p_exact_analytic"]
        assert n == 10_000 and p is not None
        assert r["p_exact"] == k / n and r["covered"] == (k > 0)
        lo, hi = wilson(k, n, z=4.4)  # ~1e-5 two-sided: no real error may fall outside
        assert lo <= p <= hi, r
        inside95 += r["p_exact_lo"] <= p <= r["p_exact_hi"]
        if not r["encodable"]:
            assert k == 0 and p == 0.0 and r["error_type"] == "other"
    # ~95% should fall inside the 95% interval; a biased sampler would fail many.
    assert inside95 >= 0.88 * len(cov)
    assert sum(r["covered"] for r in cov) >= 0.85 * len(cov)  # synthetic errors are covered


def test_results_do_not_depend_on_batching():
    task = TASKS["multiplication"]
    rows = _errors(task, 30, seed=2)
    whole = coverage_batch(rows, task, 2000, seed=5)
    halves = [
        coverage_batch({k: v[s] for k, v in rows.items()}, task, 2000, seed=5)
        for s in (slice(17, 30), slice(0, 17))
    ]
    merged = pa.concat_tables(halves).sort_by("error_id")
    assert merged.equals(whole.sort_by("error_id"))
    assert not coverage_batch(rows, task, 2000, seed=6).equals(whole)


def test_error_coverage_counts_integer_codes():
    task = TASKS["multiplication"]
    p = task.sample_problem(np.random.default_rng(0))
    state = task.initial_state(p)
    gold = task.correct_steps(state)[0]
    lhs, value = gold.split("=")
    # +1 is an int_10 and int_100 error: probability 1/6 * (1/20 + 1/200) under uniform weights
    res = error_coverage(task, state, f"{lhs}={int(value) + 1}", 20_000, np.random.default_rng(1))
    assert res["n_samples"] == 20_000 and res["encodable"]
    want = res["p_exact_analytic"]
    assert want == pytest.approx(
        sum(
            w * task.type_distributions(state)[t].get(int(value) + 1, 0.0)
            for t, w in {t: 1 / 6 for t in task.error_types}.items()
        )
    )
    lo, hi = wilson(res["n_exact"], res["n_samples"], z=4.4)
    assert lo <= want <= hi
    assert sum(res["type_counts"]) == 20_000
    # a leading-zero spelling of a reachable value is a different step: never an exact match
    zero = error_coverage(task, state, f"{lhs}=0{int(value) + 1}", 1000, np.random.default_rng(1))
    assert zero["n_exact"] == 0 and not zero["encodable"]


def test_state_at_replays_prefix_steps():
    task = TASKS["sudoku"]
    p = task.sample_problem(np.random.default_rng(3))
    steps = task.golden_steps(p)
    state = state_at(task, task.prompt(p), steps[:2])
    assert task.correct_steps(state)  # not done
    assert sum(v == 0 for v in state) == sum(v == 0 for v in task.initial_state(p)) - 2


def test_wilson_interval():
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_summary_rates_and_histogram():
    task = TASKS["multiplication"]
    cov = coverage_batch(_errors(task, 60, seed=4), task, 1000, seed=0)
    s = summarize_coverage(cov, task, "ft").to_pylist()
    by = {r["error_type"]: r for r in s}
    assert s[0]["error_type"] == "all" and by["all"]["n_errors"] == 60
    assert sum(r["n_errors"] for r in s[1:]) == 60
    assert sum(r["onpolicy_frac"] for r in s[1:]) == pytest.approx(1.0)
    assert sum(r["synthetic_frac"] for r in s[1:]) == pytest.approx(1.0)
    assert by["other"]["synthetic_frac"] == 0.0 and by["other"]["n_covered"] == 0
    for r in s:
        if r["n_errors"]:
            assert r["coverage_lo"] <= r["coverage_rate"] <= r["coverage_hi"]
            assert r["n_covered"] == round(r["coverage_rate"] * r["n_errors"])


def test_summary_of_a_model_that_made_no_errors():
    """A harvest with no wrong steps (e.g. a model that stops at once) summarises to zero
    counts and undefined rates instead of crashing the stage."""
    task = TASKS["multiplication"]
    cov = coverage_batch(_errors(task, 5, seed=1), task, 100, seed=0).slice(0, 0)
    s = summarize_coverage(cov, task, "ft").to_pylist()
    assert [r["n_errors"] for r in s] == [0] * len(s)
    assert all(r["coverage_rate"] is None for r in s)


@pytest.mark.integration
def test_ray_data_coverage_matches_in_process(ray_session, tmp_path):
    from rayjobs.coverage import run_coverage

    cfg = load_config(
        None, ["multiplication.digits_a=3", "multiplication.digits_b=2", "coverage.n_samples=3000"]
    )
    task = get_task("multiplication", **cfg.task_options("multiplication"))
    rows = _errors(task, 80, seed=7)
    table = pa.table({k: list(v) for k, v in rows.items()})
    via_ray = run_coverage(table, "multiplication", cfg, n_blocks=3)
    local = coverage_batch(rows, task, 3000, seed=cfg.seed).sort_by("error_id")
    assert via_ray.equals(local)
