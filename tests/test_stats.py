"""Interval estimates: Newcombe's textbook values, the cluster bootstrap, the gap table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from selfcorrect.stats import (
    CLUSTER_BOOTSTRAP,
    GAP_COLUMNS,
    GAP_SCHEMA,
    MOVER_CLUSTER,
    NEWCOMBE,
    WILSON,
    bootstrap_weights,
    cluster_bootstrap_ratio,
    cluster_interval,
    gap_table,
    mover_diff_interval,
    newcombe_diff_interval,
    wilson_interval,
)

# Newcombe (1998), "Interval estimation for the difference between independent proportions:
# comparison of eleven methods", Stat Med 17:873-890, Table II, method 10 (score, no CC).
NEWCOMBE_TABLE_II = [
    # (k1, n1, k2, n2, difference, lower, upper)
    (56, 70, 48, 80, 0.2000, 0.0524, 0.3339),
    (9, 10, 3, 10, 0.6000, 0.1705, 0.8090),
    (6, 7, 2, 7, 0.5714, 0.0582, 0.8062),
    (5, 56, 0, 29, 0.0893, -0.0381, 0.1926),
    (0, 10, 0, 20, 0.0000, -0.1611, 0.2775),
    (0, 10, 0, 10, 0.0000, -0.2775, 0.2775),
    (10, 10, 0, 20, 1.0000, 0.6791, 1.0000),
    (10, 10, 0, 10, 1.0000, 0.6075, 1.0000),
]


@pytest.mark.parametrize("k1,n1,k2,n2,d,lo,hi", NEWCOMBE_TABLE_II)
def test_newcombe_method_10_matches_the_textbook(k1, n1, k2, n2, d, lo, hi):
    got = newcombe_diff_interval(k1, n1, k2, n2)
    assert got == pytest.approx((d, lo, hi), abs=5e-5)


def test_newcombe_is_square_and_add_of_two_wilson_intervals():
    d, lo, hi = newcombe_diff_interval(56, 70, 48, 80)
    l1, u1 = wilson_interval(56, 70)
    l2, u2 = wilson_interval(48, 80)
    assert (d, lo, hi) == mover_diff_interval(0.8, l1, u1, 0.6, l2, u2)
    # Antisymmetric, and undefined without data.
    d2, lo2, hi2 = newcombe_diff_interval(48, 80, 56, 70)
    assert (d2, lo2, hi2) == pytest.approx((-d, -hi, -lo))
    assert all(math.isnan(x) for x in newcombe_diff_interval(1, 0, 1, 5))
    assert all(math.isnan(x) for x in mover_diff_interval(0.5, math.nan, 0.7, 0.1, 0.0, 0.2))


def test_wilson_bounds_are_exact_at_zero_and_all():
    assert wilson_interval(0, 7)[0] == 0.0 and wilson_interval(7, 7)[1] == 1.0
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=5e-5)  # Newcombe's (e), (f)


def _clusters(outcomes_per_cluster):
    """Per-cluster (successes, trials) from lists of 0/1 outcomes."""
    num = np.array([sum(c) for c in outcomes_per_cluster], dtype=float)
    den = np.array([len(c) for c in outcomes_per_cluster], dtype=float)
    return num, den


def test_cluster_bootstrap_is_wide_on_clustered_data():
    # 10 problems, 20 identical outcomes each (3 all recognized, 7 none): 200 trials that
    # carry the information of about 10.
    num, den = _clusters([[1] * 20] * 3 + [[0] * 20] * 7)
    p = num.sum() / den.sum()
    w_lo, w_hi = wilson_interval(num.sum(), den.sum())
    lo, hi = cluster_bootstrap_ratio(num, den, seed=0)
    assert lo <= p <= hi
    assert hi - lo > 3 * (w_hi - w_lo)
    assert (lo, hi) == cluster_bootstrap_ratio(num, den, seed=0)  # deterministic for a seed
    # The reported (guarded) interval contains both the estimate and the naive Wilson one.
    g_lo, g_hi = cluster_interval(num, den, seed=0)
    assert g_lo <= min(lo, w_lo) + 1e-12 and g_hi >= max(hi, w_hi) - 1e-12
    assert g_lo <= p <= g_hi


def test_cluster_bootstrap_with_one_item_per_cluster_is_close_to_wilson():
    rng = np.random.default_rng(3)
    outcomes = (rng.random(400) < 0.3).astype(int)
    num, den = _clusters([[x] for x in outcomes])
    w_lo, w_hi = wilson_interval(num.sum(), den.sum())
    lo, hi = cluster_bootstrap_ratio(num, den, seed=0)
    assert lo == pytest.approx(w_lo, abs=0.01) and hi == pytest.approx(w_hi, abs=0.01)
    g_lo, g_hi = cluster_interval(num, den, seed=0)
    assert g_lo == pytest.approx(w_lo, abs=0.01) and g_hi == pytest.approx(w_hi, abs=0.01)


def test_cluster_bootstrap_is_a_ratio_of_sums_over_clusters():
    # Unequal cluster sizes: the estimate is sum(num)/sum(den), not a mean of cluster rates.
    num = np.array([0, 1, 9, 0, 2, 5, 1, 0], dtype=float)
    den = np.array([1, 2, 10, 3, 2, 20, 4, 1], dtype=float)
    p = num.sum() / den.sum()
    lo, hi = cluster_bootstrap_ratio(num, den, seed=0)
    assert lo < p < hi
    assert (lo, hi) == cluster_bootstrap_ratio(num, den, seed=0)
    assert (lo, hi) != cluster_bootstrap_ratio(num, den, seed=1)  # the seed is used
    # Shared weights: the same resamples give the same interval.
    w = bootstrap_weights(len(num), np.random.default_rng(0))
    assert w.shape == (2000, len(num)) and (w.sum(axis=1) == len(num)).all()
    assert cluster_bootstrap_ratio(num, den, weights=w) == cluster_bootstrap_ratio(
        num, den, weights=w
    )
    assert all(math.isnan(x) for x in cluster_bootstrap_ratio([0, 0], [0, 0]))
    with pytest.raises(ValueError):
        cluster_bootstrap_ratio([1, 2], [3])


def test_degenerate_bootstrap_falls_back_to_one_trial_per_cluster():
    # Nothing recognized in 200 own errors from 10 generations: the bootstrap has no spread;
    # the interval counts each problem once (0/10), not each error (0/200).
    num, den = _clusters([[0] * 20] * 10)
    assert cluster_bootstrap_ratio(num, den, seed=0) == (0.0, 0.0)
    lo, hi = cluster_interval(num, den, seed=0)
    assert (lo, hi) == wilson_interval(0, 10)
    assert hi > wilson_interval(0, 200)[1]
    # A single cluster with a rate strictly inside (0, 1) too.
    lo, hi = cluster_interval([3], [4], seed=0)
    assert lo < 0.75 < hi and (lo, hi) == wilson_interval(0.75, 1)


def _summary_row(cond, model, rec, n, lo, hi, method=WILSON, task="t", temp=0.0, etype="all"):
    return {
        "task": task,
        "model": model,
        "condition": cond,
        "temperature": temp,
        "error_type": etype,
        "n": n,
        "recognition_rate": rec,
        "recognition_rate_lo": lo,
        "recognition_rate_hi": hi,
        "interval_method": method,
    }


def test_gap_table_from_a_summary():
    syn = _summary_row("synthetic", "eift", 0.8, 70, *wilson_interval(56, 70))
    ft = _summary_row("ft_errors", "eift", 0.6, 80, *wilson_interval(48, 80))
    own = _summary_row("own_errors", "eift", 0.1, 50, 0.02, 0.25, CLUSTER_BOOTSTRAP)
    per_type = _summary_row("own_errors", "eift", 0.9, 5, 0.5, 1.0, etype="digit")
    other_model = _summary_row("synthetic", "ft", 0.0, 70, *wilson_interval(0, 70))
    g = gap_table(pd.DataFrame([syn, ft, own, per_type, other_model]))
    assert list(g.columns) == GAP_COLUMNS
    # Only comparisons with both sides present; the per-type row is not the aggregate.
    assert set(zip(g["model"], g["comparison"], strict=True)) == {
        ("eift", "synthetic-ft_errors"),
        ("eift", "synthetic-own_errors"),
    }
    r = g[g["comparison"] == "synthetic-ft_errors"].iloc[0]
    assert (r["diff"], r["diff_lo"], r["diff_hi"]) == pytest.approx(
        newcombe_diff_interval(56, 70, 48, 80)
    )
    assert r["method"] == NEWCOMBE and (r["n_a"], r["n_b"]) == (70, 80)
    r = g[g["comparison"] == "synthetic-own_errors"].iloc[0]
    assert r["method"] == MOVER_CLUSTER and r["diff"] == pytest.approx(0.7)
    # Square-and-add with the clustered side's own interval.
    l1, u1 = wilson_interval(56, 70)
    assert r["diff_lo"] == pytest.approx(0.7 - math.hypot(0.8 - l1, 0.25 - 0.1))
    assert r["diff_hi"] == pytest.approx(0.7 + math.hypot(u1 - 0.8, 0.1 - 0.02))
    assert r["diff_lo"] < r["diff"] < r["diff_hi"]
    # Writes with the fixed schema, empty or not.
    for table in (g, gap_table(None), gap_table(pd.DataFrame([syn]))):
        assert pa.Table.from_pandas(table, schema=GAP_SCHEMA, preserve_index=False).num_rows == len(
            table
        )


def test_gap_table_of_another_rate_uses_its_intervals_and_skips_undefined_sides():
    """The report's threshold-free gap: ``gap_table(summary, "discrimination_rate")``."""

    def row(cond, p, n, k, model="eift"):
        lo, hi = wilson_interval(k, n) if n else (math.nan, math.nan)
        return {
            "task": "t",
            "model": model,
            "condition": cond,
            "temperature": 0.0,
            "error_type": "all",
            "n": 100,
            "n_paired": n,
            "recognition_rate": 0.1,
            "recognition_rate_lo": 0.05,
            "recognition_rate_hi": 0.2,
            "discrimination_rate": p,
            "discrimination_rate_lo": lo,
            "discrimination_rate_hi": hi,
            "interval_method": "wilson",
        }

    s = pd.DataFrame(
        [
            row("synthetic", 0.9, 100, 90),
            row("own_errors", 0.55, 100, 55),
            row("matched_synthetic", 0.9, 0, 0),  # n_paired 0: left out
            row("ft_errors", math.nan, 0, 0),  # no scored pair: undefined, left out
        ]
    )
    g = gap_table(s, "discrimination_rate", n="n_paired")
    assert list(g["comparison"]) == ["synthetic-own_errors"]
    r = g.iloc[0]
    assert (r["n_a"], r["n_b"]) == (100, 100)
    assert (r["diff"], r["diff_lo"], r["diff_hi"]) == pytest.approx(
        newcombe_diff_interval(90, 100, 55, 100)
    )
    # The default is still recognition, and the undefined side does not drop its comparison.
    assert set(gap_table(s)["comparison"]) == {
        "synthetic-own_errors",
        "synthetic-ft_errors",
        "synthetic-matched_synthetic",
    }
    assert gap_table(s)["diff"].eq(0.0).all()
