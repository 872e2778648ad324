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
    INSEC_PROTOCOL_TEXT,
    SECTIONS,
    build_report,
    decision_table,
    fig_decision,
    fig_learning_curves,
    figure6_table,
    gaps_table,
    headline,
    load_run,
    position_table,
    precision,
    select,
    train_final,
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
TRAIN_STEPS, PROBE_EVERY = 20, 5
# Which probes each method's metrics.parquet has (ft, base: no decision metrics at all).
TRAIN_PROBES = {
    "base": None,
    "ft": None,
    "eift": ("synthetic", "ft_errors"),
    "hybrid": (),  # decision metrics, no probe columns (train.probe_every = 0)
    "insec": ("synthetic",),  # trained before harvest: no FT-error probe
}


def train_history(task: str, method: str, probes: tuple[str, ...] | None) -> list[dict]:
    """Per-log-step metrics as the training loop logs them: decision metrics only for
    methods with recognition lines, probe values only at probe steps (and the final one)."""
    # a per task x method offset, so a value read from the wrong file shows
    k = 1 + sum(map(ord, method)) % 17 + (10 if task == "sudoku" else 0)
    hist = []
    for step in range(1, TRAIN_STEPS + 1):
        h = {"step": step, "loss": 2.0 / step, "loss_golden": 1.5 / step, "lr": 1e-3}
        if probes is not None:
            h |= {
                "loss_recognition": 0.5 / step + k / 1000,
                "loss_decision": 1.0 / step,
                "decision_loss": 3.0 / step + k / 100,
                "decision_accuracy": min(1.0, max(0.0, step / TRAIN_STEPS - k / 100)),
                "decision_n": 7.0,
                "decision_false_alarm_rate": 0.1 / step + k / 1000,
            }
            if step % PROBE_EVERY == 0 or step == TRAIN_STEPS:
                for c in probes:
                    h[f"probe_{c}_recognition"] = (
                        step / TRAIN_STEPS / (2 if c == "ft_errors" else 1)
                    )
        hist.append(h)
    return hist


def write_train_metrics(root: str, task: str, method: str, probes: tuple[str, ...] | None) -> None:
    """``<task>/models/<method>/metrics.parquet`` written the way rayjobs.train writes it."""
    hist = train_history(task, method, probes)
    cols = sorted({k for h in hist for k in h})
    table = pa.table({c: [h.get(c) for h in hist] for c in cols})
    io.write_parquet(io.join(root, task, "models", method, "metrics.parquet"), table)


def make_synthetic_run(root: str, seed: int = 0, stages: tuple[str, ...] = ("all",)) -> str:
    """Write a small run directory: config, manifest, per-item eval, summary, harvest, coverage,
    tune, training metrics."""
    rng = np.random.default_rng(seed)
    full = "all" in stages
    io.write_text(
        io.join(root, "config.yaml"),
        yaml.safe_dump({"name": "synthetic", "seed": seed, "tasks": list(TYPES)}),
    )
    io.write_json(
        io.join(root, "manifest.json"),
        {
            "stages": {
                "multiplication/data": {"status": "done", "seconds": 1.5},
                "multiplication/base": {
                    "status": "done",
                    "seconds": 61.25,
                    "startup_s": 17.5,
                    "compute_s": 38.25,
                },
            }
        },
    )
    items = []
    for task, types in TYPES.items():
        if full or "train" in stages:
            for method, probes in TRAIN_PROBES.items():
                write_train_metrics(root, task, method, probes)
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
                                    # Where the error stands, and flags after a correct last
                                    # step (no RNG draw: the other numbers stay as they were).
                                    "last_step": i % 3 == 0 if err else None,
                                    "n_ok_last_steps": None if err else 1,
                                    "n_false_alarms_last_step": None if err else int(i % 5 == 0),
                                    # The model's belief in the wrong step (no RNG draw).
                                    "wrong_step_surprise": (0.5 + (i % 5)) if err else None,
                                    # The signal's log-probability after the wrong and after
                                    # the paired step (no RNG draw): i % 4 in (0, 1) ranks right.
                                    "signal_logp": -1.0 - (i % 4) if err else None,
                                    "paired_signal_logp": -2.5 if err else None,
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
    names = ("figure6", "accuracy", "coverage", "error_types", "tune", "temperature")
    for name in (*names, "decision", "learning_curves"):
        png = tmp_path / "run" / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"figures/{name}.png" in text
    assert "multiplication/data" in text  # stage timings from the manifest
    # a training stage: wall, Ray Train start-up, optimizer steps
    assert "| multiplication/base | done | 61.2 | 17.5 | 38.2 |" in text


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


def test_stage_outputs_of_another_config_are_left_out_and_listed(tmp_path):
    # Harvest, coverage and tune skipped in a reused run directory keep the other config's
    # files. The report job names their stages stale (their recorded hash is not this
    # config's); the report leaves exactly their artifacts out and lists them.
    from rayjobs import report as job
    from rayjobs.common import JobContext
    from rayjobs.coverage import coverage_hash
    from rayjobs.tune import sweep_hash
    from selfcorrect.config import config_from_dict

    root = make_synthetic_run(str(tmp_path / "run"))
    cfg = config_from_dict(yaml.safe_load(open(io.join(root, "config.yaml"))))
    ctx = JobContext(cfg, root)
    manifest = io.read_json(io.join(root, "manifest.json"))
    for task in TYPES:
        manifest["stages"][f"{task}/tune"] = {
            "status": "done",
            "config_hash": sweep_hash(cfg, task) if task == "multiplication" else "0ther",
            "artifacts": [f"{task}/tune/results.parquet"],
        }
        manifest["stages"][f"{task}/coverage/ft"] = {
            "status": "done",
            "config_hash": coverage_hash(ctx, task) if task == "sudoku" else "0ther",
            "artifacts": [f"{task}/coverage/ft.parquet", f"{task}/coverage/ft-summary.parquet"],
        }
    # FT retrained after sudoku's harvest of the test split (not of the train split).
    manifest["stages"]["sudoku/ft"] = {"status": "done", "finished": 200.0}
    for split, started in (("test", 100.0), ("train", 300.0)):
        manifest["stages"][f"sudoku/harvest/ft-{split}"] = {
            "status": "done",
            "started": started,
            "artifacts": [f"sudoku/harvest/ft-{split}.parquet"],
        }
    io.write_json(io.join(root, "manifest.json"), manifest)
    stale = job.stale_stages(ctx)
    assert set(stale) == {"sudoku/tune", "multiplication/coverage/ft", "sudoku/harvest/ft-test"}
    assert "python -m rayjobs.tune" in stale["sudoku/tune"]
    run = load_run(root, stale)
    assert set(run.tune["task"]) == {"multiplication"}
    assert set(run.coverage["task"]) == {"sudoku"}
    kept = run.harvest.groupby(["task", "split"]).size().to_dict()
    assert ("sudoku", "test") not in kept and len(kept) == 3
    assert sorted(n.split("`")[1] for n in run.left_out) == [
        "multiplication/coverage/ft.parquet",
        "sudoku/harvest/ft-test.parquet",
        "sudoku/tune/results.parquet",
    ]
    job.main(["--output-dir", root])
    text = (tmp_path / "run" / "report.md").read_text()
    assert "## Results left out" in text and "`sudoku/tune/results.parquet`" in text
    # A notebook's load_run has no config: it keeps the report job's verdict...
    assert set(load_run(root).tune["task"]) == {"multiplication"}
    # ...while the stage's record is unchanged; a redone sweep is read again.
    manifest = io.read_json(io.join(root, "manifest.json"))
    manifest["stages"]["sudoku/tune"]["config_hash"] = sweep_hash(cfg, "sudoku")
    io.write_json(io.join(root, "manifest.json"), manifest)
    assert set(load_run(root).tune["task"]) == set(TYPES)


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
    # the training cell: the slice's metrics, the decision table, both training figures
    train = next(c for c in nb.cells if "report.fig_learning_curves(sub)" in c.source)
    shown = "".join(o.get("text", "") for o in train.outputs)
    assert "training metrics: 20 log steps of [('sudoku', 'eift')]" in shown
    tables = "".join(o.get("data", {}).get("text/plain", "") for o in train.outputs)
    assert "decision_false_alarm_rate" in tables
    assert sum("image/png" in o.get("data", {}) for o in train.outputs) == 2


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
    # The premise first (one line per task), then one sentence per task x method trained on
    # error traces (eift, hybrid; not ft).
    lines = headline(run)
    assert len(lines) == 2 + 2 * 2
    premise_lines = [line for line in lines if line.startswith("- Premise on ")]
    assert len(premise_lines) == 2 and lines[:2] == premise_lines
    lines = lines[2:]
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


def test_premise_line_says_whether_eift_meets_the_bar(tmp_path):
    """80% of synthetic errors recognised with at most 5% of clean problems flagged."""
    from selfcorrect.report import premise

    root = make_synthetic_run(str(tmp_path / "run"))
    run = load_run(root)
    s = run.summary
    base = (s.model == "eift") & (s.temperature == 0) & (s.error_type == "all")
    syn = base & (s.condition == "synthetic")
    clean = run.evals[
        (run.evals.model == "eift")
        & (run.evals.condition == "clean")
        & (run.evals.temperature == 0)
    ]
    for rec, alarms, verdict in ((0.85, False, "holds"), (0.85, True, "does **not** hold")):
        s.loc[syn, "recognition_rate"] = rec
        run.evals.loc[clean.index, "false_alarm"] = alarms
        lines = premise(run)
        assert len(lines) == 2 and all(verdict in line for line in lines), lines
        assert "85% of synthetic errors" in lines[0]
    s.loc[syn, "recognition_rate"] = 0.5
    run.evals.loc[clean.index, "false_alarm"] = False
    assert all("does **not** hold" in line for line in premise(run))


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


# ---------------------------------------------------------------------------
# Training metrics: run.train, the decision, learning curves
# ---------------------------------------------------------------------------


def _final(task: str, method: str, column: str) -> float:
    """The last logged value of ``column`` in the hand-made history (NaN if never logged)."""
    vals = [h[column] for h in train_history(task, method, TRAIN_PROBES[method]) if column in h]
    return vals[-1] if vals else float("nan")


def test_load_run_reads_training_metrics(tmp_path):
    root = make_synthetic_run(str(tmp_path / "run"), stages=("train",))
    # Hidden siblings (Ray storage, staging) and a model folder without metrics are not methods.
    write_train_metrics(root, "sudoku", ".eift-ray", ("synthetic",))
    os.makedirs(os.path.join(root, "sudoku", "models", "grpo"))
    run = load_run(root)
    assert run.notes == []
    assert run.tasks == ["multiplication", "sudoku"]
    t = run.train
    assert len(t) == 2 * len(TRAIN_PROBES) * TRAIN_STEPS
    assert set(t["method"]) == set(TRAIN_PROBES) and set(t["task"]) == set(TYPES)
    ft = t[t.method == "ft"]
    assert ft["decision_loss"].isna().all() and ft["loss"].notna().all()
    insec = t[(t.method == "insec") & (t.task == "sudoku")]
    assert insec["probe_ft_errors_recognition"].isna().all()
    probe_steps = insec.loc[insec["probe_synthetic_recognition"].notna(), "step"].tolist()
    assert probe_steps == [5, 10, 15, 20]


def test_train_final_and_decision_table(tmp_path):
    run = load_run(make_synthetic_run(str(tmp_path / "run"), stages=("train",)))
    final = train_final(run)
    # Only methods trained on error traces have decision metrics: not ft, not base.
    assert list(zip(final.task, final.method, strict=True)) == [
        (task, m) for task in TYPES for m in ("eift", "hybrid", "insec")
    ]
    assert list(final.columns) == [
        "task",
        "method",
        "step",
        "decision_loss",
        "decision_accuracy",
        "decision_false_alarm_rate",
        "loss_recognition",
        "probe_synthetic_recognition",
        "probe_ft_errors_recognition",
    ]
    for _, r in final.iterrows():
        assert r["step"] == TRAIN_STEPS
        for c in final.columns[3:]:
            want = _final(r["task"], r["method"], c)
            if np.isnan(want):
                assert np.isnan(r[c]), (r["task"], r["method"], c)
            else:
                assert r[c] == pytest.approx(want), (r["task"], r["method"], c)
    r = final[(final.task == "sudoku") & (final.method == "insec")].iloc[0]
    assert r["probe_synthetic_recognition"] == 1.0 and np.isnan(r["probe_ft_errors_recognition"])
    table = decision_table(run)
    cell = table[(table.task == "multiplication") & (table.method == "eift")].iloc[0]
    assert cell["decision_loss"] == f"{_final('multiplication', 'eift', 'decision_loss'):.3f}"
    assert (
        cell["decision_accuracy"] == f"{_final('multiplication', 'eift', 'decision_accuracy'):.2f}"
    )
    fa = _final("multiplication", "eift", "decision_false_alarm_rate")
    assert cell["decision_false_alarm_rate"] == f"{fa:.3f}"  # small: three decimals
    assert cell["probe_ft_errors_recognition"] == "0.50"
    hybrid = table[(table.task == "sudoku") & (table.method == "hybrid")].iloc[0]
    assert hybrid["probe_synthetic_recognition"] == "–"


def test_report_has_the_decision_and_learning_curves(tmp_path):
    root = make_synthetic_run(str(tmp_path / "run"), stages=("train",))
    run = load_run(root)
    fig = fig_learning_curves(run)
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == [
        "multiplication: recognition during training",
        "sudoku: recognition during training",
    ]
    lines = {ln.get_label(): ln for ln in axes[1].get_lines()}
    # eift: both probes + decision accuracy; insec: the synthetic probe + decision accuracy;
    # hybrid (no probes), ft and base are not drawn.
    assert set(lines) == {
        "EIFT: synthetic errors",
        "EIFT: FT errors",
        "EIFT: decision accuracy (train)",
        "InSeC: synthetic errors",
        "InSeC: decision accuracy (train)",
    }
    assert lines["EIFT: synthetic errors"].get_linestyle() == "-"
    assert lines["EIFT: FT errors"].get_linestyle() == "--"
    assert list(lines["EIFT: FT errors"].get_xdata()) == [5, 10, 15, 20]
    assert fig_decision(run) is not None
    text = open(write_report(root)).read()
    for name in ("decision", "learning_curves"):
        png = tmp_path / "run" / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"figures/{name}.png" in text
    assert "## The decision in training" in text and "## Learning curves" in text
    assert "hides the decision" in text
    assert f"| {_final('sudoku', 'insec', 'decision_loss'):.3f} |" in text


def test_learning_curves_skipped_without_probes(tmp_path):
    root = make_synthetic_run(str(tmp_path / "run"), stages=("train",))
    for task in TYPES:
        for method in ("eift", "insec"):
            write_train_metrics(root, task, method, ())  # train.probe_every = 0
    run = load_run(root)
    assert fig_learning_curves(run) is None
    final = train_final(run)
    assert not [c for c in final.columns if c.startswith("probe_")]
    text = open(write_report(root)).read()
    assert "_Skipped: no probe_* columns in <task>/models/<method>/metrics.parquet" in text
    assert "figures/learning_curves.png" not in text and "figures/decision.png" in text
    assert not (tmp_path / "run" / "figures" / "learning_curves.png").exists()


def test_no_training_metrics_skips_both_sections(tmp_path):
    root = make_synthetic_run(str(tmp_path / "run"), stages=("harvest",))
    run = load_run(root)
    assert run.train is None
    assert train_final(run) is None and decision_table(run) is None
    assert fig_learning_curves(run) is None and fig_decision(run) is None
    # ft alone: metrics, but no decision to report
    write_train_metrics(root, "sudoku", "ft", None)
    run = load_run(root)
    assert len(run.train) == TRAIN_STEPS and train_final(run) is None
    text = open(write_report(root)).read()
    assert "_Skipped: no decision metrics" in text


def test_corrupt_training_metrics_become_a_note(tmp_path):
    root = make_synthetic_run(str(tmp_path / "run"), stages=("train",))
    bad = tmp_path / "run" / "sudoku" / "models" / "eift" / "metrics.parquet"
    bad.write_bytes(b"not parquet")
    run = load_run(root)
    assert len(run.notes) == 1 and "sudoku/models/eift/metrics.parquet" in run.notes[0]
    assert "rayjobs.train" in run.notes[0]  # the stage to rerun
    assert not ((run.train.task == "sudoku") & (run.train.method == "eift")).any()
    final = train_final(run)
    assert ("sudoku", "eift") not in set(zip(final.task, final.method, strict=True))
    assert ("multiplication", "eift") in set(zip(final.task, final.method, strict=True))
    text = open(write_report(root)).read()
    assert "Files that could not be read" in text and "figures/learning_curves.png" in text


def test_select_filters_training_metrics(tmp_path):
    run = load_run(make_synthetic_run(str(tmp_path / "run")))
    sub = select(run, method="insec")
    assert set(sub.train["method"]) == {"insec"} and set(sub.train["task"]) == set(TYPES)
    sub = select(run, task="sudoku", method=["eift", "ft"], error_type="invalid")
    assert set(sub.train["method"]) == {"eift", "ft"} and set(sub.train["task"]) == {"sudoku"}
    assert len(sub.train) == 2 * TRAIN_STEPS  # log steps have no error type: all kept
    final = train_final(sub)
    assert list(zip(final.task, final.method, strict=True)) == [("sudoku", "eift")]
    assert len(fig_learning_curves(sub).get_axes()) == 1
    assert select(run, method="grpo").train.empty
    assert len(run.train) == 2 * len(TRAIN_PROBES) * TRAIN_STEPS  # the run itself unchanged


def test_report_documents_insec_format_and_protocol(tmp_path):
    root = make_synthetic_run(str(tmp_path / "run"), stages=("harvest",))
    text = open(write_report(root)).read()
    assert "## Definitions" in text and INSEC_PROTOCOL_TEXT in text
    assert "`</mistake>`" in INSEC_PROTOCOL_TEXT and "unmarked" in INSEC_PROTOCOL_TEXT
    assert "no opening `<mistake>` marker" in INSEC_PROTOCOL_TEXT


def test_report_header_names_the_precision_path(tmp_path):
    root = make_synthetic_run(str(tmp_path / "run"), stages=("train",))
    assert precision(load_run(root)) is None  # metrics without a bf16 column: no claim

    def set_bf16(task: str, method: str, value: bool) -> None:
        path = io.join(root, task, "models", method, "metrics.parquet")
        table = io.read_parquet(path)
        table = table.drop_columns([c for c in ["bf16"] if c in table.column_names])
        table = table.append_column("bf16", pa.array([value] * len(table)))
        io.write_parquet(path, table)

    for task in TYPES:
        for method in TRAIN_PROBES:
            set_bf16(task, method, False)
    text = open(write_report(root)).read()
    header = text.split("## ")[0]
    assert "- training precision: fp32 for every model" in header
    set_bf16("sudoku", "eift", True)
    line = precision(load_run(root))
    assert line.startswith(
        "- training precision: bf16 autocast (fp32 master weights) for sudoku/eift;"
    )
    fp32 = line.split("; fp32 for ")[1].split(" (")[0].split(", ")
    assert "sudoku/eift" not in fp32 and "multiplication/eift" in fp32
    assert len(fp32) == 2 * len(TRAIN_PROBES) - 1


def test_position_table_splits_recognition_at_the_last_step(tmp_path):
    root = make_synthetic_run(str(tmp_path / "run"))
    run = load_run(root)
    table = position_table(run)
    e = run.evals
    t0 = min(TEMPS)
    for task in TYPES:
        for model in ("eift", "hybrid"):
            for cond, label in (("synthetic", "synthetic errors"), ("own_errors", "own errors")):
                g = e[(e.task == task) & (e.model == model) & (e.condition == cond)]
                g = g[g.temperature == t0]
                last = g["last_step"].astype(bool)
                row = table[
                    (table.task == task) & (table.method == model) & (table.errors == label)
                ]
                row = row.iloc[0]
                assert row["at last step"] == f"{last.mean():.0%} of {len(g)}"
                for col, part in (
                    ("recognition, earlier steps", g[~last]),
                    ("recognition, last step", g[last]),
                ):
                    rate = part["recognized"].astype(bool).mean()
                    assert row[col].startswith(f"{rate:.2f} [") and row[col].endswith(
                        f"(n {len(part)})"
                    )
                assert row["flags after a correct last step"].startswith("0.20 [")  # 5 of 25
    text = open(write_report(root)).read()
    assert "## Recognition by where the error stands" in text and "| at last step |" in text
    # A run from before `last_step`: the section is skipped, nothing else changes.
    run.evals = run.evals.drop(columns=["last_step"])
    assert position_table(run) is None


def test_belief_table_splits_recognition_by_surprise(tmp_path):
    from selfcorrect.report import SURPRISING_NATS, belief_table

    root = make_synthetic_run(str(tmp_path / "run"))
    run = load_run(root)
    table = belief_table(run)
    e = run.evals
    for task in TYPES:
        for cond, label in (("synthetic", "synthetic errors"), ("own_errors", "own errors")):
            g = e[(e.task == task) & (e.model == "eift") & (e.condition == cond)]
            g = g[g.temperature == min(TEMPS)]
            hi = (
                g["wrong_step_surprise"] > SURPRISING_NATS
            )  # 2.5, 3.5, 4.5 of 0.5..4.5 (ln 10 = 2.3)
            assert hi.mean() == 0.6
            row = table[(table.task == task) & (table.method == "eift") & (table.errors == label)]
            row = row.iloc[0]
            assert row["median surprise (nats)"] == f"{g['wrong_step_surprise'].median():.2f}"
            assert row["surprising"] == f"60% of {len(g)}"
            for col, part in (
                ("recognition, surprising", g[hi]),
                ("recognition, not surprising", g[~hi]),
            ):
                rate = part["recognized"].astype(bool).mean()
                assert row[col].startswith(f"{rate:.2f} [") and row[col].endswith(
                    f"(n {len(part)})"
                )
    assert "clean" not in set(table["errors"])
    text = open(write_report(root)).read()
    assert "## Recognition by the model's belief in the error" in text
    # A run from before the column: the section is skipped with its note.
    run.evals = run.evals.drop(columns=["wrong_step_surprise"])
    assert belief_table(run) is None


def test_ranking_table_and_headline_read_the_discrimination_rate(tmp_path):
    """The threshold-free comparison: per origin, the share of errors after which the signal
    is likelier than after the paired correct step, and synthetic minus own with its interval."""
    from selfcorrect.report import headline, ranking_table

    run = load_run(make_synthetic_run(str(tmp_path / "run")))
    table = ranking_table(run)
    e = run.evals
    for task in TYPES:
        g = e[(e.task == task) & (e.model == "eift") & (e.temperature == min(TEMPS))]
        row = table[(table.task == task) & (table.method == "eift")].iloc[0]
        for cond, label in (("synthetic", "synthetic errors"), ("own_errors", "own errors")):
            part = g[g.condition == cond]
            share = (part["signal_logp"] > part["paired_signal_logp"]).mean()  # i % 4 in (0, 1)
            assert share == pytest.approx(
                ((part["item_id"].str.split("-").str[-1].astype(int) % 4) < 2).mean()
            )
            assert row[label].startswith(f"{share:.2f} [") and row[label].endswith(
                f"(n {len(part)})"
            )
        gap = run.summary
        gap = gap_table(gap[gap.temperature == min(TEMPS)], "discrimination_rate", n="n_paired")
        x = gap[
            (gap.task == task) & (gap.model == "eift") & (gap.comparison == "synthetic-own_errors")
        ].iloc[0]
        assert row["synthetic − own"] == f"{x['diff']:.2f} [{x['diff_lo']:.2f}, {x['diff_hi']:.2f}]"
    assert any(
        "Without the greedy threshold" in line and "FT, never taught it" in line
        for line in headline(run)
    )
    # Runs without the scores (eval.surprise off, older runs): no table, the headline as before.
    run.summary = run.summary.drop(columns=[c for c in run.summary if "discrimination" in c])
    assert ranking_table(run) is None
    assert not any("Without the greedy threshold" in line for line in headline(run))


def test_results_of_another_config_are_left_out_and_listed(tmp_path):
    # A run directory reused with a narrower config keeps the other config's files: a task
    # the config does not list and a model its eval did not summarise. Neither may reach
    # the report's tables; both are listed under "Results left out".
    root = make_synthetic_run(str(tmp_path / "run"))
    config = {"name": "synthetic", "seed": 0, "tasks": ["sudoku"]}
    config["train"] = {"methods": ["ft", "eift", "hybrid"]}
    io.write_text(io.join(root, "config.yaml"), yaml.safe_dump(config))
    stale = load_run(root).evals.query("task == 'sudoku' and model == 'eift'")
    io.write_parquet(
        io.join(root, "sudoku", "eval", "insec.parquet"), stale.drop(columns=["task", "model"])
    )
    write_train_metrics(root, "sudoku", "insec", None)
    run = load_run(root)
    assert run.tasks == ["sudoku"] and "insec" not in run.models
    assert set(run.evals["task"]) == {"sudoku"} and "insec" not in set(run.evals["model"])
    assert "insec" not in set(run.train["method"]) and "base" in set(run.train["method"])
    assert len(run.left_out) == 3
    assert any(n.startswith("`multiplication/`") for n in run.left_out)
    assert any("sudoku/eval/insec.parquet" in n for n in run.left_out)
    text = open(write_report(root)).read()
    assert "## Results left out" in text and "sudoku/models/insec/metrics.parquet" in text
    assert "| multiplication |" not in text and "| insec |" not in text
    # Without an eval summary there is nothing to go by: every model on disk is read.
    os.remove(io.join(root, "eval_summary.parquet"))
    os.remove(io.join(root, "eval_gaps.parquet"))
    assert "insec" in set(load_run(root).evals["model"])
