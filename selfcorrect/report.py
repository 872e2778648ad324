"""Report: a run directory -> ``report.md`` + ``figures/*.png`` (DESIGN 5, 7).

Everything here reads the Parquet files of DESIGN 7 and nothing else, so the
same functions serve the report stage and ``notebooks/analysis.ipynb``:

    run = load_run("runs/tiny")                  # local dir or URI
    sub = select(run, task="sudoku", method=["ft", "eift"], error_type="invalid")
    fig_figure6(sub)                             # a matplotlib Figure, or None
    train_final(sub); fig_learning_curves(sub)   # training metrics (run.train)
    write_report("runs/tiny")                    # report.md + figures/

Each figure function returns ``None`` when its input is absent (a stage that
was switched off or has not run yet); ``write_report`` then writes a short
note instead of the figure, so a partial run still gets a report.
"""

from __future__ import annotations

import io as _bytesio
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import yaml

# Figures are built with the object API (no pyplot): no display needed on clusters and CI,
# no global figure state, and a notebook shows them with display(fig).
from matplotlib.figure import Figure

from selfcorrect import io
from selfcorrect.stats import (
    GAP_COLUMNS,
    INTERVAL_METHODS_TEXT,
    MOVER_CLUSTER,
    NEWCOMBE,
    comparison_name,
    gap_table,
)
from selfcorrect.stats import wilson_interval as wilson  # the report's name for it

TASKS = ("multiplication", "sudoku")
ALL_TYPES = "all"  # error_type of the eval summary's aggregate rows
MODELS = ("ft", "eift", "hybrid", "insec", "grpo")
CONDITIONS = ("clean", "synthetic", "ft_errors", "matched_synthetic", "own_errors")
ERROR_CONDITIONS = ("synthetic", "ft_errors", "matched_synthetic", "own_errors")
# Methods trained on traces with errors and recognition lines: the headline is about them.
ERROR_TRACE_METHODS = ("eift", "hybrid", "insec")
METHOD_LABEL = {"ft": "FT", "eift": "EIFT", "hybrid": "Hybrid", "insec": "InSeC", "grpo": "GRPO"}
RATES = ("accuracy", "recognition_rate", "correction_rate", "parrot_rate", "false_alarm_rate")
CONDITION_LABEL = {
    "clean": "clean",
    "synthetic": "synthetic errors",
    "ft_errors": "FT errors",
    "matched_synthetic": "matched synthetic",
    "own_errors": "own errors",
}
CONDITION_COLOR = {
    "clean": "#7f7f7f",
    "synthetic": "#4c72b0",
    "ft_errors": "#dd8452",
    "matched_synthetic": "#8c8cd9",
    "own_errors": "#55a868",
}
INTERVAL_LABEL = {
    NEWCOMBE: "Newcombe (Wilson)",
    MOVER_CLUSTER: "Newcombe/MOVER, cluster bootstrap",
}
METHOD_COLOR = {
    "ft": "#7f7f7f",
    "eift": "#4c72b0",
    "hybrid": "#dd8452",
    "insec": "#55a868",
    "grpo": "#c44e52",
}
# Training metrics (models/<method>/metrics.parquet): the decision after a wrong step, the
# forced rest of the recognition line, and the greedy recognition probes (learning curves).
DECISION_COLUMNS = ("decision_loss", "decision_accuracy", "decision_false_alarm_rate")
PROBE_COLUMNS = ("probe_synthetic_recognition", "probe_ft_errors_recognition")
TRAIN_FINAL_COLUMNS = (*DECISION_COLUMNS, "loss_recognition", *PROBE_COLUMNS)
PROBE_STYLE = {
    "probe_synthetic_recognition": ("-", "synthetic errors"),
    "probe_ft_errors_recognition": ("--", "FT errors"),
}
INSEC_PROTOCOL_TEXT = (
    "**InSeC's format and eval protocol.** An InSeC mistake is written *unmarked*, exactly as "
    "a model's own wrong step is, then `</mistake>` on its own line, then the correct step; "
    "there is no opening `<mistake>` marker (the model would have to write it before the "
    "mistake, i.e. plan it). Eval therefore gives InSeC the same unmarked prefixes as every "
    "other method and counts `</mistake>` after a wrong step as recognition, exactly as the "
    "line `AH! I MADE A MISTAKE.` counts for EIFT and hybrid; correction, parroting and false "
    "alarms are scored the same way for both signals."
)
DECISION_TEXT = (
    "**The decision.** The first token(s) of the recognition signal (`AH` of the EIFT line, "
    "InSeC's `</mistake>`) decide whether an error is flagged; the rest of the line is "
    "forced. Training logs, per log window, `decision_loss` (-log p of flagging, per wrong "
    "step), `decision_accuracy` (the argmax flags it) and `decision_false_alarm_rate` (the "
    "argmax would start the signal after a correct step); with `train.probe_every`, greedy "
    "recognition probes on a fixed set of synthetic and FT-error items "
    "(`probe_synthetic_recognition`, `probe_ft_errors_recognition`) give the learning curves."
)
GAP_LABEL = {
    comparison_name("synthetic", "own_errors"): "synthetic − own",
    comparison_name("synthetic", "ft_errors"): "synthetic − FT",
    comparison_name("synthetic", "matched_synthetic"): "synthetic − matched",
}


@dataclass
class Run:
    """All tables of one run directory, each with ``task`` (and ``model``/``split``) columns."""

    root: str
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    summary: pd.DataFrame | None = None  # eval_summary.parquet
    gaps: pd.DataFrame | None = None  # eval_gaps.parquet (else computed from the summary)
    evals: pd.DataFrame | None = None  # <task>/eval/<model>.parquet, concatenated
    harvest: pd.DataFrame | None = None  # <task>/harvest/<model>-<split>.parquet
    coverage: pd.DataFrame | None = None  # <task>/coverage/<model>.parquet
    tune: pd.DataFrame | None = None  # <task>/tune/results.parquet
    # <task>/models/<method>/metrics.parquet (base, grpo included), one row per log step
    train: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)  # files that could not be read
    # Results on disk that are not this run's (another config's tasks or models), and why.
    left_out: list[str] = field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        found: set[str] = set()
        for df in (self.summary, self.evals, self.harvest, self.coverage, self.tune, self.train):
            if df is not None and "task" in df:
                found.update(df["task"].dropna().unique())
        order = list(self.config.get("tasks") or TASKS)
        return [t for t in order if t in found] + sorted(found - set(order))

    @property
    def models(self) -> list[str]:
        found: set[str] = set()
        for df in (self.summary, self.evals):
            if df is not None and "model" in df:
                found.update(df["model"].dropna().unique())
        return [m for m in MODELS if m in found] + sorted(found - set(MODELS))

    @property
    def error_types(self) -> list[str]:
        found: set[str] = set()
        for df in (self.harvest, self.coverage, self.evals):
            if df is not None and "error_type" in df:
                found.update(str(x) for x in df["error_type"].dropna().unique())
        return sorted(found - {"other"}) + (["other"] if "other" in found else [])


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if io.is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _list(path: str, suffix: str) -> list[str]:
    """File names (not paths) in ``path`` ending with ``suffix``; [] when the folder is absent."""
    fs, p = _fs(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    return sorted(
        i.base_name
        for i in infos
        if i.type == pafs.FileType.File
        and i.base_name.endswith(suffix)
        and not i.base_name.startswith(".")
    )


def _list_dirs(path: str) -> list[str]:
    """Sub-folder names of ``path``, hidden ones (staging, Ray storage) left out; [] if absent."""
    fs, p = _fs(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    return sorted(
        i.base_name
        for i in infos
        if i.type == pafs.FileType.Directory and not i.base_name.startswith(".")
    )


def _read(path: str, notes: list[str], **extra: str) -> pd.DataFrame | None:
    """One Parquet file as a DataFrame with ``extra`` constant columns; a bad file becomes a note."""
    try:
        df = io.read_parquet(path).to_pandas()
    except (OSError, ValueError) as e:
        notes.append(f"skipped {path}: {e}")
        return None
    for k, v in extra.items():
        if k not in df.columns:
            df[k] = v
    return df


def _concat(frames: Iterable[pd.DataFrame | None]) -> pd.DataFrame | None:
    frames = [f for f in frames if f is not None and len(f.columns)]
    return pd.concat(frames, ignore_index=True) if frames else None


def load_run(root: str, stale: Mapping[str, str] | None = None) -> Run:
    """Read every result table of a run directory (local path or pyarrow URI).

    Missing stages simply leave their table as ``None``. ``stale``: manifest stage keys whose
    outputs are another config's (``rayjobs.report.stale_stages``) -> why; their artifacts
    are left out and listed in ``Run.left_out``.
    """
    root = str(root)
    if not io.exists(root):
        raise FileNotFoundError(
            f"run directory {root} does not exist; run the pipeline first "
            f"(python -m rayjobs.pipeline --config configs/tiny.yaml --output-dir {root})"
        )
    run = Run(root=root)
    if io.exists(io.join(root, "config.yaml")):
        run.config = yaml.safe_load(io.read_bytes(io.join(root, "config.yaml")).decode()) or {}
    if io.exists(io.join(root, "manifest.json")):
        run.manifest = io.read_json(io.join(root, "manifest.json"))
    notes = run.notes
    summary = io.join(root, "eval_summary.parquet")
    if io.exists(summary):
        run.summary = _read(summary, notes)
    gaps = io.join(root, "eval_gaps.parquet")
    if io.exists(gaps):
        run.gaps = _read(gaps, notes)
    if run.gaps is None and run.summary is not None:  # runs from before eval_gaps.parquet
        run.gaps = gap_table(run.summary)

    # A run directory reused with another config keeps the other config's results: only the
    # config's tasks, and only the models its eval summarised, are this run's.
    tasks = list(run.config.get("tasks") or [])
    on_disk = [t for t in TASKS if t not in tasks and io.exists(io.join(root, t))]
    if tasks:
        run.left_out += [f"`{t}/`: not a task of this run's config.yaml" for t in on_disk]
        for name in ("summary", "gaps"):
            df = getattr(run, name)
            if df is not None and "task" in df:
                setattr(run, name, df[df["task"].isin(tasks)].reset_index(drop=True))
    else:
        tasks = on_disk
    # Harvest, coverage and tune outputs recorded under another config: path -> why. Without
    # ``stale``, the report job's verdict, kept for the stages whose records are unchanged.
    records = (run.manifest or {}).get("stages", {})
    if stale is None:
        kept = records.get("report", {}).get("stale", {})
        stale = {
            k: v["why"]
            for k, v in kept.items()
            if records.get(k, {}).get("config_hash") == v.get("config_hash")
        }
    stale_files = {
        a: f"{key}: {why}"
        for key, why in (stale or {}).items()
        for a in records.get(key, {}).get("artifacts", [])
    }

    def this_config(rel: str) -> bool:
        if rel in stale_files:
            run.left_out.append(f"`{rel}`: {stale_files[rel]}")
            return False
        return True

    summarised = _summarised(run.summary)
    methods = (run.config.get("train") or {}).get("methods")
    trained = {"base", *methods} if methods else None  # None: no config to go by
    evals, harvest, coverage, tune, train = [], [], [], [], []
    for task in tasks:
        d = io.join(root, task, "eval")
        # Only the DESIGN 7 files: stages keep side tables next to them (eval/summary.parquet,
        # harvest/<model>-<split>-outcomes.parquet, coverage/<model>-summary.parquet).
        for f in _list(d, ".parquet"):
            if f == "summary.parquet":
                continue
            if summarised is not None and (task, f[:-8]) not in summarised:
                run.left_out.append(
                    f"`{task}/eval/{f}`: not in eval_summary.parquet (a model this config's "
                    "eval did not evaluate: another config's, or one no longer trained)"
                )
                continue
            evals.append(_read(io.join(d, f), notes, task=task, model=f[:-8]))
        d = io.join(root, task, "harvest")
        for f in _list(d, ".parquet"):
            model, _, split = f[:-8].rpartition("-")
            if model and split in ("train", "test") and this_config(f"{task}/harvest/{f}"):
                harvest.append(_read(io.join(d, f), notes, task=task, model=model, split=split))
        d = io.join(root, task, "coverage")
        coverage += [
            _read(io.join(d, f), notes, task=task, model=f[:-8])
            for f in _list(d, ".parquet")
            if not f.endswith("-summary.parquet") and this_config(f"{task}/coverage/{f}")
        ]
        p = io.join(root, task, "tune", "results.parquet")
        if io.exists(p) and this_config(f"{task}/tune/results.parquet"):
            tune.append(_read(p, notes, task=task))
        d = io.join(root, task, "models")
        for method in _list_dirs(d):
            p = io.join(d, method, "metrics.parquet")
            if not io.exists(p):
                continue
            if (
                summarised is not None
                and trained is not None
                and method not in trained
                and (task, method) not in summarised
            ):
                run.left_out.append(
                    f"`{task}/models/{method}/metrics.parquet`: neither in the config's "
                    "train.methods nor in eval_summary.parquet"
                )
                continue
            train.append(_read(p, notes, task=task, method=method))
    run.evals, run.harvest = _concat(evals), _concat(harvest)
    run.coverage, run.tune = _concat(coverage), _concat(tune)
    run.train = _concat(train)
    return run


def _summarised(summary: pd.DataFrame | None) -> set[tuple[str, str]] | None:
    """(task, model) pairs of the eval summary; None when there is none to go by."""
    if summary is None or not {"task", "model"} <= set(summary.columns):
        return None
    return set(zip(summary["task"], summary["model"], strict=True))


def select(
    run: Run,
    task: str | list[str] | None = None,
    method: str | list[str] | None = None,
    error_type: str | list[str] | None = None,
) -> Run:
    """The same run restricted to some tasks / methods (models) / error types.

    ``method`` filters the eval tables by ``model`` and the training metrics by ``method``.

    ``error_type`` filters every row-level table with an ``error_type`` column
    (harvest, coverage, per-item eval; rows without a type, such as ``clean``
    generations, stay). The summary is then recomputed from the filtered per-item
    eval rows with the evaluation's own ``summarize``, so its aggregate rows describe
    exactly the slice; without per-item rows, the summary's per-type rows are used.
    """

    def as_list(x: str | list[str] | None) -> list[str] | None:
        return None if x is None else ([x] if isinstance(x, str) else list(x))

    tasks, models, types = as_list(task), as_list(method), as_list(error_type)

    def keep(
        df: pd.DataFrame | None, by_model: bool = True, model_col: str = "model"
    ) -> pd.DataFrame | None:
        if df is None:
            return None
        m = pd.Series(True, index=df.index)
        if tasks is not None and "task" in df:
            m &= df["task"].isin(tasks)
        if by_model and models is not None and model_col in df:
            m &= df[model_col].isin(models)
        if types is not None and "error_type" in df:
            m &= df["error_type"].isna() | df["error_type"].isin(types)
        return df[m].reset_index(drop=True)

    out = replace(
        run,
        evals=keep(run.evals),
        # Harvest and coverage are about the FT model's errors: a method filter does not apply.
        harvest=keep(run.harvest, by_model=False),
        coverage=keep(run.coverage, by_model=False),
        tune=keep(run.tune, by_model=False),
        train=keep(run.train, model_col="method"),  # log steps have no error type
        notes=list(run.notes),
        left_out=list(run.left_out),
    )
    s = run.summary
    if s is not None and tasks is not None:
        s = s[s["task"].isin(tasks)]
    if s is not None and models is not None:
        s = s[s["model"].isin(models)]
    if types is not None and out.evals is not None and not out.evals.empty:
        from selfcorrect.evaluate import summarize

        s = summarize(out.evals, seed=int(run.config.get("seed", 0) or 0))
    elif types is not None and s is not None and "error_type" in s:
        if len(types) == 1:  # the per-type rows become the slice's aggregate
            s = s[
                s["error_type"].isin(types + [ALL_TYPES])
                & ~((s["error_type"] == ALL_TYPES) & (s["condition"] != "clean"))
            ].assign(error_type=ALL_TYPES)
        else:
            out.notes.append("several error types need per-item eval rows; summary left out")
            s = None
    out.summary = None if s is None else s.reset_index(drop=True)
    # The gap is a pure function of the summary: recomputed for the slice.
    out.gaps = None if out.summary is None else gap_table(out.summary)
    return out


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def aggregate(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary's aggregate rows (``error_type == "all"``), not its per-error-type rows."""
    if "error_type" not in summary:
        return summary
    return summary[summary["error_type"].isna() | (summary["error_type"] == ALL_TYPES)]


def greedy(summary: pd.DataFrame) -> pd.DataFrame:
    """Aggregate rows at the lowest temperature of each task x model (0.0 = greedy)."""
    summary = aggregate(summary)
    if "temperature" not in summary:
        return summary
    t0 = summary.groupby(["task", "model"])["temperature"].transform("min")
    return summary[summary["temperature"] == t0]


def _fmt(v: float, lo: float | None = None, hi: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if lo is None or hi is None or any(isinstance(x, float) and math.isnan(x) for x in (lo, hi)):
        return f"{v:.2f}"
    return f"{v:.2f} [{lo:.2f}, {hi:.2f}]"


def _order(values: Iterable[str], preferred: Iterable[str]) -> list[str]:
    vals = list(dict.fromkeys(values))
    pref = [p for p in preferred if p in vals]
    return pref + sorted(v for v in vals if v not in pref)


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def figure6_table(run: Run) -> pd.DataFrame | None:
    """Figure-6 numbers: recognition and correction per task x method x error origin (greedy).

    Cells are ``rate [lo, hi]`` strings (95% intervals from the summary).
    """
    s = run.summary
    if s is None or s.empty or not {"condition", "recognition_rate"} <= set(s.columns):
        return None
    s = greedy(s[s["condition"].isin(ERROR_CONDITIONS)])
    if s.empty:
        return None
    rows = []
    conds = [c for c in ERROR_CONDITIONS if c in set(s["condition"])]  # not run: no column
    for task in _order(s["task"], run.tasks):
        for model in _order(s[s["task"] == task]["model"], MODELS):
            row: dict[str, Any] = {"task": task, "method": model}
            for cond in conds:
                r = s[(s["task"] == task) & (s["model"] == model) & (s["condition"] == cond)]
                for rate, short in (("recognition_rate", "recog"), ("correction_rate", "correct")):
                    col = f"{short} {CONDITION_LABEL[cond]}"
                    if r.empty:
                        row[col] = "–"
                    else:
                        x = r.iloc[0]
                        row[col] = _fmt(x[rate], x.get(f"{rate}_lo"), x.get(f"{rate}_hi"))
            rows.append(row)
    return pd.DataFrame(rows)


def rates_table(run: Run, condition: str, rates: Iterable[str]) -> pd.DataFrame | None:
    """One row per task x method at greedy decoding: the given rates with intervals, and n."""
    s = run.summary
    if s is None or s.empty or "condition" not in s:
        return None
    s = greedy(s[s["condition"] == condition])
    if s.empty:
        return None
    rows = []
    for task in _order(s["task"], run.tasks):
        for model in _order(s[s["task"] == task]["model"], MODELS):
            x = s[(s["task"] == task) & (s["model"] == model)].iloc[0]
            row = {"task": task, "method": model, "n": int(x.get("n", 0))}
            for rate in rates:
                if rate in x:
                    row[rate.replace("_rate", "")] = _fmt(
                        x[rate], x.get(f"{rate}_lo"), x.get(f"{rate}_hi")
                    )
            rows.append(row)
    return pd.DataFrame(rows)


def coverage_table(run: Run) -> pd.DataFrame | None:
    """Per task x error type: on-policy errors, share covered by synthetic sampling, mean p_exact."""
    c = run.coverage
    if c is None or c.empty or "covered" not in c:
        return None
    rows = []
    for (task, et), g in c.groupby(["task", "error_type"], dropna=False):
        k, n = int(g["covered"].sum()), len(g)
        lo, hi = wilson(k, n)
        p = g["p_exact"].astype(float) if "p_exact" in g else pd.Series(dtype=float)
        rows.append(
            {
                "task": task,
                "error_type": et,
                "errors": n,
                "covered": _fmt(k / n, lo, hi),
                "median p_exact": f"{p.median():.2g}" if len(p) else "–",
            }
        )
    return pd.DataFrame(rows)


def error_rates_table(run: Run) -> pd.DataFrame | None:
    """Recognition, correction, parroting and false alarms per task x method x error origin
    (greedy), with intervals and n."""
    rates = ["recognition_rate", "correction_rate", "parrot_rate", "false_alarm_rate"]
    frames = []
    for cond in ERROR_CONDITIONS:
        t = rates_table(run, cond, rates)
        if t is not None and not t.empty:
            t.insert(2, "errors", CONDITION_LABEL[cond])
            frames.append(t)
    if not frames:
        return None
    out = pd.concat(frames, ignore_index=True)
    tasks = _order(out["task"], run.tasks)
    models = _order(out["method"], MODELS)
    conds = [CONDITION_LABEL[c] for c in ERROR_CONDITIONS]
    key = out.apply(
        lambda r: (tasks.index(r["task"]), models.index(r["method"]), conds.index(r["errors"])),
        axis=1,
    )
    return out.iloc[sorted(range(len(out)), key=lambda i: key.iloc[i])].reset_index(drop=True)


def _train_numeric(run: Run) -> pd.DataFrame | None:
    """``run.train`` with ``step`` and the metric columns as floats (all-null columns, as
    pyarrow writes a metric no log step had, become NaN), sorted by task, method, step."""
    t = run.train
    if t is None or t.empty or not {"task", "method", "step"} <= set(t.columns):
        return None
    t = t.copy()
    for c in ("step", *TRAIN_FINAL_COLUMNS):
        if c in t:
            t[c] = pd.to_numeric(t[c], errors="coerce")
    return t.sort_values(["task", "method", "step"], kind="stable")


def _has(df: pd.DataFrame, columns: Iterable[str]) -> bool:
    return any(c in df and df[c].notna().any() for c in columns)


def train_final(run: Run) -> pd.DataFrame | None:
    """Per task x method trained on error traces (a method with decision metrics): the final
    training step and the last logged value of each of ``TRAIN_FINAL_COLUMNS`` (NaN where a
    method never logged it; probe columns only when some method has them). Numbers, not text."""
    t = _train_numeric(run)
    if t is None or not _has(t, DECISION_COLUMNS):
        return None
    cols = [c for c in TRAIN_FINAL_COLUMNS if c not in PROBE_COLUMNS or _has(t, [c])]
    rows = []
    for task in _order(t["task"], run.tasks):
        tt = t[t["task"] == task]
        for method in _order(tt["method"], MODELS):
            g = tt[tt["method"] == method]
            if not _has(g, DECISION_COLUMNS):
                continue  # ft, base, grpo: no recognition line to decide on
            row: dict[str, Any] = {"task": task, "method": method, "step": int(g["step"].max())}
            for c in cols:
                v = g[c].dropna() if c in g else pd.Series(dtype=float)
                row[c] = float(v.iloc[-1]) if len(v) else math.nan
            rows.append(row)
    return pd.DataFrame(rows) if rows else None


def decision_table(run: Run) -> pd.DataFrame | None:
    """``train_final`` as report text: losses and the (small) false-alarm rate to 3 decimals,
    the other rates to 2, ``–`` where absent."""
    t = train_final(run)
    if t is None:
        return None
    out = t.copy().astype({"step": int})
    for c in out.columns[3:]:
        digits = 3 if "loss" in c or "false_alarm" in c else 2
        out[c] = [
            "–" if v is None or math.isnan(v) else f"{v:.{digits}f}" for v in t[c].astype(float)
        ]
    return out


def _gaps(run: Run) -> pd.DataFrame | None:
    """The run's gap table at the lowest temperature of each task x model (greedy)."""
    g = run.gaps
    if g is None or g.empty or not set(GAP_COLUMNS) <= set(g.columns):
        return None
    t0 = g.groupby(["task", "model"])["temperature"].transform("min")
    return g[g["temperature"] == t0]


def _last_step_alarms(clean: pd.DataFrame, task: str, model: str) -> str:
    """Recognition lines right after a correct last step in the clean generations, with a
    Wilson interval (a generation has one last step): what last-step recognition must beat."""
    g = clean[(clean["task"] == task) & (clean["model"] == model)]
    if g.empty or "n_ok_last_steps" not in g:
        return "–"
    n = int(pd.to_numeric(g["n_ok_last_steps"], errors="coerce").fillna(0).sum())
    k = int(pd.to_numeric(g["n_false_alarms_last_step"], errors="coerce").fillna(0).sum())
    if n == 0:
        return "–"
    return f"{_fmt(k / n, *wilson(k, n))} (n {n})"


def _by_origin(run: Run, e: pd.DataFrame) -> Iterable[tuple[str, str, str, pd.DataFrame]]:
    """(task, method, error condition, its rows) in the report's order, non-empty only."""
    for task in _order(e["task"], run.tasks):
        for model in _order(e[e["task"] == task]["model"], MODELS):
            for cond in ERROR_CONDITIONS:
                g = e[(e["task"] == task) & (e["model"] == model) & (e["condition"] == cond)]
                if not g.empty:
                    yield task, model, cond, g


def position_table(run: Run) -> pd.DataFrame | None:
    """Greedy recognition of each error origin split by where the error stands: at the
    trace's last step (a recognition line there competes with the ANSWER line) or earlier,
    with the share of the origin's errors at the last step; intervals as in the summary
    (``summarize`` on each part). Own and FT errors can gather at one position while
    synthetic ones spread over all steps, so a gap can be "where" as much as "what"."""
    e = run.evals
    if e is None or e.empty or not {"last_step", "condition", "temperature"} <= set(e.columns):
        return None
    from selfcorrect.evaluate import summarize

    e = e[e["temperature"] == e.groupby(["task", "model"])["temperature"].transform("min")]
    clean = e[e["condition"] == "clean"]  # greedy, as every other table
    e = e[e["condition"].isin(ERROR_CONDITIONS) & e["last_step"].notna()]
    if e.empty:
        return None
    last = e["last_step"].astype(bool)
    seed = int(run.config.get("seed", 0) or 0)
    parts = {
        "recognition, earlier steps": aggregate(summarize(e[~last], seed=seed)),
        "recognition, last step": aggregate(summarize(e[last], seed=seed)),
    }
    rows = []
    for task, model, cond, g in _by_origin(run, e):
        share = g["last_step"].astype(bool).mean()
        row = {
            "task": task,
            "method": model,
            "errors": CONDITION_LABEL[cond],
            "at last step": f"{share:.0%} of {len(g)}",
        }
        for col, sm in parts.items():
            r = sm[(sm["task"] == task) & (sm["model"] == model)]
            r = r[r["condition"] == cond]
            if r.empty:
                row[col] = "–"
                continue
            x = r.iloc[0]
            rate = _fmt(x["recognition_rate"], x["recognition_rate_lo"], x["recognition_rate_hi"])
            row[col] = f"{rate} (n {int(x['n'])})"
        row["flags after a correct last step"] = _last_step_alarms(clean, task, model)
        rows.append(row)
    return pd.DataFrame(rows) if rows else None


# A wrong step is "surprising" to a model when one of its tokens gets less than 10% there.
SURPRISING_NATS = math.log(10)


def _recognition(g: pd.DataFrame) -> str:
    n = len(g)
    if n == 0:
        return "–"
    k = int(g["recognized"].astype("boolean").fillna(False).sum())
    return f"{_fmt(k / n, *wilson(k, n))} (n {n})"


def belief_table(run: Run) -> pd.DataFrame | None:
    """Greedy recognition of each error origin split by whether the wrong step surprised the
    evaluated model (``wrong_step_surprise`` > ln 10: a token of it below 10% probability).
    A model's own greedy errors are by construction what it would write; synthetic errors
    mostly are not. If recognition follows surprise within each origin, the gap is belief as
    much as origin. Wilson intervals (rows of one problem are treated as independent)."""
    e = run.evals
    if e is None or e.empty or "wrong_step_surprise" not in e.columns:
        return None
    e = e[e["temperature"] == e.groupby(["task", "model"])["temperature"].transform("min")]
    e = e[e["condition"].isin(ERROR_CONDITIONS) & e["wrong_step_surprise"].notna()]
    if e.empty:
        return None
    rows = []
    for task, model, cond, g in _by_origin(run, e):
        hi = g["wrong_step_surprise"] > SURPRISING_NATS
        rows.append(
            {
                "task": task,
                "method": model,
                "errors": CONDITION_LABEL[cond],
                "median surprise (nats)": f"{g['wrong_step_surprise'].median():.2f}",
                "surprising": f"{hi.mean():.0%} of {len(g)}",
                "recognition, surprising": _recognition(g[hi]),
                "recognition, not surprising": _recognition(g[~hi]),
            }
        )
    return pd.DataFrame(rows) if rows else None


def gaps_table(run: Run) -> pd.DataFrame | None:
    """The headline table: per task x method, synthetic minus own / FT / matched recognition,
    ``diff [lo, hi]`` (95%), at greedy decoding."""
    g = _gaps(run)
    if g is None or g.empty:
        return None
    rows = []
    for task in _order(g["task"], run.tasks):
        gt = g[g["task"] == task]
        for model in _order(gt["model"], MODELS):
            gm = gt[gt["model"] == model]
            row: dict[str, Any] = {"task": task, "method": model}
            methods = set()
            for comp, label in GAP_LABEL.items():
                r = gm[gm["comparison"] == comp]
                if r.empty:
                    row[label] = "–"
                    continue
                x = r.iloc[0]
                row[label] = (
                    f"{_fmt(x['diff'], x['diff_lo'], x['diff_hi'])} (n {x['n_a']}/{x['n_b']})"
                )
                methods.add(INTERVAL_LABEL.get(str(x["method"]), str(x["method"])))
            row["interval"] = "; ".join(sorted(methods)) or "–"
            rows.append(row)
    return pd.DataFrame(rows)


def _ranking_gaps(run: Run) -> pd.DataFrame | None:
    """``gap_table`` on the discrimination rate, at the lowest temperature of each task x model."""
    s = run.summary
    if s is None or s.empty or not {"discrimination_rate", "n_paired"} <= set(s.columns):
        return None
    g = gap_table(greedy(s), "discrimination_rate", n="n_paired")
    return None if g.empty else g


def ranking_table(run: Run) -> pd.DataFrame | None:
    """Per task x method: the share of errors after which the model is likelier to write its
    recognition signal than after the correct step at the same state (a paired AUC; 0.5 is
    chance), per error origin, and synthetic minus own with its 95% interval (greedy rows)."""
    s = run.summary
    if s is None or s.empty or not {"discrimination_rate", "n_paired"} <= set(s.columns):
        return None
    s = greedy(s[s["condition"].isin(ERROR_CONDITIONS) & s["discrimination_rate"].notna()])
    if s.empty:
        return None
    g = _ranking_gaps(run)
    conds = [c for c in ERROR_CONDITIONS if c in set(s["condition"])]
    own = comparison_name("synthetic", "own_errors")
    rows = []
    for task in _order(s["task"], run.tasks):
        for model in _order(s[s["task"] == task]["model"], MODELS):
            row: dict[str, Any] = {"task": task, "method": model}
            for cond in conds:
                r = _row(s, task=task, model=model, condition=cond)
                if r is None:
                    row[CONDITION_LABEL[cond]] = "–"
                    continue
                rate = "discrimination_rate"
                cell = _fmt(r[rate], r.get(f"{rate}_lo"), r.get(f"{rate}_hi"))
                row[CONDITION_LABEL[cond]] = f"{cell} (n {int(r['n_paired'])})"
            x = None if g is None else _row(g, task=task, model=model, comparison=own)
            row["synthetic − own"] = (
                "–" if x is None else _fmt(x["diff"], x["diff_lo"], x["diff_hi"])
            )
            rows.append(row)
    return pd.DataFrame(rows) if rows else None


def _pct(v: float) -> str:
    return "–" if v is None or math.isnan(v) else f"{100 * v:.0f}%"


PREMISE_RECOGNITION = 0.8  # DESIGN 6: EIFT recognises >= 80% of synthetic errors (greedy)
PREMISE_FALSE_ALARMS = 0.05  # ... with false alarms on clean problems at most 5%


def premise(run: Run) -> list[str]:
    """Whether the experiment's premise holds, per task: EIFT, greedy, recognises at least
    80% of synthetic errors while flagging at most 5% of clean problems. Without it, "synthetic
    vs own" compares a weak signal with nothing, and the report says so first."""
    s = run.summary
    if s is None or s.empty:
        return []
    s = greedy(s)
    out = []
    for task in run.tasks:
        syn = _row(s, task=task, model="eift", condition="synthetic")
        clean = _row(s, task=task, model="eift", condition="clean")
        if syn is None or clean is None:
            continue
        rec = float(syn["recognition_rate"])
        alarms = clean_false_alarm_share(run, task, "eift", float(syn["temperature"]))
        if math.isnan(alarms):  # no per-item rows: the per-step rate of the summary
            alarms = float(clean["false_alarm_rate"])
        ok = rec >= PREMISE_RECOGNITION and alarms <= PREMISE_FALSE_ALARMS
        verdict = "holds" if ok else "does **not** hold"
        out.append(
            f"- Premise on {task} {verdict}: EIFT recognises {_pct(rec)} of synthetic errors "
            f"(bar {_pct(PREMISE_RECOGNITION)}) and flags a correct step in {_pct(alarms)} of "
            f"clean problems (bar {_pct(PREMISE_FALSE_ALARMS)})."
            + ("" if ok else " Read the gaps below as a lower bound on what transfer can show.")
        )
    return out


def clean_false_alarm_share(run: Run, task: str, model: str, temperature: float) -> float:
    """Share of clean problems whose generation flags a correct step (per-item eval rows)."""
    e = run.evals
    if e is None or e.empty or "false_alarm" not in e:
        return math.nan
    sel = e[
        (e["task"] == task)
        & (e["model"] == model)
        & (e["condition"] == "clean")
        & (e["temperature"].astype(float) == temperature)
    ]
    if sel.empty:
        return math.nan
    return float(sel["false_alarm"].fillna(False).astype(bool).mean())


def headline(run: Run) -> list[str]:
    """One sentence per task x method trained on error traces (greedy): recognition of
    synthetic vs own errors and the gap with its 95% interval; then FT and matched errors."""
    s, g = run.summary, _gaps(run)
    if s is None or s.empty or g is None or g.empty:
        return []
    s = greedy(s)
    out = premise(run)
    for task in _order(g["task"], run.tasks):
        for model in [m for m in _order(g[g["task"] == task]["model"], MODELS)]:
            if model not in ERROR_TRACE_METHODS:
                continue
            gm = g[(g["task"] == task) & (g["model"] == model)]
            own = gm[gm["comparison"] == comparison_name("synthetic", "own_errors")]
            if own.empty:
                continue
            x = own.iloc[0]

            def rec(cond: str, task: str = task, model: str = model) -> float:
                r = _row(s, task=task, model=model, condition=cond)
                return math.nan if r is None else float(r["recognition_rate"])

            t = float(x["temperature"])
            how = "greedy decoding" if t == 0 else f"temperature {t:g}"
            name = METHOD_LABEL.get(model, model)
            text = (
                f"{name} recognises {_pct(rec('synthetic'))} of synthetic errors and "
                f"{_pct(rec('own_errors'))} of its own (gap {x['diff']:.2f}, 95% CI "
                f"{x['diff_lo']:.2f} to {x['diff_hi']:.2f}; {x['n_a']} synthetic / "
                f"{x['n_b']} own errors) on {task} at {how}."
            )
            more = []
            for cond, what in (
                ("ft_errors", "the FT model's errors"),
                ("matched_synthetic", "synthetic errors at those same states"),
            ):
                r = gm[gm["comparison"] == comparison_name("synthetic", cond)]
                if not r.empty:
                    y = r.iloc[0]
                    more.append(
                        f"{_pct(rec(cond))} of {what} (gap {y['diff']:.2f}, "
                        f"{y['diff_lo']:.2f} to {y['diff_hi']:.2f})"
                    )
            if more:
                text += " It recognises " + " and ".join(more) + "."
            text += _ranking_sentence(run, task, model)
            out.append(f"- {text}")
    return out


def _ranking_sentence(run: Run, task: str, model: str) -> str:
    """The headline's threshold-free half: how often the model ranks its signal higher after
    a synthetic / its own error than after the correct step (empty without the scores)."""
    g = _ranking_gaps(run)  # None without the scores
    if g is None:
        return ""
    s = greedy(run.summary)
    x = _row(g, task=task, model=model, comparison=comparison_name("synthetic", "own_errors"))
    syn = _row(s, task=task, model=model, condition="synthetic")
    own = _row(s, task=task, model=model, condition="own_errors")
    if x is None or syn is None or own is None:
        return ""
    ft = _row(g, task=task, model="ft", comparison=comparison_name("synthetic", "own_errors"))
    control = "" if ft is None else f"; FT, never taught it: {ft['diff']:.2f}"
    return (
        f" Without the greedy threshold, it is likelier to flag the error than the correct "
        f"step after {_pct(syn['discrimination_rate'])} of synthetic errors and "
        f"{_pct(own['discrimination_rate'])} of its own (gap {x['diff']:.2f}, "
        f"{x['diff_lo']:.2f} to {x['diff_hi']:.2f}; 50% is chance{control})."
    )


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Figures (each returns None when its input is absent)
# ---------------------------------------------------------------------------


def _subplots(rows: int, cols: int, figsize: tuple[float, float], **kw: Any) -> tuple[Figure, Any]:
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=False, **kw)


def _bars(
    ax: Any, groups: list[str], series: dict[str, list[tuple[float, float, float]]], colors: dict
) -> None:
    """Grouped bars: ``series[name][i] = (value, lo, hi)`` for ``groups[i]``."""
    k = max(1, len(series))
    width = 0.8 / k
    x = np.arange(len(groups))
    for j, (name, vals) in enumerate(series.items()):
        v = np.array([a for a, _, _ in vals], dtype=float)
        lo = np.array([b for _, b, _ in vals], dtype=float)
        hi = np.array([c for _, _, c in vals], dtype=float)
        err = np.vstack([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)])
        err = np.nan_to_num(err)
        ax.bar(
            x + (j - (k - 1) / 2) * width,
            np.nan_to_num(v),
            width,
            yerr=err,
            capsize=2,
            label=CONDITION_LABEL.get(name, name),
            color=colors.get(name),
        )
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)


def _triple(row: pd.Series | None, rate: str) -> tuple[float, float, float]:
    if row is None:
        return (math.nan, math.nan, math.nan)
    return (
        float(row[rate]),
        float(row.get(f"{rate}_lo", math.nan)),
        float(row.get(f"{rate}_hi", math.nan)),
    )


def _row(s: pd.DataFrame, **eq: Any) -> pd.Series | None:
    m = pd.Series(True, index=s.index)
    for k, v in eq.items():
        m &= s[k] == v
    return s[m].iloc[0] if m.any() else None


def fig_figure6(run: Run) -> Figure | None:
    """Recognition (top) and correction (bottom) per method, for synthetic / FT / own errors."""
    s = run.summary
    if s is None or s.empty or "condition" not in s:
        return None
    s = greedy(s[s["condition"].isin(ERROR_CONDITIONS)])
    if s.empty:
        return None
    tasks = _order(s["task"], run.tasks)
    fig, axes = _subplots(2, len(tasks), figsize=(5.5 * len(tasks), 6.5), sharey=True)
    for j, task in enumerate(tasks):
        st = s[s["task"] == task]
        models = _order(st["model"], MODELS)
        conds = [c for c in ERROR_CONDITIONS if c in set(st["condition"])]
        for i, (rate, label) in enumerate(
            (("recognition_rate", "recognition"), ("correction_rate", "correction"))
        ):
            series = {
                c: [_triple(_row(st, model=m, condition=c), rate) for m in models] for c in conds
            }
            ax = axes[i][j]
            _bars(ax, models, series, CONDITION_COLOR)
            ax.set_title(f"{task}: {label}")
            if j == 0:
                ax.set_ylabel(f"{label} rate (95% CI)")
    axes[0][0].legend(loc="upper right", fontsize=8)
    fig.suptitle("Recognition and correction by error origin (greedy decoding)")
    fig.tight_layout()
    return fig


def fig_gaps(run: Run) -> Figure | None:
    """The gap per method: synthetic minus own / FT / matched recognition, 95% interval."""
    g = _gaps(run)
    if g is None or g.empty:
        return None
    tasks = _order(g["task"], run.tasks)
    fig, axes = _subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), sharey=False)
    colors = {
        comparison_name("synthetic", c): CONDITION_COLOR[c]
        for c in ("own_errors", "ft_errors", "matched_synthetic")
    }
    for j, task in enumerate(tasks):
        gt = g[g["task"] == task]
        models = _order(gt["model"], MODELS)
        comps = [c for c in GAP_LABEL if c in set(gt["comparison"])]
        ax = axes[0][j]
        k = max(1, len(comps))
        for i, comp in enumerate(comps):
            for y, m in enumerate(models):
                r = _row(gt, model=m, comparison=comp)
                if r is None:
                    continue
                yy = y + (i - (k - 1) / 2) * 0.8 / k
                d, lo, hi = (float(r[c]) for c in ("diff", "diff_lo", "diff_hi"))
                ax.errorbar(
                    [d],
                    [yy],
                    xerr=np.nan_to_num([[max(0.0, d - lo)], [max(0.0, hi - d)]]),
                    fmt="o",
                    capsize=2,
                    color=colors.get(comp),
                    label=GAP_LABEL[comp] if y == 0 else None,
                )
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(models)), models)
        ax.invert_yaxis()  # methods top to bottom, as in the table
        ax.set_xlim(-1.05, 1.05)
        ax.set_title(f"{task}: recognition gap")
        ax.set_xlabel("difference in recognition rate (95% CI)")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("Synthetic minus other error origins (greedy decoding)")
    fig.tight_layout()
    return fig


def fig_accuracy(run: Run) -> Figure | None:
    """Final-answer accuracy on clean test problems per method (greedy, 95% CI)."""
    s = run.summary
    if s is None or s.empty or "condition" not in s:
        return None
    s = greedy(s[s["condition"] == "clean"])
    if s.empty:
        return None
    tasks = _order(s["task"], run.tasks)
    fig, axes = _subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8))
    for j, task in enumerate(tasks):
        st = s[s["task"] == task]
        models = _order(st["model"], MODELS)
        series = {"clean": [_triple(_row(st, model=m), "accuracy") for m in models]}
        ax = axes[0][j]
        _bars(ax, models, series, CONDITION_COLOR)
        ax.set_title(f"{task}: accuracy")
        ax.set_ylabel("final-answer accuracy")
    fig.tight_layout()
    return fig


def fig_coverage(run: Run) -> Figure | None:
    """Share of on-policy errors that synthetic sampling reproduces exactly, and p_exact spread."""
    c = run.coverage
    if c is None or c.empty or "covered" not in c:
        return None
    tasks = _order(c["task"], run.tasks)
    fig, axes = _subplots(2, len(tasks), figsize=(5.5 * len(tasks), 6.5))
    for j, task in enumerate(tasks):
        ct = c[c["task"] == task]
        types = _order(ct["error_type"].astype(str), run.error_types)
        vals = []
        for t in types:
            g = ct[ct["error_type"].astype(str) == t]
            k, n = float(g["covered"].sum()), len(g)
            vals.append((k / n if n else math.nan, *wilson(k, n)))
        ax = axes[0][j]
        _bars(ax, types, {"covered": vals}, {"covered": "#8172b3"})
        ax.set_title(f"{task}: covered by synthetic errors")
        ax.set_ylabel("share of on-policy errors")
        ax.tick_params(axis="x", rotation=30)
        ax = axes[1][j]
        p = ct["p_exact"].astype(float) if "p_exact" in ct else pd.Series(dtype=float)
        p = p[p > 0]
        if len(p):
            ax.hist(np.log10(p), bins=20, color="#8172b3")
        n0 = int((ct.get("p_exact", pd.Series(dtype=float)).astype(float) == 0).sum())
        ax.set_title(f"{task}: p_exact of covered errors ({n0} never sampled)")
        ax.set_xlabel("log10 p_exact")
        ax.set_ylabel("errors")
    fig.tight_layout()
    return fig


def fig_error_types(run: Run) -> Figure | None:
    """Histogram of the harvested (on-policy) error types per task and split."""
    h = run.harvest
    if h is None or h.empty or "error_type" not in h:
        return None
    tasks = _order(h["task"], run.tasks)
    fig, axes = _subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8))
    for j, task in enumerate(tasks):
        ht = h[h["task"] == task]
        counts = ht.groupby([ht["error_type"].astype(str), "split"]).size().unstack(fill_value=0)
        counts = counts.reindex(_order(counts.index, run.error_types))
        ax = axes[0][j]
        splits = list(counts.columns)
        x = np.arange(len(counts.index))
        w = 0.8 / max(1, len(splits))
        for k, sp in enumerate(splits):
            ax.bar(x + (k - (len(splits) - 1) / 2) * w, counts[sp].to_numpy(), w, label=sp)
        ax.set_xticks(x, list(counts.index), rotation=30)
        ax.set_title(f"{task}: on-policy error types ({len(ht)} errors)")
        ax.set_ylabel("errors")
        ax.legend(title="split", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def tune_columns(tune: pd.DataFrame) -> tuple[str | None, list[str], list[str]]:
    """The swept parameter (x), and the rate and loss columns of tune/results.parquet."""
    from selfcorrect.tune import PARAMS, PLOT_METRICS

    x = next(
        (p for p in PARAMS if p in tune.columns and tune[p].nunique(dropna=True) > 1),
        "injection_rate" if "injection_rate" in tune.columns else None,
    )
    found = [m for m in PLOT_METRICS if m in tune.columns and tune[m].notna().any()]
    return x, [m for m in found if "loss" not in m], [m for m in found if "loss" in m]


def fig_tune(run: Run) -> Figure | None:
    """The Ray Tune sweep: rates (top) and validation losses (bottom) against the swept
    parameter, mean over trials at each point with a min..max band."""
    t = run.tune
    if t is None or t.empty:
        return None
    x, rates, losses = tune_columns(t)
    if x is None or not (rates or losses):
        return None
    panels = [p for p in (rates, losses) if p]
    tasks = _order(t["task"], run.tasks)
    fig, axes = _subplots(len(panels), len(tasks), figsize=(5.5 * len(tasks), 3.6 * len(panels)))
    for j, task in enumerate(tasks):
        tt = t[t["task"] == task]
        for i, metrics in enumerate(panels):
            ax = axes[i][j]
            for m in metrics:
                g = tt.groupby(x)[m].agg(["mean", "min", "max"]).dropna().sort_index()
                if g.empty:
                    continue
                xs = g.index.to_numpy(dtype=float)
                ax.plot(xs, g["mean"], marker="o", label=m.replace("_", " "))
                ax.fill_between(xs, g["min"], g["max"], alpha=0.15)
            ax.set_title(f"{task}: {'rates' if metrics is rates else 'validation loss'}")
            ax.set_xlabel(x.replace("_", " "))
            if metrics is rates:
                ax.set_ylim(-0.02, 1.05)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def fig_temperature(run: Run) -> Figure | None:
    """Accuracy (clean) and recognition of own errors against decoding temperature."""
    s = run.summary
    if s is None or s.empty or "temperature" not in s or s["temperature"].nunique() < 2:
        return None
    s = aggregate(s)
    tasks = _order(s["task"], run.tasks)
    panels = [("clean", "accuracy"), ("own_errors", "recognition_rate")]
    fig, axes = _subplots(2, len(tasks), figsize=(5 * len(tasks), 6))
    for j, task in enumerate(tasks):
        for i, (cond, rate) in enumerate(panels):
            ax = axes[i][j]
            st = s[(s["task"] == task) & (s["condition"] == cond)]
            for m in _order(st["model"], MODELS):
                g = st[st["model"] == m].sort_values("temperature")
                ax.plot(g["temperature"], g[rate], marker="o", label=m)
                if f"{rate}_lo" in g:
                    ax.fill_between(
                        g["temperature"].astype(float),
                        g[f"{rate}_lo"].astype(float),
                        g[f"{rate}_hi"].astype(float),
                        alpha=0.1,
                    )
            ax.set_title(f"{task}: {rate.replace('_', ' ')} ({CONDITION_LABEL[cond]})")
            ax.set_xlabel("temperature")
            ax.set_ylim(0, 1.05)
            ax.grid(alpha=0.3)
            if len(st):
                ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_decision(run: Run) -> Figure | None:
    """The decision over training, per task: ``decision_loss`` (top); ``decision_accuracy``
    (solid) and ``decision_false_alarm_rate`` (dotted) (bottom), one colour per method."""
    t = _train_numeric(run)
    if t is None or not _has(t, DECISION_COLUMNS):
        return None
    tasks = [x for x in _order(t["task"], run.tasks) if _has(t[t["task"] == x], DECISION_COLUMNS)]
    fig, axes = _subplots(2, len(tasks), figsize=(5.5 * len(tasks), 6.5))
    for j, task in enumerate(tasks):
        tt = t[t["task"] == task]
        top, bottom = axes[0][j], axes[1][j]
        for method in _order(tt["method"], MODELS):
            g = tt[tt["method"] == method]
            if not _has(g, DECISION_COLUMNS):
                continue
            color = METHOD_COLOR.get(method)
            name = METHOD_LABEL.get(method, method)
            for ax, col, ls, label in (
                (top, "decision_loss", "-", name),
                (bottom, "decision_accuracy", "-", f"{name}: accuracy"),
                (bottom, "decision_false_alarm_rate", ":", f"{name}: false alarms"),
            ):
                if col in g and g[col].notna().any():
                    x = g[g[col].notna()]
                    ax.plot(x["step"], x[col], ls, color=color, label=label)
        top.set_title(f"{task}: decision loss (-log p of flagging a wrong step)")
        top.set_ylabel("decision_loss")
        bottom.set_title(f"{task}: argmax decision")
        bottom.set_ylabel("rate")
        bottom.set_ylim(-0.02, 1.05)
        for ax in (top, bottom):
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def fig_learning_curves(run: Run) -> Figure | None:
    """Greedy recognition probes over training, one panel per task: synthetic errors (solid)
    and FT errors (dashed) per method, ``decision_accuracy`` as a thin line behind them.
    None when no method logged a probe (``train.probe_every`` = 0)."""
    t = _train_numeric(run)
    if t is None or not _has(t, PROBE_COLUMNS):
        return None
    tasks = [x for x in _order(t["task"], run.tasks) if _has(t[t["task"] == x], PROBE_COLUMNS)]
    fig, axes = _subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.0))
    for j, task in enumerate(tasks):
        tt = t[t["task"] == task]
        ax = axes[0][j]
        for method in _order(tt["method"], MODELS):
            g = tt[tt["method"] == method]
            if not _has(g, PROBE_COLUMNS):
                continue
            color = METHOD_COLOR.get(method)
            name = METHOD_LABEL.get(method, method)
            for col, (ls, what) in PROBE_STYLE.items():
                if col in g and g[col].notna().any():
                    x = g[g[col].notna()]
                    ax.plot(
                        x["step"],
                        x[col],
                        ls,
                        marker="o",
                        ms=3,
                        color=color,
                        label=f"{name}: {what}",
                    )
            if "decision_accuracy" in g and g["decision_accuracy"].notna().any():
                x = g[g["decision_accuracy"].notna()]
                ax.plot(
                    x["step"],
                    x["decision_accuracy"],
                    "-",
                    lw=0.7,
                    alpha=0.5,
                    color=color,
                    label=f"{name}: decision accuracy (train)",
                )
        ax.set_title(f"{task}: recognition during training")
        ax.set_xlabel("training step")
        ax.set_ylabel("recognition (greedy probe)")
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class Section:
    name: str  # also the PNG file name
    title: str
    why: str  # one sentence under the heading
    figure: Callable[[Run], Figure | None]
    table: Callable[[Run], pd.DataFrame | None] | None
    missing: str  # note when the input is absent


SECTIONS = (
    Section(
        "gaps",
        "The gap: synthetic versus own, FT and matched errors",
        "Recognition of synthetic errors minus recognition of the model's own errors, of "
        "the FT model's errors, and of synthetic errors at the FT errors' states (matched), "
        "at greedy decoding, with 95% intervals and n (synthetic / other); see Statistical "
        "methods.",
        fig_gaps,
        gaps_table,
        "no eval_gaps.parquet or eval summary with error conditions (run rayjobs.evaluate)",
    ),
    Section(
        "ranking",
        "Recognition without the greedy threshold",
        "Greedy recognition needs the signal to beat every other next line. Here, per error, "
        "the model's log-probability of writing its signal next (`signal_logp`) is compared "
        "with the same after the correct step of that state that writes the same target "
        "(`paired_step`, `paired_signal_logp`: the sudoku cell or the multiplication "
        "left-hand side, so only the value differs; n counts the errors with such a step): "
        "the share of errors ranked above their correct step (a paired AUC, 0.5 = chance, "
        "as FT and GRPO, never taught a signal, should score; "
        "`discrimination_rate` in eval_summary.parquet), with 95% intervals as for "
        "recognition. A model can tell errors from correct steps below the threshold; the "
        "gap synthetic − own then asks the experiment's question without it. Read each "
        "method's gap against FT's and GRPO's: a surprising step makes any unusual next line "
        "a little likelier, and own errors are not surprising, so a model never taught the "
        "signal has a gap of its own.",
        lambda r: None,
        ranking_table,
        "no `signal_logp` in the eval rows (`eval.surprise: false`, or a run from before it "
        "was recorded; rerun rayjobs.evaluate with `eval.surprise=true`)",
    ),
    Section(
        "position",
        "Recognition by where the error stands",
        "Errors at the trace's last step (where a recognition line competes with the ANSWER "
        "line) against errors at earlier steps, greedy, with the share of each origin's errors "
        "at the last step. Own and FT errors can gather at the last step while synthetic ones "
        "spread over every step: compare origins within a position before reading the gap as "
        "synthetic versus own. Last-step recognition means something only above the model's "
        "flag rate after a *correct* last step (last column, clean problems).",
        lambda r: None,
        position_table,
        "no per-item eval rows with `last_step` (run rayjobs.evaluate)",
    ),
    Section(
        "belief",
        "Recognition by the model's belief in the error",
        "How surprising each wrong step was to the evaluated model right after its prefix "
        "(`wrong_step_surprise`: minus the lowest log-probability among its tokens, greedy "
        "rows): *surprising* = a token of it below 10% probability, a step the model would "
        "not have written. Own greedy errors are by construction steps it would write; "
        "synthetic ones mostly are not. Compare recognition across origins within a column "
        "before reading the gap as synthetic versus own.",
        lambda r: None,
        belief_table,
        "no `wrong_step_surprise` in the per-item eval rows (`eval.surprise: false`, or a run "
        "from before it was recorded; rerun rayjobs.evaluate with `eval.surprise=true`)",
    ),
    Section(
        "figure6",
        "Recognition and correction by error origin (Figure 6)",
        "Does training on synthetic errors carry over to the errors models make themselves? "
        "Rates at greedy decoding with 95% intervals.",
        fig_figure6,
        figure6_table,
        "no eval_summary.parquet with error conditions (run rayjobs.evaluate)",
    ),
    Section(
        "accuracy",
        "Final-answer accuracy",
        "Clean test problems, greedy decoding, 95% intervals.",
        fig_accuracy,
        lambda r: rates_table(r, "clean", ["accuracy", "false_alarm_rate"]),
        "no clean-condition rows in eval_summary.parquet (run rayjobs.evaluate)",
    ),
    Section(
        "parrot",
        "Parroting and false alarms by error origin",
        "Parrot = recognized, then repeated the same wrong step; false alarm = recognition "
        "line after a correct step (for own errors: over the whole free generations; for the "
        "injected origins: in the continuation after the error).",
        lambda r: None,
        error_rates_table,
        "no error-condition rows in eval_summary.parquet (run rayjobs.evaluate)",
    ),
    Section(
        "decision",
        "The decision in training",
        "The mean recognition-span loss hides the decision: it averages over the line's "
        "forced tokens, cheap once the line has started, while whether an error gets flagged "
        "at all is decided by its first token(s) (`AH`, InSeC's `</mistake>`), so the table "
        "gives the decision's own loss, argmax accuracy after a wrong step and argmax false "
        "alarms after a correct step next to `loss_recognition` (last logged values of "
        "training; `probe_*` = greedy recognition on fixed items at the last probe).",
        fig_decision,
        decision_table,
        "no decision metrics in <task>/models/<method>/metrics.parquet (train eift, hybrid "
        "or insec; runs from before the decision metrics lack them)",
    ),
    Section(
        "learning_curves",
        "Learning curves",
        "Greedy recognition of synthetic errors (solid) and of the FT model's errors (dashed) "
        "on fixed probe items during training, per method; the thin line is the training "
        "decision accuracy. Does FT-error recognition follow synthetic recognition?",
        fig_learning_curves,
        None,
        "no probe_* columns in <task>/models/<method>/metrics.parquet (set train.probe_every "
        "> 0; probes run for eift, hybrid and insec, the FT-error probe only once harvest has "
        "run before the method trains)",
    ),
    Section(
        "coverage",
        "Coverage of on-policy errors by synthetic sampling",
        "For each error the FT model made, does the synthetic injector ever produce exactly "
        "that step?",
        fig_coverage,
        coverage_table,
        "no <task>/coverage/*.parquet (run rayjobs.coverage)",
    ),
    Section(
        "error_types",
        "On-policy error types",
        "Errors harvested from the FT model, classified into the synthetic taxonomy "
        "(`other` = fits no type).",
        fig_error_types,
        None,
        "no <task>/harvest/*.parquet (run rayjobs.harvest)",
    ),
    Section(
        "tune",
        "Injection-rate sweep (Ray Tune)",
        "Each trial trains EIFT at one injection rate and evaluates it; band = min..max over "
        "samples.",
        fig_tune,
        None,
        "no <task>/tune/results.parquet (run rayjobs.tune, or tune.enabled=true)",
    ),
    Section(
        "temperature",
        "Temperature sweep",
        "Accuracy and recognition of own errors as sampling gets hotter.",
        fig_temperature,
        None,
        "eval_summary.parquet has fewer than two temperatures (set eval.temperatures)",
    ),
)


def figure_png(fig: Figure) -> bytes:
    buf = _bytesio.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _timings(run: Run) -> pd.DataFrame | None:
    stages = run.manifest.get("stages") or {}
    if not stages:
        return None

    def secs(v: dict, key: str) -> str:
        return f"{float(v[key]):.1f}" if v.get(key) is not None else "–"

    rows = [
        {
            "stage": k,
            "status": v.get("status", "?"),
            "seconds": secs(v, "seconds"),
            # Training stages: Ray Train's start-up (the first model of a chain) and the
            # optimizer steps alone; the rest is loading, probes and checkpoints.
            "start-up s": secs(v, "startup_s"),
            "steps s": secs(v, "compute_s"),
        }
        for k, v in stages.items()
    ]
    return pd.DataFrame(rows)


PRECISION = "- training precision: "  # the header line's start (the pipeline's summary reads it)


def precision(run: Run) -> str | None:
    """Which numeric path trained the models, from the ``bf16`` column of the training
    metrics: the seed fixes the data and the injected errors everywhere, but the trained
    models (and every metric) only on the same path, so runs compare only within one."""
    t = run.train
    if t is None or "bf16" not in t or not {"task", "method"} <= set(t.columns):
        return None
    t = t.dropna(subset=["bf16"])
    if t.empty:
        return None
    last = t.groupby(["task", "method"], sort=False)["bf16"].last().astype(bool)
    paths = {"bf16 autocast (fp32 master weights)": last[last], "fp32": last[~last]}
    used = {name: s for name, s in paths.items() if len(s)}
    note = " (`train.bf16`; the same seed gives the same models only on the same path)"
    if len(used) == 1:
        return f"{PRECISION}{next(iter(used))} for every model{note}"
    parts = [
        f"{name} for {', '.join(f'{task}/{m}' for task, m in s.index)}" for name, s in used.items()
    ]
    return f"{PRECISION}{'; '.join(parts)}{note}"


def build_report(run: Run) -> tuple[str, dict[str, bytes]]:
    """The Markdown text and the PNG figures (name -> bytes) of a loaded run."""
    cfg = run.config
    model = (cfg.get("model") or {}).get("path") or (cfg.get("model") or {}).get("preset", "?")
    lines = [
        f"# selfcorrect report: {cfg.get('name', os.path.basename(run.root.rstrip('/')))}",
        "",
        f"- run directory: `{run.root}`",
        f"- tasks: {', '.join(run.tasks) or 'none found'}; methods: {', '.join(run.models) or '–'}",
        f"- model: `{model}`; seed: {cfg.get('seed', '?')}",
    ]
    path = precision(run)
    lines += ([path] if path else []) + [""]
    head = headline(run)
    if head:
        lines += ["## Headline", ""] + head + [""]
    figures: dict[str, bytes] = {}
    for sec in SECTIONS:
        lines += [f"## {sec.title}", "", sec.why, ""]
        fig = sec.figure(run)
        table = sec.table(run) if sec.table else None
        if fig is None and (table is None or table.empty):
            lines += [f"_Skipped: {sec.missing}._", ""]
            continue
        if table is not None and not table.empty:
            lines += [markdown_table(table), ""]
        if fig is not None:
            figures[f"{sec.name}.png"] = figure_png(fig)
            lines += [f"![{sec.title}](figures/{sec.name}.png)", ""]
    lines += ["## Definitions", "", INSEC_PROTOCOL_TEXT, "", DECISION_TEXT, ""]
    if run.summary is not None and not run.summary.empty:
        lines += ["## Statistical methods", "", INTERVAL_METHODS_TEXT, ""]
    timings = _timings(run)
    lines += ["## Stages", ""]
    lines += [markdown_table(timings), ""] if timings is not None else ["_No manifest.json._", ""]
    if run.notes:
        lines += ["## Files that could not be read", ""] + [f"- {n}" for n in run.notes] + [""]
    if run.left_out:
        lines += ["## Results left out", ""] + [f"- {n}" for n in run.left_out] + [""]
    return "\n".join(lines), figures


def write_report(root: str, stale: Mapping[str, str] | None = None) -> str:
    """Write ``report.md`` and ``figures/*.png`` into the run directory; returns report.md's path.

    Figures are written first and report.md last, each atomically, so a report.md
    never points at a figure that is not there. ``stale``: as in ``load_run``.
    """
    run = load_run(root, stale)
    text, figures = build_report(run)
    for name, png in figures.items():
        io.write_bytes(io.join(root, "figures", name), png)
    path = io.join(root, "report.md")
    io.write_text(path, text)
    return path
