"""Report + analysis notebook on a small synthetic run directory with the DESIGN 7 columns.

The run directory here is built from a seeded RNG (not by the pipeline), so these
tests are fast and know the true numbers; tests/test_pipeline.py runs the same
report and notebook on a real smoke run.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml

from selfcorrect import io
from selfcorrect.evaluate import rows_frame, summarize
from selfcorrect.report import (
    SECTIONS,
    build_report,
    figure6_table,
    gaps_table,
    headline,
    load_run,
    select,
    wilson,
    write_report,
)
from selfcorrect.stats import (
    CLUSTER_BOOTSTRAP,
    GAP_SCHEMA,
    INTERVAL_METHODS_TEXT,
    WILSON,
    gap_table,
    wilson_interval,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPES = {
    "multiplication": ["carry", "digit", "int_10", "other"],
    "sudoku": ["invalid", "non_naked_single", "other"],
}
MODELS = ["ft", "eift", "hybrid"]
CONDITIONS = ("clean", "synthetic", "ft_errors", "matched_synthetic", "own_errors")
TEMPS = [0.0, 1.0]


def make_synthetic_run(root: str, seed: int = 0, stages: tuple[str, ...] = ("all",)) -> str:
    """Write a small run directory: config, manifest, per-item eval, summary, harvest, coverage, tune."""
    rng = np.random.default_rng(seed)
    full = "all" in stages
    io.write_text(
        io.join(root, "config.yaml"),
        yaml.safe_dump({"name": "synthetic", "seed": seed, "tasks": list(TYPES)}),
    )
    io.write_json(
        io.join(root, "manifest.json"),
        {"stages": {"multiplication/data": {"status": "done", "seconds": 1.5}}},
    )
    items = []
    for task, types in TYPES.items():
        if full or "harvest" in stages:
            for split in ("train", "test"):
                n = 30
                io.write_parquet(
                    io.join(root, task, "harvest", f"ft-{split}.parquet"),
                    pd.DataFrame(
                        {
                            "error_id": [f"{task}-{split}-{i}" for i in range(n)],
                            "problem_id": [f"p{i}" for i in range(n)],
                            "task": task,
                            "model": "ft",
                            "temperature": 0.0,
                            "step_index": rng.integers(0, 5, n),
                            "prefix": "x",
                            "wrong_step": "y",
                            "gold_step": "z",
                            "error_type": rng.choice(types, n),
                        }
                    ),
                )
        if full or "coverage" in stages:
            n = 40
            n_exact = rng.integers(0, 50, n) * (rng.random(n) < 0.6)
            io.write_parquet(
                io.join(root, task, "coverage", "ft.parquet"),
                pd.DataFrame(
                    {
                        "error_id": [f"e{i}" for i in range(n)],
                        "n_samples": 10000,
                        "n_exact": n_exact,
                        "covered": n_exact > 0,
                        "p_exact": n_exact / 10000,
                        "p_exact_analytic": None,
                        "error_type": rng.choice(types, n),
                    }
                ),
            )
        if full or "tune" in stages:
            rates = [0.05, 0.1, 0.2, 0.5]
            io.write_parquet(
                io.join(root, task, "tune", "results.parquet"),
                pd.DataFrame(
                    {
                        "task": task,
                        "trial_id": [f"t{i}" for i in range(len(rates))],
                        "status": "done",
                        "injection_rate": rates,
                        "clean_accuracy": rng.random(len(rates)),
                        "synthetic_recognition_rate": rng.random(len(rates)),
                        "own_errors_recognition_rate": rng.random(len(rates)),
                        "val_loss": rng.random(len(rates)),
                    }
                ),
            )
        if full or "eval" in stages:
            for model in MODELS:
                rows = []
                for cond in CONDITIONS:
                    for t in TEMPS:
                        for i in range(25):
                            err = cond != "clean"
                            rec = bool(rng.random() < 0.5) if err else None
                            # Clustered like real runs: two FT errors per problem (and their
                            # matched items), up to three own errors per free generation.
                            per = {"ft_errors": 2, "matched_synthetic": 2, "own_errors": 3}
                            pid = f"p{i // per.get(cond, 1)}"
                            trace = f"clean-{t}-{pid}" if cond == "own_errors" else None
                            rows.append(
                                {
                                    "task": task,
                                    "model": model,
                                    "condition": cond,
                                    "temperature": t,
                                    "item_id": f"{cond}-{i}",
                                    "problem_id": pid,
                                    "error_type": rng.choice(types) if err else None,
                                    "correct": bool(rng.random() < 0.6),
                                    "recognized": rec,
                                    "corrected": (bool(rng.random() < 0.5) and rec)
                                    if err
                                    else None,
                                    "parroted": (bool(rng.random() < 0.2) and rec) if err else None,
                                    "false_alarm": bool(rng.random() < 0.05),
                                    "trace_id": trace or f"{cond}-{t}-p{i}",
                                    "n_ok_steps": None if cond == "own_errors" else 5,
                                    "n_false_alarms": None
                                    if cond == "own_errors"
                                    else int(rng.random() < 0.2),
                                }
                            )
                df = rows_frame(rows)
                io.write_parquet(io.join(root, task, "eval", f"{model}.parquet"), df)
                items.append(df)
    if full or "eval" in stages:
        summary = summarize(pd.concat(items), seed=seed)
        io.write_parquet(io.join(root, "eval_summary.parquet"), summary)
        gaps = pa.Table.from_pandas(gap_table(summary), schema=GAP_SCHEMA, preserve_index=False)
        io.write_parquet(io.join(root, "eval_gaps.parquet"), gaps)
    return root


def test_wilson_interval_contains_estimate_and_shrinks_with_n():
    lo, hi = wilson(30, 100)
    assert lo < 0.3 < hi
    lo2, hi2 = wilson(300, 1000)
    assert hi2 - lo2 < hi - lo
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    assert all(np.isnan(wilson(0, 0)))


def test_report_wilson_is_the_stats_module_one():
    assert wilson is wilson_interval


def test_load_run_reads_every_table(tmp_path):
    root = make_synthetic_run(str(tmp_path / "run"))
    run = load_run(root)
    assert run.tasks == ["multiplication", "sudoku"]
    assert run.models == ["ft", "eift", "hybrid"]
    assert set(run.harvest["split"]) == {"train", "test"}
    assert set(run.harvest["model"]) == {"ft"}
    assert len(run.coverage) == 80 and len(run.tune) == 8
    assert "other" == run.error_types[-1]
    assert run.notes == []
    assert set(run.gaps["comparison"]) == {
        "synthetic-own_errors",
        "synthetic-ft_errors",
        "synthetic-matched_synthetic",
    }


def test_side_tables_of_stages_are_not_mistaken_for_results(tmp_path):
    root = make_synthetic_run(str(tmp_path / "run"))
    side = pd.DataFrame({"x": [1]})
    io.write_parquet(io.join(root, "sudoku", "eval", "summary.parquet"), side)
    io.write_parquet(io.join(root, "sudoku", "harvest", "ft-train-outcomes.parquet"), side)
    io.write_parquet(io.join(root, "sudoku", "coverage", "ft-summary.parquet"), side)
    run = load_run(root)
    assert set(run.evals["model"]) == set(MODELS)
    assert set(run.harvest["split"]) == {"train", "test"} and "x" not in run.harvest
    assert set(run.coverage["model"]) == {"ft"}


def test_figure6_table_matches_summary(tmp_path):
    run = load_run(make_synthetic_run(str(tmp_path / "run")))
    table = figure6_table(run)
    assert list(table["task"].unique()) == ["multiplication", "sudoku"]
    assert len(table) == 2 * len(MODELS)
    s = run.summary[run.summary.error_type == "all"]
    row = s[
        (s.task == "sudoku")
        & (s.model == "eift")
        & (s.condition == "own_errors")
        & (s.temperature == 0.0)
    ].iloc[0]
    cell = table[(table.task == "sudoku") & (table.method == "eift")]["recog own errors"].iloc[0]
    expected = (
        f"{row.recognition_rate:.2f} [{row.recognition_rate_lo:.2f}, {row.recognition_rate_hi:.2f}]"
    )
    assert cell == expected


def test_select_by_error_type_recomputes_rates(tmp_path):
    run = load_run(make_synthetic_run(str(tmp_path / "run")))
    sub = select(run, task="sudoku", method="eift", error_type="invalid")
    assert set(sub.harvest["error_type"]) == {"invalid"}
    assert set(sub.summary["model"]) == {"eift"} and set(sub.summary["task"]) == {"sudoku"}
    ev = run.evals
    g = ev[
        (ev.task == "sudoku")
        & (ev.model == "eift")
        & (ev.condition == "synthetic")
        & (ev.temperature == 0.0)
        & (ev.error_type == "invalid")
    ]
    s = sub.summary
    r = s[(s.condition == "synthetic") & (s.temperature == 0.0) & (s.error_type == "all")]
    assert int(r["n"].iloc[0]) == len(g)
    assert r["recognition_rate"].iloc[0] == pytest.approx(g["recognized"].astype(float).mean())


def test_select_without_item_rows_uses_per_type_summary_rows(tmp_path):
    run = load_run(make_synthetic_run(str(tmp_path / "run")))
    run.evals = None
    s = run.summary
    want = s[
        (s.task == "multiplication")
        & (s.model == "ft")
        & (s.condition == "ft_errors")
        & (s.temperature == 0.0)
        & (s.error_type == "carry")
    ]
    sub = select(run, task="multiplication", method="ft", error_type="carry")
    table = figure6_table(sub)
    assert len(table) == 1
    assert table["recog FT errors"].iloc[0].startswith(f"{want.recognition_rate.iloc[0]:.2f} [")
    assert "clean" in set(sub.summary.condition)  # accuracy does not depend on error type


def test_write_report_all_sections(tmp_path):
    root = make_synthetic_run(str(tmp_path / "run"))
    path = write_report(root)
    text = open(path).read()
    for sec in SECTIONS:
        assert f"## {sec.title}" in text
    assert "_Skipped" not in text
    for name in ("figure6", "accuracy", "coverage", "error_types", "tune", "temperature"):
        png = tmp_path / "run" / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"figures/{name}.png" in text
    assert "multiplication/data" in text  # stage timings from the manifest


def test_report_skips_absent_inputs_with_a_note(tmp_path):
    root = make_synthetic_run(str(tmp_path / "run"), stages=("harvest",))
    text = open(write_report(root)).read()
    assert "figures/error_types.png" in text
    assert text.count("_Skipped:") == len(SECTIONS) - 1
    assert "run rayjobs.evaluate" in text and "run rayjobs.coverage" in text
    assert sorted(os.listdir(tmp_path / "run" / "figures")) == ["error_types.png"]


def test_report_notes_a_corrupt_file(tmp_path):
    root = make_synthetic_run(str(tmp_path / "run"))
    (tmp_path / "run" / "sudoku" / "coverage" / "ft.parquet").write_bytes(b"not parquet")
    run = load_run(root)
    assert len(run.notes) == 1 and "ft.parquet" in run.notes[0]
    text = open(write_report(root)).read()
    assert "Files that could not be read" in text


def test_missing_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the pipeline first"):
        load_run(str(tmp_path / "nope"))


def test_report_job_cli(tmp_path):
    from rayjobs import report as job

    root = make_synthetic_run(str(tmp_path / "run"))
    job.main(["--output-dir", root])
    assert (tmp_path / "run" / "report.md").exists()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["report"]["status"] == "done"


def execute_notebook(
    run_dir: str,
    task: str | None = None,
    method: str | None = None,
    error_type: str | None = None,
):
    """Run notebooks/analysis.ipynb top to bottom with nbclient; returns the executed notebook."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(os.path.join(REPO, "notebooks", "analysis.ipynb"), as_version=4)
    env = {
        "SELFCORRECT_RUN": run_dir,
        "SELFCORRECT_TASK": task or "",
        "SELFCORRECT_METHOD": method or "",
        "SELFCORRECT_ERROR_TYPE": error_type or "",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits them
    try:
        nbclient.NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": REPO}}
        ).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def test_notebook_executes_on_a_run_directory(tmp_path):
    """The analysis notebook runs top to bottom, sliced by task / method / error type."""
    root = make_synthetic_run(str(tmp_path / "run"))
    nb = execute_notebook(root, task="sudoku", method="eift", error_type="invalid")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # every report figure, then the sliced ones
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "slice: task=sudoku method=eift error_type=invalid" in text
    # the per-error-type table of the slice holds only the chosen type
    pivot = next(c for c in nb.cells if "pivot_table" in c.source)
    shown = "".join(o.get("data", {}).get("text/plain", "") for o in pivot.outputs)
    assert "invalid" in shown and "non_naked_single" not in shown


def _greedy_gap(run, task, model, comparison):
    g = run.gaps
    return g[
        (g.task == task) & (g.model == model) & (g.comparison == comparison) & (g.temperature == 0)
    ].iloc[0]


def test_summary_intervals_follow_the_clustering(tmp_path):
    run = load_run(make_synthetic_run(str(tmp_path / "run")))
    s = run.summary[run.summary.error_type == "all"]
    methods = s.groupby("condition")["interval_method"].agg(set)
    assert methods["clean"] == methods["synthetic"] == {WILSON}
    # Several items per problem: two FT errors (and their matched items), own errors.
    for cond in ("ft_errors", "matched_synthetic", "own_errors"):
        assert methods[cond] == {CLUSTER_BOOTSTRAP}, cond
    assert set(s["false_alarm_interval_method"].dropna()) == {CLUSTER_BOOTSTRAP}
    own = s[s.condition == "own_errors"]
    assert (own["n_problems"] < own["n"]).all()
    # Never narrower than Wilson on the pooled counts.
    for _, r in own.iterrows():
        lo, hi = wilson_interval(r["n_recognized"], r["n"])
        assert r["recognition_rate_lo"] <= lo + 1e-12 and r["recognition_rate_hi"] >= hi - 1e-12


def test_gap_table_and_headline(tmp_path):
    root = make_synthetic_run(str(tmp_path / "run"))
    run = load_run(root)
    # eval_gaps.parquet as written is what gap_table computes from the summary.
    pd.testing.assert_frame_equal(run.gaps, gap_table(run.summary), check_dtype=False)
    table = gaps_table(run)
    assert len(table) == 2 * len(MODELS)
    assert list(table.columns) == [
        "task",
        "method",
        "synthetic − own",
        "synthetic − FT",
        "synthetic − matched",
        "interval",
    ]
    x = _greedy_gap(run, "sudoku", "eift", "synthetic-own_errors")
    cell = table[(table.task == "sudoku") & (table.method == "eift")]["synthetic − own"].iloc[0]
    assert cell.startswith(f"{x['diff']:.2f} [{x['diff_lo']:.2f}, {x['diff_hi']:.2f}]")
    assert x["method"] == "newcombe_mover_cluster_bootstrap"
    # One headline sentence per task x method trained on error traces (eift, hybrid; not ft).
    lines = headline(run)
    assert len(lines) == 2 * 2
    assert not any(line.startswith("- FT ") for line in lines)
    eift_sudoku = next(line for line in lines if "EIFT" in line and "on sudoku" in line)
    s = run.summary
    syn = s[
        (s.task == "sudoku")
        & (s.model == "eift")
        & (s.condition == "synthetic")
        & (s.temperature == 0)
        & (s.error_type == "all")
    ].iloc[0]
    assert f"recognises {100 * syn['recognition_rate']:.0f}% of synthetic errors" in eift_sudoku
    assert f"(gap {x['diff']:.2f}, 95% CI {x['diff_lo']:.2f} to {x['diff_hi']:.2f}" in eift_sudoku
    assert "synthetic errors at those same states" in eift_sudoku
    text, figures = build_report(run)
    assert text.index("## Headline") < text.index("## The gap") < text.index("## Recognition")
    assert eift_sudoku in text and "gaps.png" in figures
    assert "## Statistical methods" in text and INTERVAL_METHODS_TEXT in text
    assert "Newcombe" in text and "bootstrap over problems" in text
    # Figure 6 and the rates table have the matched condition.
    assert "recog matched synthetic" in figure6_table(run).columns
    assert "| matched synthetic |" in text


def test_gaps_without_eval_gaps_parquet_and_for_a_slice(tmp_path):
    root = make_synthetic_run(str(tmp_path / "run"))
    os.remove(os.path.join(root, "eval_gaps.parquet"))
    run = load_run(root)  # a run from before eval_gaps.parquet: computed from the summary
    assert run.gaps is not None and len(run.gaps) == 2 * len(MODELS) * len(TEMPS) * 3
    sub = select(run, task="sudoku", method="eift", error_type="invalid")
    assert set(sub.gaps["task"]) == {"sudoku"} and set(sub.gaps["model"]) == {"eift"}
    s = sub.summary[(sub.summary.temperature == 0) & (sub.summary.error_type == "all")]
    rec = s.set_index("condition")["recognition_rate"]
    x = _greedy_gap(sub, "sudoku", "eift", "synthetic-ft_errors")
    assert x["diff"] == pytest.approx(rec["synthetic"] - rec["ft_errors"])


def test_report_without_eval_has_no_headline_or_methods(tmp_path):
    root = make_synthetic_run(str(tmp_path / "run"), stages=("harvest",))
    text = open(write_report(root)).read()
    assert "## Headline" not in text and "## Statistical methods" not in text
