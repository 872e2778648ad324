"""Evaluation: accuracy, and recognition / correction / parroting on errors of several origins.

DESIGN 7 defines five conditions, all scored by the task verifier:

* ``clean``      plain test prompts: final-answer accuracy; whether the model wrote any
                 recognition line; whether a trace with a recognition still ends right.
* ``synthetic``  golden prefix up to a random step + one fresh, seeded synthetic error.
* ``ft_errors``  prefixes ending in a wrong step the FT model made (``harvest/ft-test``).
* ``matched_synthetic`` the ``ft_errors`` prefixes (same states) with a fresh, seeded
                 synthetic error in place of the FT model's wrong step.
* ``own_errors`` the model's own free generations (the ``clean`` generations), scored
                 at each of its own wrong steps.

Everything here is pure (task, text) -> numbers, so the metric definitions are
unit-tested on hand-written continuations; generation lives in
``selfcorrect.generation`` and the Ray fan-out in ``rayjobs.evaluate``.

Definitions, for a wrong step W written at state S (the state before W):

* recognized: the line after W is a recognition line (``is_recognition``: the EIFT
  line or InSeC's ``</mistake>``).
* corrected:  recognized, and the line after the recognition is a correct step at S.
* parroted:   recognized, and the line after the recognition repeats W.
* false alarm: a recognition line right after a correct step; the rate is
  (recognitions after correct steps) / (correct steps) over model-written lines.

How a generation is read (one definition, shared with harvest and GRPO rewards, in
``selfcorrect.tasks.base``; issue 20):

* Only complete lines count (``complete_lines``): a last line cut by ``max_new_tokens``
  is neither an error nor a correct step.
* An ANSWER line written before the work is done is a wrong step like any other, and
  the model can recognise it: a recognition line right after an ANSWER line retracts it,
  and the line after that is judged as a correction. So a premature answer stays in the
  ``own_errors`` denominator for every model and can also count as recognised. The
  trace's answer (accuracy) is its first ANSWER line that is not retracted; the trace
  ends there. Generation follows the same rule: it does not stop at an ANSWER line,
  only once the line after it is complete and is not a recognition line (or at EOS).

Where the error stands: ``last_step`` is true when W replaces the trace's last step (a
correct step there would be followed by the ANSWER line). A recognition line there competes
with the answer line, not with another step, and models' own errors can gather there (the
final sum of a multiplication), so the report breaks recognition down by it; ``clean``
rows count the correct last steps and the recognition lines right after them
(``n_ok_last_steps``, ``n_false_alarms_last_step``): the flag rate that recognition at the
last step must beat.

Summary rates (``summarize``) are shares of all items of a condition, so
``correction_rate + (recognized but neither) + missed = 1``; the conditional
``correction_given_recognition`` / ``parrot_given_recognition`` are extra columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from selfcorrect.data import stream_rng
from selfcorrect.harvest import pick_gold
from selfcorrect.stats import (
    CLUSTER_BOOTSTRAP,
    WILSON,
    bootstrap_weights,
    cluster_interval,
)
from selfcorrect.stats import Z95 as Z95  # re-exported: the statistics used to live here
from selfcorrect.stats import wilson_interval as wilson_interval
from selfcorrect.tasks import (
    LineEvent,
    Problem,
    Task,
    applicable_weights,
    classify_error,
    complete_lines,
    final_answer_correct,
    is_recognition,
    sample_error,
    split_lines,
    step_target,
    walk_trace,
)

CONDITIONS = ("clean", "synthetic", "ft_errors", "matched_synthetic", "own_errors")
ALL_TYPES = "all"  # error_type of the aggregate summary rows

# The rates of DESIGN 7 (each with *_lo / *_hi) plus two conditional ones, and recognition
# without the greedy threshold (error rows scored with ``eval.surprise``; see ``discrimination``).
RATES = (
    "accuracy",
    "recognition_rate",
    "correction_rate",
    "parrot_rate",
    "false_alarm_rate",
    "correction_given_recognition",
    "parrot_given_recognition",
    "discrimination_rate",
)

# Columns of <task>/eval/<model>.parquet (one row per item x temperature).
ITEM_COLUMNS = [
    "task",
    "model",
    "condition",
    "temperature",
    "item_id",
    "trace_id",
    "problem_id",
    "prompt",
    "prefix",  # text before the wrong step (clean: the prompt line)
    "step_index",
    "wrong_step",
    "gold_step",
    "error_type",
    "last_step",
    "seed",
    "completion",
    "next_line",
    "after_line",
    "recognized",
    "corrected",
    "parroted",
    "correct",
    "false_alarm",
    "n_ok_steps",
    "n_false_alarms",
    "n_ok_last_steps",  # clean rows: correct last steps, and recognition lines right after
    "n_false_alarms_last_step",
    # Error rows: minus the lowest log-probability among the wrong step's tokens under the
    # evaluated model, after the prefix (nats; generation.step_surprise): its belief in it.
    "wrong_step_surprise",
    # Error rows: the correct step the wrong one is ranked against (paired_step: the same
    # target with the right value, or none); and the log-probability (nats) that the model
    # writes its recognition signal next after the wrong / the paired step
    # (generation.step_scores).
    "paired_step",
    "signal_logp",
    "paired_signal_logp",
]

SUMMARY_KEYS = ["task", "model", "condition", "temperature", "error_type"]


# ---------------------------------------------------------------------------
# Prompt text: the exact format the trainer uses (traces.py)
# ---------------------------------------------------------------------------


def render_prefix(prompt: str, steps: Sequence[str]) -> str:
    """Prompt line + each step, every line ending in a newline (what the model was trained on)."""
    return prompt + "\n" + "".join(s + "\n" for s in steps)


def state_after(task: Task, problem: Problem, steps: Sequence[str]) -> Any:
    """The verifier state after a sequence of lines, retracting on recognition lines."""
    state = task.initial_state(problem)
    history: list[Any] = []
    for line in steps:
        if is_recognition(line):
            if history:
                state = history.pop()
            continue
        history.append(state)
        state = task.apply_step(state, line)
    return state


def is_last_step(task: Task, state: Any) -> bool | None:
    """Whether a step written at ``state`` is the trace's last: one correct step from here
    finishes the work (None where the work is already done: no step belongs here)."""
    if task.is_done(state):
        return None
    steps = task.correct_steps(state)
    return bool(steps) and bool(task.is_done(task.apply_step(state, steps[0])))


# ---------------------------------------------------------------------------
# Metric definitions: pure functions on (task, state, continuation lines)
# ---------------------------------------------------------------------------


def count_false_alarms(events: Sequence[LineEvent]) -> tuple[int, int]:
    """(correct steps, recognition lines right after one of them) over judged lines."""
    n_ok = n_fa = 0
    for i, ev in enumerate(events):
        if ev.kind == "step_ok":
            n_ok += 1
            if i + 1 < len(events) and events[i + 1].kind == "recognition":
                n_fa += 1
    return n_ok, n_fa


def count_last_step_alarms(task: Task, events: Sequence[LineEvent]) -> tuple[int, int]:
    """(correct last steps, recognition lines right after one): the flag rate where an error
    would be a ``last_step`` error, the baseline its recognition rate must beat."""
    n_ok = n_fa = 0
    for i, ev in enumerate(events):
        if ev.kind == "step_ok" and is_last_step(task, ev.state_before):
            n_ok += 1
            n_fa += int(i + 1 < len(events) and events[i + 1].kind == "recognition")
    return n_ok, n_fa


def score_after_error(
    task: Task, problem: Problem, state_before: Any, wrong_step: str, continuation: str
) -> dict[str, Any]:
    """Score the model's continuation right after a wrong step (``synthetic``, ``ft_errors``).

    ``state_before`` is the state in which ``wrong_step`` was written.
    """
    lines = complete_lines(continuation)
    nxt = lines[0] if lines else None
    recognized = nxt is not None and is_recognition(nxt)
    after = lines[1] if recognized and len(lines) > 1 else None
    corrected = after is not None and task.check_step(state_before, after)
    parroted = after is not None and after.strip() == wrong_step.strip()
    # Walk from S with W written, so a recognition retracts W back to S.
    events = walk_trace(task, problem, [wrong_step, *lines], state=state_before)[1:]
    n_ok, n_fa = count_false_alarms(events)
    return {
        "next_line": nxt,
        "after_line": after,
        "recognized": recognized,
        "corrected": corrected,
        "parroted": parroted,
        "correct": final_answer_correct(task, problem, continuation),
        "false_alarm": n_fa > 0,
        "n_ok_steps": n_ok,
        "n_false_alarms": n_fa,
    }


def score_free_generation(task: Task, problem: Problem, completion: str) -> dict[str, Any]:
    """Score a free generation from the prompt (``clean``).

    ``recognized`` = any recognition line at all; ``corrected`` = recognized and the
    trace still ends with the right answer (a self-corrected trace); ``parroted``
    is not defined here (see ``own_errors``).
    """
    lines = complete_lines(completion)
    events = walk_trace(task, problem, lines)
    n_ok, n_fa = count_false_alarms(events)
    recognized = any(ev.kind == "recognition" for ev in events)
    correct = final_answer_correct(task, problem, completion)
    n_ok_last, n_fa_last = count_last_step_alarms(task, events)
    return {
        "next_line": lines[0] if lines else None,
        "after_line": None,
        "recognized": recognized,
        "corrected": recognized and correct,
        "parroted": None,
        "correct": correct,
        "false_alarm": n_fa > 0,
        "n_ok_steps": n_ok,
        "n_false_alarms": n_fa,
        "n_ok_last_steps": n_ok_last,
        "n_false_alarms_last_step": n_fa_last,
    }


def own_errors(task: Task, problem: Problem, completion: str) -> list[dict[str, Any]]:
    """Every wrong step of a free generation with what the model did next (``own_errors``).

    Each wrong step W (malformed lines included, classified ``other``) yields
    recognized / corrected / parroted exactly as after an injected error; the
    state S is the one the model was in when it wrote W. As in harvesting
    (``selfcorrect.harvest.score_sample``, whose first error is the first row here),
    an ANSWER line written before the work is done is a wrong step that the model can
    recognise, and a line written after the last step (where no correct step exists
    to correct it to) is not scored.
    """
    lines = complete_lines(completion)
    events = walk_trace(task, problem, lines)
    correct = final_answer_correct(task, problem, completion)
    out = []
    for i, ev in enumerate(events):
        if ev.kind != "step_wrong":  # a premature ANSWER line is one (walk_trace)
            continue
        gold = pick_gold(task, ev.state_before, ev.line)
        if gold is None:
            continue
        nxt = events[i + 1].line if i + 1 < len(events) else None
        recognized = i + 1 < len(events) and events[i + 1].kind == "recognition"
        after = events[i + 2].line if recognized and i + 2 < len(events) else None
        out.append(
            {
                "step_index": ev.index,
                "prefix": render_prefix(task.prompt(problem), lines[: ev.index]),
                "wrong_step": ev.line,
                "gold_step": gold,
                "error_type": classify_error(task, ev.state_before, ev.line),
                "last_step": is_last_step(task, ev.state_before),
                "next_line": nxt,
                "after_line": after,
                "recognized": recognized,
                "corrected": after is not None and task.check_step(ev.state_before, after),
                "parroted": after is not None and after.strip() == ev.line.strip(),
                "correct": correct,
                # False alarms are a property of the whole generation: see summarize().
                "false_alarm": None,
                "n_ok_steps": None,
                "n_false_alarms": None,
            }
        )
    return out


# ---------------------------------------------------------------------------
# Items: what the model is asked to continue, per condition
# ---------------------------------------------------------------------------


def _item(
    condition: str,
    item_id: str,
    problem_id: str,
    prompt: str,
    prefix_steps: Sequence[str],
    wrong_step: str | None = None,
    gold_step: str | None = None,
    error_type: str | None = None,
) -> dict[str, Any]:
    steps = list(prefix_steps) + ([wrong_step] if wrong_step is not None else [])
    return {
        "condition": condition,
        "item_id": item_id,
        "problem_id": problem_id,
        "prompt": prompt,
        "prefix_steps": list(prefix_steps),
        "prefix": render_prefix(prompt, steps),
        "step_index": len(prefix_steps) if wrong_step is not None else None,
        "wrong_step": wrong_step,
        "gold_step": gold_step,
        "error_type": error_type,
    }


def _take(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    return rows if limit <= 0 else rows[:limit]


def clean_items(test_rows: list[dict[str, Any]], max_problems: int = 0) -> list[dict[str, Any]]:
    """One item per test problem (the first ``max_problems``; 0 = all): the bare prompt."""
    return [
        _item("clean", r["problem_id"], r["problem_id"], r["prompt"], [])
        for r in _take(test_rows, max_problems)
    ]


def synthetic_items(
    task: Task,
    test_rows: list[dict[str, Any]],
    seed: int,
    max_problems: int = 0,
    weights: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """One item per test problem: golden steps up to a random position, then one fresh
    synthetic error there. Seeded per problem, so adding problems never changes old items."""
    items = []
    for r in _take(test_rows, max_problems):
        problem = task.parse_prompt(r["prompt"])
        golden = task.golden_steps(problem)
        states, state = [], task.initial_state(problem)
        for step in golden:
            states.append(state)
            state = task.apply_step(state, step)
        # Only positions where some error type applies under these weights.
        ok = [i for i, s in enumerate(states) if applicable_weights(task, s, weights)]
        if not ok:
            continue
        rng = stream_rng(seed, task.name, "eval-synthetic", r["problem_id"])
        i = ok[int(rng.integers(len(ok)))]
        wrong, etype = sample_error(task, states[i], rng, weights)
        items.append(
            _item(
                "synthetic",
                f"{r['problem_id']}-syn",
                r["problem_id"],
                r["prompt"],
                golden[:i],
                wrong,
                golden[i],
                etype,
            )
        )
    return items


def ft_error_items(
    task: Task, harvest_rows: list[dict[str, Any]], seed: int, max_errors: int = 0
) -> list[dict[str, Any]]:
    """Items from harvested FT errors (``<task>/harvest/ft-test.parquet`` rows).

    A seeded subset of ``max_errors`` (0 = all), so a cap does not just keep the
    first problems' errors; kept in error_id order. The prompt text is rendered
    from the committed ``prefix_steps`` (falling back to the ``prefix`` text's
    lines), in the trainer's format.
    """
    rows = sorted(harvest_rows, key=lambda r: str(r["error_id"]))
    if 0 < max_errors < len(rows):
        rng = stream_rng(seed, task.name, "eval-ft_errors")
        keep = sorted(rng.choice(len(rows), size=max_errors, replace=False).tolist())
        rows = [rows[i] for i in keep]
    items = []
    for r in rows:
        if r.get("prefix_steps") is not None:
            steps = list(r["prefix_steps"])
        else:  # the prefix text: prompt line, then the steps
            steps = split_lines(r["prefix"])[1:]
        items.append(
            _item(
                "ft_errors",
                str(r["error_id"]),
                r["problem_id"],
                r["prompt"],
                steps,
                r["wrong_step"],
                r.get("gold_step"),
                r["error_type"],
            )
        )
    return items


def matched_synthetic_items(
    task: Task,
    ft_items: Iterable[dict[str, Any]],
    seed: int,
    weights: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """``matched_synthetic``: each ``ft_errors`` item's prefix with a fresh synthetic error.

    ``ft_items`` are ``ft_error_items`` (the same seeded subset). Each keeps the FT
    item's prompt, prefix steps and step index, so the model is asked about exactly
    the same state; only the wrong step is replaced by one ``sample_error`` draw
    under ``weights``, seeded per FT error (``<error_id>-matched``), so the item does
    not depend on which other errors were kept. States where no error type applies
    under ``weights`` are skipped. Comparing this condition with ``ft_errors``
    separates "what kind of error" from "where in the trace".
    """
    items = []
    for it in ft_items:
        problem = task.parse_prompt(it["prompt"])
        state = state_after(task, problem, it["prefix_steps"])
        if not applicable_weights(task, state, weights):
            continue
        rng = stream_rng(seed, task.name, "eval-matched_synthetic", str(it["item_id"]))
        wrong, etype = sample_error(task, state, rng, weights)
        gold = pick_gold(task, state, wrong)
        items.append(
            _item(
                "matched_synthetic",
                f"{it['item_id']}-matched",
                it["problem_id"],
                it["prompt"],
                it["prefix_steps"],
                wrong,
                gold if gold is not None else it.get("gold_step"),
                etype,
            )
        )
    return items


def generation_seed(seed: int, task: str, item_id: str, temperature: float) -> int:
    """Sampling seed of one (item, temperature): same for every model (common random numbers)."""
    rng = stream_rng(seed, task, "eval-generate", item_id, f"{float(temperature):.6g}")
    return int(rng.integers(0, 2**31 - 1))


# ---------------------------------------------------------------------------
# Scoring items once their completions are back
# ---------------------------------------------------------------------------


def paired_step(wrong_step: str, closest: str | None) -> str | None:
    """The correct step a wrong one is ranked against for ``discrimination_rate``: the closest
    correct step of its state (``harvest.pick_gold``) when it writes the same target, so only
    the value differs; else None (a sudoku digit written in a cell no correct step can fill
    yet: no pair). Why: a pair in two different cells would also measure which cell the model
    expects next, not whether the value is right."""
    if closest is None or step_target(closest) != step_target(wrong_step):
        return None
    return closest


def score_items(
    task: Task, items: Iterable[dict[str, Any]], completions: Sequence[str]
) -> list[dict[str, Any]]:
    """Items (with ``temperature`` and ``seed``) + completions -> eval rows.

    ``clean`` items also yield their ``own_errors`` rows (same generations).
    """
    out = []
    for it, completion in zip(items, completions, strict=True):
        problem = task.parse_prompt(it["prompt"])
        base = {k: it.get(k) for k in ITEM_COLUMNS if k in it}
        # The row's prefix is the text before the wrong step, as in harvest and own_errors
        # (the model was given it plus the wrong step).
        base.update(
            trace_id=it["item_id"],
            completion=completion,
            prefix=render_prefix(it["prompt"], it["prefix_steps"]),
        )
        if it["condition"] == "clean":
            out.append({**base, **score_free_generation(task, problem, completion)})
            for j, err in enumerate(own_errors(task, problem, completion)):
                out.append(
                    {
                        **base,
                        **err,
                        "condition": "own_errors",
                        "item_id": f"{it['item_id']}-own{j}",
                        "paired_step": paired_step(err["wrong_step"], err["gold_step"]),
                    }
                )
        else:
            state = state_after(task, problem, it["prefix_steps"])
            scores = score_after_error(task, problem, state, it["wrong_step"], completion)
            out.append(
                {
                    **base,
                    **scores,
                    "last_step": is_last_step(task, state),
                    "paired_step": paired_step(
                        it["wrong_step"], pick_gold(task, state, it["wrong_step"])
                    ),
                }
            )
    return out


# ---------------------------------------------------------------------------
# Summary: DESIGN 7 columns with 95% intervals, aggregate + per error type
# ---------------------------------------------------------------------------

# An interval for a ratio of per-row sums: (numerators, denominators) -> (lo, hi).
Interval = Callable[[np.ndarray, np.ndarray], tuple[float, float]]


def problem_clusters(df: pd.DataFrame) -> np.ndarray:
    """The cluster (test problem) of each row, as codes 0..k-1: ``problem_id``, else
    ``trace_id``, else ``item_id``, else the row itself.

    Rows of one problem share its difficulty and, for ``own_errors`` and false
    alarms, one generation, so they are not independent trials.
    """
    key = np.full(len(df), None, dtype=object)
    for c in ("problem_id", "trace_id", "item_id"):
        if c in df:
            v = df[c].to_numpy(dtype=object)
            fill = pd.isna(key) & ~pd.isna(v)
            key[fill] = v[fill]
    missing = np.flatnonzero(pd.isna(key))
    key[missing] = [f"_row{i}" for i in missing]
    codes, _ = pd.factorize(key.astype(str), sort=True)
    return codes


def _cluster_ci(codes: np.ndarray, rng: np.random.Generator) -> Interval:
    """Cluster-bootstrap intervals over ``codes``, one resampling matrix shared by every rate."""
    n_clusters = int(codes.max()) + 1 if len(codes) else 0
    weights: list[np.ndarray] = []

    def ci(num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
        if not weights:
            weights.append(bootstrap_weights(n_clusters, rng))
        sums = [np.bincount(codes, weights=v, minlength=n_clusters) for v in (num, den)]
        return cluster_interval(*sums, weights=weights[0])

    return ci


def _wilson_ci(num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
    # Sums of 0/1 flags, or of 0 / 0.5 / 1 (a tie in discrimination counts half a success).
    return wilson_interval(float(num.sum()), float(den.sum()))


def _rate(row: dict[str, Any], name: str, num: np.ndarray, den: np.ndarray, ci: Interval) -> None:
    k, n = float(num.sum()), float(den.sum())
    row[name] = k / n if n > 0 else math.nan
    row[f"{name}_lo"], row[f"{name}_hi"] = ci(num, den) if n > 0 else (math.nan, math.nan)


def _flags(s: pd.Series) -> np.ndarray:
    return s.astype("boolean").fillna(False).to_numpy(dtype=float)


def discrimination(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (1 if the model is likelier to write its recognition signal after the wrong
    step than after the paired correct step at the same state, 0.5 on a tie, 0 otherwise;
    1 where both scores exist, else 0).

    Why: greedy recognition needs the signal to beat every other next line, a threshold a
    model can miss while it still ranks errors above correct steps. The share of pairs ranked
    the right way is a paired AUC (0.5: no better than chance, whatever the threshold), so
    synthetic and own errors can be compared where greedy recognition is near zero. The
    paired step (``paired_step``) writes the same target as the wrong one with the right value,
    by one rule for every origin: against the golden next step instead, a model that flags an
    unexpected *cell* would score on synthetic errors (written in any cell) without checking
    a digit.
    """
    n = len(rows)
    if "signal_logp" not in rows or "paired_signal_logp" not in rows:
        return np.zeros(n), np.zeros(n)
    wrong = pd.to_numeric(rows["signal_logp"], errors="coerce").to_numpy(dtype=float)
    right = pd.to_numeric(rows["paired_signal_logp"], errors="coerce").to_numpy(dtype=float)
    paired = ~(np.isnan(wrong) | np.isnan(right))
    ranked = np.where(wrong > right, 1.0, np.where(wrong == right, 0.5, 0.0))
    return ranked * paired, paired.astype(float)


def _summary_row(
    key: dict[str, Any], g: pd.DataFrame, fa_source: pd.DataFrame | None, seed: int = 0
) -> dict[str, Any]:
    row: dict[str, Any] = dict(key)
    n = len(g)
    rec = _flags(g["recognized"])
    cor = _flags(g["corrected"])
    par_defined = g["parroted"].notna().to_numpy(dtype=float)
    par = _flags(g["parroted"]) * par_defined
    ones = np.ones(n)
    codes = problem_clusters(g)
    n_problems = int(codes.max()) + 1 if n else 0
    # Wilson when every item is its own problem; otherwise the trials are clustered.
    clustered = n_problems < n
    stream = [str(key.get(k)) for k in SUMMARY_KEYS]
    ci = _cluster_ci(codes, stream_rng(seed, "eval-summary", *stream)) if clustered else _wilson_ci
    row["n"] = n
    row["n_problems"] = n_problems
    row["n_recognized"] = int(rec.sum())
    _rate(row, "accuracy", _flags(g["correct"]), ones, ci)
    _rate(row, "recognition_rate", rec, ones, ci)
    _rate(row, "correction_rate", cor, ones, ci)
    _rate(row, "parrot_rate", par, par_defined, ci)
    if fa_source is None:
        per_trace = g.iloc[:0]
    else:
        # Counted once per generation (own_errors rows share their generation).
        per_trace = fa_source.drop_duplicates("trace_id")
    n_ok = per_trace["n_ok_steps"].astype("Float64").fillna(0).to_numpy(dtype=float)
    n_fa = per_trace["n_false_alarms"].astype("Float64").fillna(0).to_numpy(dtype=float)
    row["n_ok_steps"] = int(n_ok.sum())
    row["n_false_alarms"] = int(n_fa.sum())
    # Several correct steps of one generation: always clustered.
    fa_rng = stream_rng(seed, "eval-summary-false_alarm", *stream)
    _rate(row, "false_alarm_rate", n_fa, n_ok, _cluster_ci(problem_clusters(per_trace), fa_rng))
    _rate(row, "correction_given_recognition", cor, rec, ci)
    _rate(row, "parrot_given_recognition", par, rec if par_defined.any() else 0 * rec, ci)
    ranked, paired = discrimination(g)
    row["n_paired"] = int(paired.sum())
    _rate(row, "discrimination_rate", ranked, paired, ci)
    surprise = (
        g["wrong_step_surprise"] if "wrong_step_surprise" in g else pd.Series([], dtype=float)
    )
    row["mean_wrong_step_surprise"] = float(surprise.mean()) if surprise.notna().any() else math.nan
    row["interval_method"] = CLUSTER_BOOTSTRAP if clustered else WILSON
    row["false_alarm_interval_method"] = CLUSTER_BOOTSTRAP if n_ok.sum() > 0 else None
    return row


def summarize(rows: pd.DataFrame | list[dict[str, Any]], seed: int = 0) -> pd.DataFrame:
    """Eval rows -> one summary row per task x model x condition x temperature x error_type.

    ``error_type`` is ``"all"`` for the aggregate and each type otherwise (not for
    ``clean``, which has no errors). The false-alarm rate of ``own_errors`` is over
    all free generations (the ``clean`` rows), since false alarms happen after
    correct steps, most of all in traces without any error; per-type rows of
    ``own_errors`` leave it undefined (NaN).

    Intervals (``selfcorrect.stats``): Wilson when each item is its own test problem
    (``interval_method == "wilson"``); a seeded percentile bootstrap over problems
    when some problem has several items (``own_errors``, and ``ft_errors`` /
    ``matched_synthetic`` when the FT model erred twice on a problem:
    ``"cluster_bootstrap"``); every false-alarm rate by the bootstrap over problems
    (``false_alarm_interval_method``). ``n_problems`` counts the clusters. The
    bootstrap of each summary row draws from its own stream of ``seed``, so the
    summary is a pure function of (rows, seed).
    """
    df = pd.DataFrame(rows) if not isinstance(rows, pd.DataFrame) else rows
    out = []
    if df.empty:
        return pd.DataFrame(columns=_summary_columns())
    base_keys = ["task", "model", "condition", "temperature"]
    for key_vals, g in df.groupby(base_keys, sort=True, dropna=False):
        key = dict(zip(base_keys, key_vals, strict=True))
        cond = key["condition"]
        if cond == "own_errors":
            free = df[
                (df["task"] == key["task"])
                & (df["model"] == key["model"])
                & (df["condition"] == "clean")
                & (df["temperature"] == key["temperature"])
            ]
            fa_all = free if len(free) else None
        else:
            fa_all = g
        out.append(_summary_row({**key, "error_type": ALL_TYPES}, g, fa_all, seed))
        if cond == "clean":
            continue
        for etype, ge in g.groupby("error_type", sort=True):
            fa = None if cond == "own_errors" else ge
            out.append(_summary_row({**key, "error_type": etype}, ge, fa, seed))
    return pd.DataFrame(out, columns=_summary_columns())


def _summary_columns() -> list[str]:
    cols = SUMMARY_KEYS + ["n", "n_problems", "n_recognized", "n_ok_steps", "n_false_alarms"]
    cols += ["n_paired"]  # error rows with both signal scores: discrimination_rate's n
    for r in RATES:
        cols += [r, f"{r}_lo", f"{r}_hi"]
    return cols + ["mean_wrong_step_surprise", "interval_method", "false_alarm_interval_method"]


def empty_rows_frame() -> pd.DataFrame:
    return pd.DataFrame(columns=ITEM_COLUMNS)


def rows_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Eval rows in the fixed column order, with stable dtypes for Parquet."""
    df = pd.DataFrame(rows, columns=ITEM_COLUMNS)
    for c in ("recognized", "corrected", "parroted", "correct", "false_alarm", "last_step"):
        df[c] = df[c].astype("boolean")
    counts = ("n_ok_steps", "n_false_alarms", "n_ok_last_steps", "n_false_alarms_last_step")
    for c in ("step_index", "seed", *counts):
        df[c] = df[c].astype("Int64")
    df["temperature"] = df["temperature"].astype(float)
    for c in ("wrong_step_surprise", "signal_logp", "paired_signal_logp"):
        df[c] = df[c].astype(float)
    return df


def sort_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Deterministic row order (condition, temperature, item) whatever order Ray returned."""
    order = {c: i for i, c in enumerate(CONDITIONS)}
    return (
        df.assign(_c=df["condition"].map(order))
        .sort_values(["_c", "temperature", "item_id"], kind="stable")
        .drop(columns="_c")
        .reset_index(drop=True)
    )
