"""The matched_synthetic condition, clustered intervals in the summary, and eval_gaps.parquet.

Kept apart from tests/test_evaluate.py (metric definitions on hand-written text).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pandas as pd
import pytest

from selfcorrect.data import make_splits
from selfcorrect.evaluate import (
    ALL_TYPES,
    CONDITIONS,
    ft_error_items,
    matched_synthetic_items,
    render_prefix,
    sort_rows,
    state_after,
    summarize,
    wilson_interval,
)
from selfcorrect.stats import CLUSTER_BOOTSTRAP, GAP_COLUMNS, WILSON
from selfcorrect.tasks import applicable_weights, get_task, sample_error

TASK_OPTIONS = {"multiplication": {"digits_a": 3, "digits_b": 3}, "sudoku": {}}


def fake_harvest(task, n_problems=40, seed=0):
    """FT-error-like rows: a correct prefix of random length (the done state included), then
    a wrong step (a synthetic draw or a malformed line), several errors per problem."""
    rows = make_splits(task, 5, n_problems, seed)["test"].to_pylist()
    rng = np.random.default_rng(seed)
    out = []
    for r in rows:
        problem = task.parse_prompt(r["prompt"])
        golden = task.golden_steps(problem)
        for s in range(int(rng.integers(1, 4))):
            i = int(rng.integers(0, len(golden) + 1))
            state = state_after(task, problem, golden[:i])
            if applicable_weights(task, state) and rng.random() < 0.7:
                wrong, etype = sample_error(task, state, rng)
            else:
                wrong, etype = "garbage step", "other"
            out.append(
                {
                    "error_id": f"{task.name}-ft-{r['problem_id']}-s{s}",
                    "problem_id": r["problem_id"],
                    "prompt": r["prompt"],
                    "prefix": render_prefix(r["prompt"], golden[:i]),
                    "prefix_steps": golden[:i],
                    "wrong_step": wrong,
                    "gold_step": golden[i] if i < len(golden) else None,
                    "error_type": etype,
                }
            )
    return out


# ---------------------------------------------------------------------------
# matched_synthetic
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["multiplication", "sudoku"])
def test_matched_items_share_the_ft_prefix_and_are_wrong(name):
    task = get_task(name, **TASK_OPTIONS[name])
    ft = ft_error_items(task, fake_harvest(task), seed=0)
    matched = matched_synthetic_items(task, ft, seed=0)
    by_id = {it["item_id"]: it for it in ft}
    assert len(matched) > 30
    for m in matched:
        assert m["condition"] == "matched_synthetic" and m["item_id"].endswith("-matched")
        f = by_id[m["item_id"][: -len("-matched")]]
        # Exactly the same question: prompt, committed steps, position, problem.
        for k in ("prompt", "prefix_steps", "step_index", "problem_id"):
            assert m[k] == f[k], k
        assert m["prefix"] == render_prefix(m["prompt"], m["prefix_steps"]) + m["wrong_step"] + "\n"
        assert m["prefix"].rsplit("\n", 2)[0] == f["prefix"].rsplit("\n", 2)[0]
        state = state_after(task, task.parse_prompt(m["prompt"]), m["prefix_steps"])
        assert task.check_step(state, m["wrong_step"]) is False
        assert m["error_type"] in task.error_types
        assert task.check_step(state, m["gold_step"])
    # Skipped exactly where no error type applies (e.g. after the last step).
    kept = {m["item_id"][: -len("-matched")] for m in matched}
    for f in ft:
        state = state_after(task, task.parse_prompt(f["prompt"]), f["prefix_steps"])
        assert (f["item_id"] in kept) == bool(applicable_weights(task, state))
    assert len(kept) < len(ft)  # the fake harvest has done-state errors


@pytest.mark.parametrize("name", ["multiplication", "sudoku"])
def test_matched_items_are_seeded_per_error(name):
    task = get_task(name, **TASK_OPTIONS[name])
    harvest = fake_harvest(task, seed=1)
    ft = ft_error_items(task, harvest, seed=0)
    a = matched_synthetic_items(task, ft, seed=0)
    assert a == matched_synthetic_items(task, ft, seed=0)
    b = matched_synthetic_items(task, ft, seed=1)
    assert [x["wrong_step"] for x in a] != [x["wrong_step"] for x in b]
    # Seeded per FT error: the capped subset's matched items are those of the full set.
    capped = ft_error_items(task, harvest, seed=0, max_errors=10)
    sub = matched_synthetic_items(task, capped, seed=0)
    full = {x["item_id"]: x for x in a}
    assert sub and all(full[x["item_id"]] == x for x in sub)


def test_matched_items_follow_the_error_weights():
    task = get_task("sudoku")
    ft = ft_error_items(task, fake_harvest(task, seed=2), seed=0)
    w = {"invalid": 0.0, "non_naked_single": 1.0}
    matched = matched_synthetic_items(task, ft, seed=0, weights=w)
    assert matched and {m["error_type"] for m in matched} == {"non_naked_single"}
    for f in ft:
        state = state_after(task, task.parse_prompt(f["prompt"]), f["prefix_steps"])
        if not applicable_weights(task, state, w):
            assert f"{f['item_id']}-matched" not in {m["item_id"] for m in matched}


def test_matched_condition_sorts_between_ft_errors_and_own_errors():
    assert CONDITIONS == ("clean", "synthetic", "ft_errors", "matched_synthetic", "own_errors")
    df = pd.DataFrame(
        {
            "condition": ["own_errors", "matched_synthetic", "ft_errors", "clean"],
            "temperature": 0.0,
            "item_id": ["a", "b", "c", "d"],
        }
    )
    assert sort_rows(df)["condition"].tolist() == [
        "clean",
        "ft_errors",
        "matched_synthetic",
        "own_errors",
    ]


def test_build_items_brings_matched_items_from_the_ft_harvest(tmp_path):
    from rayjobs.common import JobContext
    from rayjobs.evaluate import build_items, eval_hash, ft_errors_path
    from selfcorrect import io
    from selfcorrect.config import load_config

    cfg = load_config(None, ["tasks=[sudoku]", "eval.max_errors=15", "eval.max_problems=5"])
    assert "matched_synthetic" in cfg.eval.conditions  # on by default (DESIGN 7)
    out = str(tmp_path)
    task = get_task("sudoku", **cfg.task_options("sudoku"))
    splits = make_splits(task, 5, 30, cfg.seed)
    io.write_parquet(io.join(out, "sudoku", "data", "test.parquet"), splits["test"])
    with pytest.raises(FileNotFoundError, match="matched_synthetic needs"):
        build_items(cfg, "sudoku", out, ["matched_synthetic"])
    harvest = fake_harvest(task, seed=3)
    io.write_parquet(ft_errors_path(out, "sudoku"), harvest)
    items = build_items(cfg, "sudoku", out, ["ft_errors", "matched_synthetic"])
    ft = [it for it in items if it["condition"] == "ft_errors"]
    matched = [it for it in items if it["condition"] == "matched_synthetic"]
    assert len(ft) == 15 and 0 < len(matched) <= 15
    assert {m["item_id"][: -len("-matched")] for m in matched} <= {f["item_id"] for f in ft}
    # matched alone: the same items, without the ft_errors ones.
    alone = build_items(cfg, "sudoku", out, ["matched_synthetic"])
    assert alone == matched
    # A changed harvest reruns eval when only matched_synthetic reads it.
    only = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, conditions=["clean"]))
    m_only = dataclasses.replace(
        cfg, eval=dataclasses.replace(cfg.eval, conditions=["matched_synthetic"])
    )
    ctx_only, ctx_m = JobContext(only, out), JobContext(m_only, out)
    before = (eval_hash(ctx_only, "sudoku", "eift"), eval_hash(ctx_m, "sudoku", "eift"))
    io.write_parquet(ft_errors_path(out, "sudoku"), harvest[:-1])
    os.utime(ft_errors_path(out, "sudoku"), ns=(1, 1))
    after = (eval_hash(ctx_only, "sudoku", "eift"), eval_hash(ctx_m, "sudoku", "eift"))
    assert before[0] == after[0] and before[1] != after[1]


# ---------------------------------------------------------------------------
# Clustered intervals in the summary
# ---------------------------------------------------------------------------


def _rows(seed=0, n_problems=30, per_problem=6):
    """Clean generations with several own errors each (a per-problem recognition habit),
    one synthetic item per problem."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_problems):
        habit = rng.random() < 0.4  # recognizes all or none of its errors on this problem
        pid = f"p{p}"
        clean = {
            "task": "t",
            "model": "m",
            "condition": "clean",
            "temperature": 0.0,
            "item_id": pid,
            "trace_id": pid,
            "problem_id": pid,
            "error_type": None,
            "recognized": habit,
            "corrected": False,
            "parroted": None,
            "correct": False,
            "n_ok_steps": 10,
            "n_false_alarms": 5 if habit else 0,
        }
        rows.append(clean)
        for j in range(per_problem):
            rows.append(
                {
                    **clean,
                    "condition": "own_errors",
                    "item_id": f"{pid}-own{j}",
                    "error_type": "digit",
                    "recognized": habit,
                    "parroted": False,
                    "n_ok_steps": None,
                    "n_false_alarms": None,
                }
            )
        rows.append(
            {
                **clean,
                "condition": "synthetic",
                "item_id": f"{pid}-syn",
                "trace_id": f"{pid}-syn",
                "recognized": bool(rng.random() < 0.7),
                "n_ok_steps": 3,
                "n_false_alarms": 0,
            }
        )
    return rows


def test_summary_uses_the_cluster_bootstrap_where_items_share_a_problem():
    s = summarize(_rows(), seed=0).set_index(["condition", "error_type"])
    own = s.loc[("own_errors", ALL_TYPES)]
    assert own["n"] == 180 and own["n_problems"] == 30
    assert own["interval_method"] == CLUSTER_BOOTSTRAP
    k = own["n_recognized"]
    w_lo, w_hi = wilson_interval(k, 180)
    assert own["recognition_rate_lo"] <= own["recognition_rate"] <= own["recognition_rate_hi"]
    # 180 errors in 30 all-or-nothing problems carry the information of ~30 trials.
    assert own["recognition_rate_hi"] - own["recognition_rate_lo"] > 1.8 * (w_hi - w_lo)
    syn = s.loc[("synthetic", ALL_TYPES)]
    assert syn["interval_method"] == WILSON and syn["n_problems"] == syn["n"] == 30
    assert (syn["recognition_rate_lo"], syn["recognition_rate_hi"]) == wilson_interval(
        syn["n_recognized"], 30
    )
    # False alarms (several correct steps per generation) always by the bootstrap.
    clean = s.loc[("clean", ALL_TYPES)]
    assert clean["false_alarm_interval_method"] == CLUSTER_BOOTSTRAP
    fa_w = wilson_interval(clean["n_false_alarms"], clean["n_ok_steps"])
    assert clean["false_alarm_rate_hi"] - clean["false_alarm_rate_lo"] > 1.8 * (fa_w[1] - fa_w[0])
    assert own["false_alarm_rate"] == clean["false_alarm_rate"]
    assert syn["false_alarm_interval_method"] == CLUSTER_BOOTSTRAP
    for r in ("recognition_rate", "false_alarm_rate", "accuracy"):
        ok = s[r].notna()
        assert (s.loc[ok, f"{r}_lo"] <= s.loc[ok, r] + 1e-12).all()
        assert (s.loc[ok, r] <= s.loc[ok, f"{r}_hi"] + 1e-12).all()


def test_summary_intervals_are_deterministic_for_a_seed_and_row_order():
    rows = _rows(seed=4)
    a = summarize(rows, seed=7)
    pd.testing.assert_frame_equal(a, summarize(list(reversed(rows)), seed=7))
    # Another seed: other resamples (tested in test_stats.py), the same estimates and a
    # nearly identical interval (2,000 resamples).
    b = summarize(rows, seed=8)
    pd.testing.assert_series_equal(a["recognition_rate"], b["recognition_rate"])
    assert np.allclose(
        a["recognition_rate_lo"], b["recognition_rate_lo"], atol=0.05, equal_nan=True
    )
    assert np.allclose(
        a["recognition_rate_hi"], b["recognition_rate_hi"], atol=0.05, equal_nan=True
    )


def test_summary_never_recognizing_own_errors_gets_a_cluster_level_interval():
    rows = [
        {**r, "recognized": False, "n_false_alarms": 0 if r["n_false_alarms"] is not None else None}
        for r in _rows(seed=5)
    ]
    own = summarize(rows).set_index(["condition", "error_type"]).loc[("own_errors", ALL_TYPES)]
    assert own["recognition_rate"] == 0 and own["recognition_rate_lo"] == 0
    assert own["recognition_rate_hi"] == pytest.approx(wilson_interval(0, 30)[1])


# ---------------------------------------------------------------------------
# eval_gaps.parquet next to eval_summary.parquet
# ---------------------------------------------------------------------------


def test_run_summary_writes_the_gap_table(tmp_path):
    from rayjobs.common import JobContext, save_resolved_config
    from rayjobs.evaluate import GAPS_FILE, write_run_summary
    from selfcorrect import io
    from selfcorrect.config import load_config

    out = str(tmp_path / "run")
    cfg = load_config(None, ["tasks=[multiplication,sudoku]"])
    ctx = JobContext(cfg, out)
    save_resolved_config(ctx)
    frames = {}
    for task in cfg.tasks:
        rows = [{**r, "task": task} for r in _rows(seed=len(task))]
        frames[task] = summarize(rows)
        io.write_parquet(io.join(out, task, "eval", "summary.parquet"), frames[task])
    write_run_summary(ctx)
    gaps = pd.read_parquet(os.path.join(out, GAPS_FILE))
    assert list(gaps.columns) == GAP_COLUMNS
    assert gaps["task"].tolist() == ["multiplication", "sudoku"]
    assert set(gaps["comparison"]) == {"synthetic-own_errors"}
    for task, g in gaps.groupby("task"):
        s = frames[task]
        s = s[s["error_type"] == ALL_TYPES].set_index("condition")
        d = s.loc["synthetic", "recognition_rate"] - s.loc["own_errors", "recognition_rate"]
        assert g["diff"].iloc[0] == pytest.approx(d)
        assert g["diff_lo"].iloc[0] < d < g["diff_hi"].iloc[0]
        assert g["method"].iloc[0] == "newcombe_mover_cluster_bootstrap"
        assert (g["n_a"].iloc[0], g["n_b"].iloc[0]) == (30, 180)
    assert gaps["diff_lo"].notna().all() and gaps["diff_hi"].notna().all()


def test_eval_leaves_out_models_another_config_trained(tmp_path):
    # A run directory reused with other training settings keeps the old models; the manifest
    # says which config trained each, and eval must not mix those into this run's summary.
    from rayjobs.common import JobContext, write_manifest
    from rayjobs.evaluate import other_config_models
    from rayjobs.grpo import grpo_hash
    from rayjobs.train import model_hash, task_jobs
    from selfcorrect.config import load_config

    cfg = load_config(None, ["tasks=[sudoku]", "train.methods=[ft,eift]"])
    ctx = JobContext(cfg, str(tmp_path))
    jobs = dict(task_jobs(ctx, "sudoku"))
    # The hash eval compares is the one training records, for listed methods and others.
    assert model_hash(ctx, "sudoku", "eift") == jobs["sudoku/eift"].model_hash
    longer = JobContext(
        load_config(None, ["tasks=[sudoku]", "train.max_steps=999"]), ctx.output_dir
    )
    assert model_hash(longer, "sudoku", "insec") != model_hash(ctx, "sudoku", "insec")
    done = {"status": "done", "artifacts": []}
    write_manifest(
        ctx,
        {
            "stages": {
                "sudoku/ft": done | {"config_hash": model_hash(ctx, "sudoku", "ft")},
                "sudoku/eift": done | {"config_hash": model_hash(longer, "sudoku", "eift")},
                "sudoku/insec": done | {"config_hash": model_hash(ctx, "sudoku", "insec")},
                "sudoku/hybrid": {"status": "failed", "config_hash": "x"},
                "sudoku/grpo": done | {"config_hash": grpo_hash(longer.cfg, "sudoku")},
            }
        },
    )
    models = ["ft", "eift", "hybrid", "insec", "grpo", "by-hand"]
    stale = other_config_models(ctx, "sudoku", models)
    assert set(stale) == {"eift", "hybrid", "grpo"}
    assert "another config" in stale["eift"] and "'failed'" in stale["hybrid"]
    # Under the config that trained them, the same models are current.
    assert set(other_config_models(longer, "sudoku", ["eift", "grpo"])) == set()
