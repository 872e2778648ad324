"""Interval estimates for the eval summary and the headline gap (DESIGN 7).

Three pieces, each a pure function of counts (no pandas), so they are unit-tested
against textbook values:

* ``wilson_interval``: a proportion of independent trials (one item per problem:
  ``clean``, ``synthetic``).
* ``cluster_bootstrap_ratio``: a ratio of sums over clusters (problems), for rates
  whose trials are not independent: several own errors of one generation, several
  correct steps of one generation (every false-alarm rate), several harvested FT
  errors of one problem. Percentile bootstrap over clusters (resampling whole
  problems), seeded and vectorised.
* ``newcombe_diff_interval`` / ``mover_diff_interval``: a difference of two
  independent proportions by Newcombe's hybrid score method (Newcombe 1998,
  method 10), i.e. square-and-add of the two single-proportion intervals. MOVER
  (Zou & Donner 2008) is the same formula applied to any pair of intervals, which is
  how a clustered side (own errors) enters the gap: its cluster-bootstrap interval
  takes the place of its Wilson interval.

``gap_table`` turns the eval summary into the headline table (``eval_gaps.parquet``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

Z95 = 1.959963984540054
N_BOOT = 2000  # bootstrap resamples (percentile tails of 50 resamples each at 95%)

WILSON = "wilson"
CLUSTER_BOOTSTRAP = "cluster_bootstrap"
NEWCOMBE = "newcombe"  # both sides Wilson: Newcombe (1998) method 10
MOVER_CLUSTER = "newcombe_mover_cluster_bootstrap"  # a side's interval is a cluster bootstrap

# The headline comparisons: recognition on synthetic errors minus recognition on each other
# origin of errors, per task x model x temperature.
GAP_COMPARISONS = (
    ("synthetic", "own_errors"),
    ("synthetic", "ft_errors"),
    ("synthetic", "matched_synthetic"),
)
GAP_COLUMNS = [
    "task",
    "model",
    "temperature",
    "comparison",
    "diff",
    "diff_lo",
    "diff_hi",
    "n_a",
    "n_b",
    "method",
]
GAP_SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("model", pa.string()),
        ("temperature", pa.float64()),
        ("comparison", pa.string()),
        ("diff", pa.float64()),
        ("diff_lo", pa.float64()),
        ("diff_hi", pa.float64()),
        ("n_a", pa.int64()),
        ("n_b", pa.int64()),
        ("method", pa.string()),
    ]
)

INTERVAL_METHODS_TEXT = (
    "Intervals are 95%. A summary row whose items all come from different test problems "
    "(`clean`, `synthetic`; `ft_errors` / `matched_synthetic` when the FT model erred at most "
    "once per problem) gets the Wilson score interval. A row with several items from one "
    "problem (`own_errors`: several errors of one generation; `ft_errors` / "
    "`matched_synthetic`: several harvested errors of one problem) and every false-alarm rate "
    "(several correct steps of one generation) get a percentile bootstrap over problems "
    f"({N_BOOT:,} seeded resamples of whole problems, the rate re-estimated as a ratio of "
    "sums), widened where needed to contain the Wilson interval of the pooled counts (with "
    "trials positively correlated within a problem, clustering can only widen the interval; "
    "the percentile bootstrap alone is too narrow near 0 and 1); when every resample gives "
    "the same rate (e.g. "
    "no error recognized at all) it falls back to the Wilson interval that counts each "
    "problem as one trial. The gap (synthetic minus another origin's recognition rate) is "
    "Newcombe's hybrid score interval (1998, method 10: square-and-add of the two Wilson "
    "intervals) when both rates are Wilson, and the same square-and-add with the "
    "cluster-bootstrap interval in place of the Wilson one on a clustered side (MOVER, Zou & "
    "Donner 2008). Both treat the two conditions as independent samples; they are run on "
    "overlapping test problems, so a positive between-condition correlation per problem "
    "would make the gap interval conservative."
)


# ---------------------------------------------------------------------------
# One proportion
# ---------------------------------------------------------------------------


def wilson_interval(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; (nan, nan) when n == 0.

    Unlike the normal interval it stays inside [0, 1] and is sensible at k = 0,
    which is exactly where a model that never recognizes anything sits.
    """
    if n <= 0:
        return math.nan, math.nan
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(max(0.0, p * (1 - p) / n + z2 / (4 * n * n))) / denom
    # At k = 0 / k = n the bound is exactly 0 / 1 (no rounding residue like 0.9999999999999999).
    lo = 0.0 if k <= 0 else max(0.0, center - half)
    hi = 1.0 if k >= n else min(1.0, center + half)
    return lo, hi


# ---------------------------------------------------------------------------
# Clustered trials: percentile bootstrap over clusters
# ---------------------------------------------------------------------------


def bootstrap_weights(
    n_clusters: int, rng: np.random.Generator, n_boot: int = N_BOOT
) -> np.ndarray:
    """``(n_boot, n_clusters)`` resampling counts: how often each cluster is drawn per resample.

    One matrix serves every rate of the same clusters (num @ W.T), so the rates of a
    summary row are resampled together and the cost is one matrix product per rate.
    """
    if n_clusters <= 0:
        return np.zeros((n_boot, 0), dtype=np.int64)
    # Draw n_clusters clusters with replacement per resample, then count them per row.
    draws = rng.integers(0, n_clusters, size=(n_boot, n_clusters))
    draws += np.arange(n_boot)[:, None] * n_clusters
    return np.bincount(draws.ravel(), minlength=n_boot * n_clusters).reshape(n_boot, n_clusters)


def cluster_bootstrap_ratio(
    num: Sequence[float] | np.ndarray,
    den: Sequence[float] | np.ndarray,
    *,
    seed: int | np.random.Generator | None = 0,
    n_boot: int = N_BOOT,
    weights: np.ndarray | None = None,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum(num) / sum(den)``, resampling whole clusters.

    ``num[i]`` / ``den[i]`` are cluster i's successes and trials (e.g. recognized own
    errors / own errors of one problem's generation). Resamples with no trial at all
    are dropped. Returns the raw percentile interval, (nan, nan) without trials; see
    ``cluster_interval`` for the guarded version the summary uses.
    """
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError("num and den must be 1-d arrays of the same length (one per cluster)")
    if den.sum() <= 0:
        return math.nan, math.nan
    if weights is None:
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        weights = bootstrap_weights(len(num), rng, n_boot)
    bn = weights @ num
    bd = weights @ den
    ok = bd > 0
    ratios = bn[ok] / bd[ok]
    if ratios.size == 0:
        return math.nan, math.nan
    a = (1 - level) / 2
    lo, hi = np.quantile(ratios, [a, 1 - a])
    return float(lo), float(hi)


def cluster_interval(
    num: Sequence[float] | np.ndarray,
    den: Sequence[float] | np.ndarray,
    *,
    seed: int | np.random.Generator | None = 0,
    n_boot: int = N_BOOT,
    weights: np.ndarray | None = None,
    z: float = Z95,
) -> tuple[float, float]:
    """The interval the summary reports for a clustered rate (see ``INTERVAL_METHODS_TEXT``).

    The percentile cluster bootstrap, widened to contain the Wilson interval of the
    pooled counts; if the bootstrap has no spread at all (every cluster at the same
    rate, e.g. nothing recognized anywhere) the Wilson interval with one trial per
    cluster (the conservative effective sample size) instead.
    """
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    k, n = float(num.sum()), float(den.sum())
    if n <= 0:
        return math.nan, math.nan
    lo, hi = cluster_bootstrap_ratio(num, den, seed=seed, n_boot=n_boot, weights=weights)
    w_lo, w_hi = wilson_interval(k, n, z)
    if not hi > lo:  # degenerate bootstrap (also nan): count each cluster as one trial
        c = float((den > 0).sum())
        lo, hi = wilson_interval(k / n * c, c, z)
    return min(lo, w_lo), max(hi, w_hi)


# ---------------------------------------------------------------------------
# A difference of two proportions
# ---------------------------------------------------------------------------


def mover_diff_interval(
    p1: float, lo1: float, hi1: float, p2: float, lo2: float, hi2: float
) -> tuple[float, float, float]:
    """``(p1 - p2, lo, hi)`` by square-and-add of two independent intervals (MOVER).

    With Wilson intervals on both sides this is Newcombe's (1998) method 10.
    """
    vals = (p1, lo1, hi1, p2, lo2, hi2)
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in vals):
        return math.nan, math.nan, math.nan
    d = p1 - p2
    lo = d - math.sqrt((p1 - lo1) ** 2 + (hi2 - p2) ** 2)
    hi = d + math.sqrt((hi1 - p1) ** 2 + (p2 - lo2) ** 2)
    return d, max(-1.0, lo), min(1.0, hi)


def newcombe_diff_interval(
    k1: float, n1: float, k2: float, n2: float, z: float = Z95
) -> tuple[float, float, float]:
    """``(k1/n1 - k2/n2, lo, hi)``: Newcombe's hybrid score interval (1998, method 10)."""
    if n1 <= 0 or n2 <= 0:
        return math.nan, math.nan, math.nan
    p1, p2 = k1 / n1, k2 / n2
    return mover_diff_interval(p1, *wilson_interval(k1, n1, z), p2, *wilson_interval(k2, n2, z))


# ---------------------------------------------------------------------------
# The gap table
# ---------------------------------------------------------------------------


def comparison_name(a: str, b: str) -> str:
    return f"{a}-{b}"


def gap_table(
    summary: pd.DataFrame | None, rate: str = "recognition_rate", n: str = "n"
) -> pd.DataFrame:
    """Eval summary -> one row per task x model x temperature x comparison (``GAP_COLUMNS``).

    Uses the aggregate rows (``error_type == "all"``) and the intervals of ``rate`` (the
    headline's recognition rate; the report also compares ``discrimination_rate``, whose items
    are counted by ``n="n_paired"``), so it is a pure function of ``eval_summary.parquet``. A
    comparison is left out when either condition is absent or has no item. ``method`` says how the
    interval was built: ``newcombe`` (both Wilson) or ``newcombe_mover_cluster_bootstrap``
    (a side's interval is the cluster bootstrap; summaries without an
    ``interval_method`` column are taken as Wilson, which is what they computed).
    """
    need = {"task", "model", "condition", "temperature", n, rate}
    if summary is None or summary.empty or not need <= set(summary.columns):
        return pd.DataFrame(columns=GAP_COLUMNS)
    s = summary
    if "error_type" in s:
        s = s[s["error_type"].isna() | (s["error_type"] == "all")]
    keys = ["task", "model", "temperature"]
    rows: list[dict[str, Any]] = []
    for key_vals, g in s.groupby(keys, sort=True, dropna=False):
        by = {c: r for c, r in zip(g["condition"], g.to_dict("records"), strict=True)}
        for a, b in GAP_COMPARISONS:
            ra, rb = by.get(a), by.get(b)
            if ra is None or rb is None or not ra[n] or not rb[n]:
                continue

            def triple(r: dict[str, Any]) -> tuple[float, float, float]:
                return (
                    float(r[rate]),
                    float(r.get(f"{rate}_lo", math.nan)),
                    float(r.get(f"{rate}_hi", math.nan)),
                )

            if math.isnan(triple(ra)[0]) or math.isnan(triple(rb)[0]):
                continue  # the rate is undefined on a side (e.g. no scored pairs)
            d, lo, hi = mover_diff_interval(*triple(ra), *triple(rb))
            clustered = any(r.get("interval_method") == CLUSTER_BOOTSTRAP for r in (ra, rb))
            rows.append(
                {
                    **dict(zip(keys, key_vals, strict=True)),
                    "comparison": comparison_name(a, b),
                    "diff": d,
                    "diff_lo": lo,
                    "diff_hi": hi,
                    "n_a": int(ra[n]),
                    "n_b": int(rb[n]),
                    "method": MOVER_CLUSTER if clustered else NEWCOMBE,
                }
            )
    out = pd.DataFrame(rows, columns=GAP_COLUMNS)
    out["temperature"] = out["temperature"].astype(float)
    for c in ("n_a", "n_b"):
        out[c] = out[c].astype("int64")
    return out
