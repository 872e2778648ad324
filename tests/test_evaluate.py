"""Metric definitions on hand-written continuations, for both tasks, plus items and the summary."""

from __future__ import annotations

import math
import os

import pandas as pd
import pytest

from selfcorrect.evaluate import (
    ALL_TYPES,
    CONDITIONS,
    RATES,
    clean_items,
    complete_lines,
    ft_error_items,
    generation_seed,
    is_last_step,
    own_errors,
    render_prefix,
    score_after_error,
    score_free_generation,
    score_items,
    state_after,
    summarize,
    synthetic_items,
    wilson_interval,
)
from selfcorrect.tasks import (
    INSEC_CLOSE,
    RECOGNITION_LINE,
    Multiplication,
    Sudoku,
    classify_error,
    final_answer_correct,
    get_task,
)
from selfcorrect.traces import clean_example

R = RECOGNITION_LINE


# One hand-picked error per task: prompt, correct prefix, the wrong step written after it,
# a correct step there (for sudoku deliberately NOT the golden one: any correct step counts).
CASES = {
    "multiplication": dict(
        task=Multiplication(2, 2),
        prompt="12*34",
        prefix=["12*4=48"],
        wrong="12*30=367",
        fix="12*30=360",
        rest=["48+360=408"],
        answer="ANSWER 408",
        bad_answer="ANSWER 398",
        wrong_type="int_10",
    ),
    "sudoku": dict(
        task=Sudoku(7, 7),
        prompt="41.3 .3.1 321. 1...",
        prefix=[],
        wrong="r2c3=4",  # r2c3 still has candidates {2, 4}
        fix="r3c4=4",  # a naked single, though the golden trace starts with r1c3=2
        rest=["r1c3=2", "r2c1=2", "r2c3=4", "r4c2=4", "r4c3=3", "r4c4=2"],
        answer="ANSWER 4123 2341 3214 1432",
        bad_answer="ANSWER 4123 2341 3214 1423",
        wrong_type="non_naked_single",
    ),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    c = dict(CASES[request.param])
    task = c["task"]
    c["problem"] = task.parse_prompt(c["prompt"])
    c["state"] = state_after(task, c["problem"], c["prefix"])
    # The hand-picked steps are what they claim to be.
    assert not task.check_step(c["state"], c["wrong"])
    assert classify_error(task, c["state"], c["wrong"]) == c["wrong_type"]
    assert task.check_step(c["state"], c["fix"])
    assert task.check_answer(c["problem"], c["answer"])
    return c


def lines(*ls: str) -> str:
    return "".join(line + "\n" for line in ls)


def after_error(c, text):
    return score_after_error(c["task"], c["problem"], c["state"], c["wrong"], text)


# ---------------------------------------------------------------------------
# After an injected / harvested error
# ---------------------------------------------------------------------------


def test_recognized_and_corrected(case):
    s = after_error(case, lines(R, case["fix"], *case["rest"], case["answer"]))
    assert s["recognized"] and s["corrected"] and not s["parroted"]
    assert s["correct"]
    assert s["n_false_alarms"] == 0 and not s["false_alarm"]
    assert s["n_ok_steps"] == 1 + len(case["rest"])
    assert s["next_line"] == R and s["after_line"] == case["fix"]


def test_recognized_and_parroted(case):
    s = after_error(case, lines(R, case["wrong"], case["bad_answer"]))
    assert s["recognized"] and s["parroted"] and not s["corrected"]
    assert not s["correct"]


def test_recognized_then_a_different_wrong_step_is_neither(case):
    other = case["wrong"].replace("=", "=9", 1)
    s = after_error(case, lines(R, other))
    assert s["recognized"] and not s["corrected"] and not s["parroted"]


def test_missed(case):
    s = after_error(case, lines(*case["rest"], case["bad_answer"]))
    assert not s["recognized"] and not s["corrected"] and not s["parroted"]
    assert s["after_line"] is None


def test_correct_step_without_recognition_is_not_a_correction(case):
    # Writing a correct step for S right away is not self-correction: no recognition line.
    s = after_error(case, lines(case["fix"]))
    assert not s["recognized"] and not s["corrected"]


def test_insec_closing_marker_counts_as_recognition(case):
    s = after_error(case, lines(INSEC_CLOSE, case["fix"], *case["rest"], case["answer"]))
    assert s["recognized"] and s["corrected"] and s["correct"]


def test_false_alarm_after_the_correction(case):
    s = after_error(case, lines(R, case["fix"], R, case["fix"], *case["rest"], case["answer"]))
    assert s["recognized"] and s["corrected"]
    assert s["n_false_alarms"] == 1 and s["false_alarm"]
    assert s["n_ok_steps"] == 2 + len(case["rest"])


@pytest.mark.parametrize("text", ["", "\n\n", "@@@ ???\n*#", "AH! I MADE A MIST", "AH! I MADE A"])
def test_malformed_or_truncated_output_is_scored_not_raised(case, text):
    s = after_error(case, text)
    assert not s["recognized"] and not s["corrected"] and not s["parroted"]
    assert not s["correct"] and s["n_false_alarms"] == 0


def test_malformed_line_after_recognition(case):
    s = after_error(case, lines(R, "=== ?? ==="))
    assert s["recognized"] and not s["corrected"] and not s["parroted"]


def test_truncated_last_line_is_dropped_but_a_complete_answer_is_kept():
    assert complete_lines("a\nb") == ["a"]
    assert complete_lines("a\nb\n") == ["a", "b"]
    assert complete_lines("a\nANSWER 408") == ["a", "ANSWER 408"]
    assert complete_lines("") == []


# ---------------------------------------------------------------------------
# Free generations: clean and own_errors
# ---------------------------------------------------------------------------


def golden_text(c):
    return lines(*c["task"].golden_steps(c["problem"]), c["task"].answer_line(c["problem"]))


def test_clean_golden_generation(case):
    s = score_free_generation(case["task"], case["problem"], golden_text(case))
    assert s["correct"] and not s["recognized"] and not s["corrected"]
    assert s["parroted"] is None
    assert s["n_false_alarms"] == 0
    assert s["n_ok_steps"] == len(case["task"].golden_steps(case["problem"]))
    assert own_errors(case["task"], case["problem"], golden_text(case)) == []


def test_clean_false_alarm_and_self_corrected_trace(case):
    task, problem = case["task"], case["problem"]
    golden = task.golden_steps(problem)
    text = lines(golden[0], R, *golden, task.answer_line(problem))
    s = score_free_generation(task, problem, text)
    assert s["recognized"] and s["correct"] and s["corrected"]  # self-corrected, still right
    assert s["n_false_alarms"] == 1 and s["false_alarm"]
    assert s["n_ok_steps"] == len(golden) + 1
    assert own_errors(task, problem, text) == []  # a false alarm is not an error


def test_own_error_recognized_and_corrected(case):
    task, problem = case["task"], case["problem"]
    text = lines(*case["prefix"], case["wrong"], R, case["fix"], *case["rest"], case["answer"])
    errs = own_errors(task, problem, text)
    assert len(errs) == 1
    e = errs[0]
    assert e["wrong_step"] == case["wrong"] and e["step_index"] == len(case["prefix"])
    assert e["error_type"] == case["wrong_type"]
    assert e["recognized"] and e["corrected"] and not e["parroted"] and e["correct"]
    assert e["prefix"] == render_prefix(case["prompt"], case["prefix"])
    assert task.check_step(case["state"], e["gold_step"])
    s = score_free_generation(task, problem, text)
    assert s["recognized"] and s["corrected"] and s["n_false_alarms"] == 0


def test_own_error_parroted_and_missed(case):
    task, problem = case["task"], case["problem"]
    # wrong, recognition, the same wrong step again (parrot), then it goes on without noticing.
    text = lines(*case["prefix"], case["wrong"], R, case["wrong"], case["bad_answer"])
    errs = own_errors(task, problem, text)
    # The parrot is itself a wrong step, and so is an ANSWER line before the work is done.
    assert len(errs) == 3
    first, second, third = errs
    assert third["wrong_step"] == case["bad_answer"]
    assert first["recognized"] and first["parroted"] and not first["corrected"]
    assert not second["recognized"] and not second["parroted"]
    assert second["step_index"] == first["step_index"] + 2
    assert not first["correct"]


def test_own_malformed_line_is_an_error_of_type_other(case):
    task, problem = case["task"], case["problem"]
    text = lines(*case["prefix"], "hello world", R, case["fix"])
    errs = own_errors(task, problem, text)
    assert [e["error_type"] for e in errs] == ["other"]
    assert errs[0]["recognized"] and errs[0]["corrected"]


def test_own_truncated_tail_is_not_an_error(case):
    task, problem = case["task"], case["problem"]
    assert own_errors(task, problem, lines(*case["prefix"]) + case["fix"][:-1]) == []


def test_own_premature_answer_is_an_error_and_lines_after_the_last_step_are_not(case):
    task, problem = case["task"], case["problem"]
    errs = own_errors(task, problem, lines(*case["prefix"], case["bad_answer"]))
    assert [e["wrong_step"] for e in errs] == [case["bad_answer"]]
    assert errs[0]["error_type"] == "other" and not errs[0]["recognized"]
    golden = task.golden_steps(problem)
    # An extra step where the ANSWER line belongs: nothing to correct it to, so not scored.
    extra = lines(*golden, golden[-1], task.answer_line(problem))
    assert own_errors(task, problem, extra) == []


def test_own_premature_answer_can_be_recognised_corrected_and_parroted(case):
    """Issue 20.3: an ANSWER line written before the work is done is a wrong step like any
    other, so the recognition line after it counts, and the retracted answer is not the
    trace's answer."""
    task, problem = case["task"], case["problem"]
    bad = case["bad_answer"]
    text = lines(*case["prefix"], bad, R, case["fix"], *case["rest"], case["answer"])
    errs = own_errors(task, problem, text)
    assert [e["wrong_step"] for e in errs] == [bad]
    e = errs[0]
    assert e["step_index"] == len(case["prefix"]) and e["error_type"] == "other"
    assert e["recognized"] and e["corrected"] and not e["parroted"]
    assert e["next_line"] == R and e["after_line"] == case["fix"]
    assert e["correct"]  # the retracted ANSWER line is not the final answer
    s = score_free_generation(task, problem, text)
    assert s["correct"] and s["recognized"] and s["corrected"] and s["n_false_alarms"] == 0
    # Parroting the premature answer: recognised, parroted; the repeat is committed, and is
    # the trace's (wrong) answer.
    errs = own_errors(task, problem, lines(*case["prefix"], bad, R, bad))
    assert [(e["recognized"], e["parroted"]) for e in errs] == [(True, True), (False, False)]
    assert not errs[0]["correct"]


def test_after_an_injected_premature_answer_a_recognition_counts(case):
    """ft_errors items can end in a premature ANSWER line harvested from the FT model."""
    task, problem, state = case["task"], case["problem"], case["state"]
    cont = lines(R, case["fix"], *case["rest"], case["answer"])
    s = score_after_error(task, problem, state, case["bad_answer"], cont)
    assert s["recognized"] and s["corrected"] and s["correct"]
    assert s["n_ok_steps"] == 1 + len(case["rest"]) and s["n_false_alarms"] == 0


def test_the_final_answer_is_the_first_answer_not_retracted(case):
    task, problem = case["task"], case["problem"]
    golden = task.golden_steps(problem)
    good, bad = case["answer"], case["bad_answer"]
    assert final_answer_correct(task, problem, lines(*golden, bad, R, good))
    assert final_answer_correct(task, problem, lines(*golden, good, "junk", bad))
    assert not final_answer_correct(task, problem, lines(*golden, bad, good))
    assert not final_answer_correct(task, problem, lines(*golden, good, INSEC_CLOSE))


# ---------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------


def _test_rows(task, n=8, seed=0):
    from selfcorrect.data import make_splits

    return make_splits(task, 5, n, seed)["test"].to_pylist()


@pytest.mark.parametrize("name", ["multiplication", "sudoku"])
def test_synthetic_items_are_seeded_wrong_and_in_training_format(name):
    task = get_task(name, **({"digits_a": 3, "digits_b": 3} if name == "multiplication" else {}))
    rows = _test_rows(task, n=12)
    a = synthetic_items(task, rows, seed=1)
    assert a == synthetic_items(task, rows, seed=1)
    b = synthetic_items(task, rows, seed=2)
    assert [x["wrong_step"] for x in a] != [x["wrong_step"] for x in b]
    assert len(a) == len(rows)
    for it in a:
        problem = task.parse_prompt(it["prompt"])
        state = state_after(task, problem, it["prefix_steps"])
        assert not task.check_step(state, it["wrong_step"])
        assert task.check_step(state, it["gold_step"])
        assert it["error_type"] in task.error_types
        golden = task.golden_steps(problem)
        assert it["prefix_steps"] == golden[: it["step_index"]]
        # Exactly the text the trainer shows: prompt line, steps, each ending in a newline.
        train_text = clean_example(task, problem).text
        prefix_only = render_prefix(it["prompt"], it["prefix_steps"])
        assert train_text.startswith(prefix_only)
        assert it["prefix"] == prefix_only + it["wrong_step"] + "\n"
    # A cap takes a prefix of the same items (seeded per problem).
    assert synthetic_items(task, rows, seed=1, max_problems=5) == a[:5]
    assert [it["item_id"] for it in clean_items(rows, 3)] == [r["problem_id"] for r in rows[:3]]
    assert clean_items(rows)[0]["prefix"] == rows[0]["prompt"] + "\n"


def test_ft_error_items_from_harvest_rows():
    c = CASES["multiplication"]
    rows = [
        {
            "error_id": f"e{i}",
            "problem_id": f"p{i}",
            "prompt": c["prompt"],
            "prefix": render_prefix(c["prompt"], c["prefix"]),
            "prefix_steps": c["prefix"],
            "wrong_step": c["wrong"],
            "gold_step": c["fix"],
            "error_type": c["wrong_type"],
        }
        for i in range(10)
    ]
    items = ft_error_items(c["task"], rows, seed=0)
    assert [it["item_id"] for it in items] == [f"e{i}" for i in range(10)]
    assert items[0]["prefix"] == lines(c["prompt"], *c["prefix"], c["wrong"])
    # Without prefix_steps the steps are read back from the prefix text.
    no_steps = [{k: v for k, v in r.items() if k != "prefix_steps"} for r in rows]
    assert ft_error_items(c["task"], no_steps, seed=0) == items
    capped = ft_error_items(c["task"], rows, seed=0, max_errors=4)
    assert len(capped) == 4 and capped == ft_error_items(c["task"], rows, seed=0, max_errors=4)
    assert capped != items[:4] or ft_error_items(c["task"], rows, 1, 4) != capped


def test_generation_seeds_differ_by_item_and_temperature_not_by_call():
    a = generation_seed(0, "sudoku", "x", 0.7)
    assert a == generation_seed(0, "sudoku", "x", 0.7)
    assert a != generation_seed(0, "sudoku", "y", 0.7)
    assert a != generation_seed(0, "sudoku", "x", 1.0)
    assert a != generation_seed(1, "sudoku", "x", 0.7)


def test_score_items_emits_own_errors_from_clean_generations(case):
    task = case["task"]
    item = clean_items([{"problem_id": "p0", "prompt": case["prompt"]}])[0]
    item.update(task=task.name, model="m", temperature=0.0, seed=1)
    text = lines(*case["prefix"], case["wrong"], R, case["fix"], *case["rest"], case["answer"])
    rows = score_items(task, [item], [text])
    assert [r["condition"] for r in rows] == ["clean", "own_errors"]
    assert rows[1]["trace_id"] == rows[0]["trace_id"] == "p0"
    assert rows[1]["item_id"] == "p0-own0" and rows[1]["corrected"]


def test_row_prefix_is_the_text_before_the_wrong_step_in_every_condition(case):
    """The same wrong step at the same state, injected or the model's own, gets one prefix
    (the harvest's meaning); only the model's input for the injected item adds the step."""
    task = case["task"]
    prompt_row = {"problem_id": "p0", "prompt": case["prompt"]}
    free = dict(clean_items([prompt_row])[0], task=task.name, model="m", temperature=0.0, seed=1)
    text = lines(*case["prefix"], case["wrong"], R, case["fix"], *case["rest"], case["answer"])
    own = [r for r in score_items(task, [free], [text]) if r["condition"] == "own_errors"][0]
    injected = ft_error_items(
        task,
        [{**own, "error_id": "e0", "prefix_steps": list(case["prefix"])}],
        seed=0,
    )[0]
    assert injected["prefix"].endswith(case["wrong"] + "\n")  # what the model continues
    injected.update(task=task.name, model="m", temperature=0.0, seed=1)
    (row,) = score_items(task, [injected], [lines(R, case["fix"], case["answer"])])
    assert row["prefix"] == own["prefix"] == render_prefix(case["prompt"], case["prefix"])
    assert row["step_index"] == own["step_index"] == len(case["prefix"])


def test_last_step_is_where_one_correct_step_finishes_the_work(case):
    task, problem = case["task"], case["problem"]
    golden = task.golden_steps(problem)
    flags = [is_last_step(task, state_after(task, problem, golden[:i])) for i in range(len(golden))]
    assert flags == [False] * (len(golden) - 1) + [True]
    assert is_last_step(task, state_after(task, problem, golden)) is None  # nothing left


def test_rows_say_whether_the_error_stands_at_the_last_step(case):
    """Every error row (injected or the model's own) carries ``last_step``; clean rows
    count the correct last steps and the recognition lines right after them."""
    task, problem = case["task"], case["problem"]
    golden = task.golden_steps(problem)
    answer = task.answer_line(problem)
    items = synthetic_items(task, [{"problem_id": "p0", "prompt": case["prompt"]}], seed=0)
    item = dict(items[0], task=task.name, model="m", temperature=0.0, seed=1)
    (row,) = score_items(task, [item], [lines(R, item["gold_step"], answer)])
    assert row["last_step"] == (item["step_index"] == len(golden) - 1)
    # A model that flags its own correct last step, then repeats it: a false alarm there.
    free = clean_items([{"problem_id": "p1", "prompt": case["prompt"]}])[0]
    free.update(task=task.name, model="m", temperature=0.0, seed=1)
    (clean,) = score_items(task, [free], [lines(*golden, R, golden[-1], answer)])
    assert clean["n_ok_last_steps"] == 2 and clean["n_false_alarms_last_step"] == 1
    assert clean["n_false_alarms"] == 1
    # An own error at the last step, and one earlier (sudoku: a first step can be wrong too).
    wrong_last = "r1c1=9" if task.name == "sudoku" else "1*1=9"  # malformed: a wrong step
    rows = score_items(task, [free], [lines(*golden[:-1], wrong_last, answer)])
    own = [r for r in rows if r["condition"] == "own_errors"]
    assert own and own[0]["last_step"] is True and rows[0]["n_ok_last_steps"] == 0
    early = score_items(task, [free], [lines(*case["prefix"], case["wrong"], answer)])
    assert [r["last_step"] for r in early if r["condition"] == "own_errors"][0] is False


# ---------------------------------------------------------------------------
# Statistics and the summary
# ---------------------------------------------------------------------------


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(3.8414588 / 13.8414588, rel=1e-6)
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(1 - 3.8414588 / 13.8414588, rel=1e-6)
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(1 - hi) and lo == pytest.approx(0.2365931, rel=1e-5)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    # Narrower with more data, always containing the point estimate.
    assert wilson_interval(50, 100)[1] - wilson_interval(50, 100)[0] < hi - lo
    for k, n in [(1, 3), (7, 9), (0, 1), (30, 31)]:
        lo, hi = wilson_interval(k, n)
        assert 0 <= lo <= k / n <= hi <= 1


def _row(
    cond, item, etype=None, rec=False, cor=False, par=False, correct=False, ok=0, fa=0, tr=None
):
    return {
        "task": "t",
        "model": "m",
        "condition": cond,
        "temperature": 0.0,
        "item_id": item,
        "trace_id": tr or item,
        "error_type": etype,
        "recognized": rec,
        "corrected": cor,
        "parroted": None if cond == "clean" else par,
        "correct": correct,
        "n_ok_steps": None if cond == "own_errors" else ok,
        "n_false_alarms": None if cond == "own_errors" else fa,
    }


def test_summary_rates_intervals_and_per_type_rows():
    rows = [
        _row("clean", "p0", correct=True, ok=3),
        _row("clean", "p1", rec=True, cor=True, correct=True, ok=4, fa=1),
        _row("clean", "p2", ok=2),
        _row("clean", "p3", ok=1),
        _row("synthetic", "s0", "digit", rec=True, cor=True, correct=True, ok=2),
        _row("synthetic", "s1", "digit", rec=True, par=True, ok=2, fa=2),
        _row("synthetic", "s2", "carry", ok=3),
        _row("synthetic", "s3", "carry"),
        _row("own_errors", "p1-own0", "other", rec=True, cor=True, correct=True, tr="p1"),
        _row("own_errors", "p2-own0", "digit", tr="p2"),
        _row("own_errors", "p2-own1", "digit", rec=True, par=True, tr="p2"),
    ]
    s = summarize(rows).set_index(["condition", "error_type"])
    clean = s.loc[("clean", ALL_TYPES)]
    assert clean["n"] == 4 and clean["accuracy"] == 0.5
    assert clean["recognition_rate"] == 0.25 and clean["correction_rate"] == 0.25
    assert math.isnan(clean["parrot_rate"])
    assert clean["false_alarm_rate"] == pytest.approx(1 / 10)
    assert ("clean", "digit") not in s.index
    syn = s.loc[("synthetic", ALL_TYPES)]
    assert syn["n"] == 4 and syn["recognition_rate"] == 0.5
    assert syn["correction_rate"] == 0.25 and syn["parrot_rate"] == 0.25
    assert syn["correction_given_recognition"] == 0.5
    assert syn["false_alarm_rate"] == pytest.approx(2 / 7)
    assert (syn["recognition_rate_lo"], syn["recognition_rate_hi"]) == wilson_interval(2, 4)
    digit = s.loc[("synthetic", "digit")]
    assert digit["n"] == 2 and digit["recognition_rate"] == 1.0 and digit["parrot_rate"] == 0.5
    assert s.loc[("synthetic", "carry")]["recognition_rate"] == 0.0
    own = s.loc[("own_errors", ALL_TYPES)]
    assert own["n"] == 3 and own["recognition_rate"] == pytest.approx(2 / 3)
    assert own["correction_rate"] == pytest.approx(1 / 3)
    # own_errors false alarms: over every free generation (the clean rows), not only errorful ones.
    assert own["false_alarm_rate"] == pytest.approx(1 / 10)
    assert math.isnan(s.loc[("own_errors", "digit")]["false_alarm_rate"])
    for r in RATES:
        assert {r, f"{r}_lo", f"{r}_hi"} <= set(s.columns)
    assert set(s.reset_index()["condition"]) <= set(CONDITIONS)
    # Rows without the model's surprise (runs from before it): the mean is undefined.
    assert s["mean_wrong_step_surprise"].isna().all()


def test_summary_means_the_wrong_steps_surprise_per_condition_and_type():
    rows = [_row("clean", "p0", ok=3)] + [
        {**_row("synthetic", f"s{i}", etype), "wrong_step_surprise": v}
        for i, (etype, v) in enumerate([("digit", 4.0), ("digit", 6.0), ("carry", 2.0)])
    ]
    s = summarize(rows).set_index(["condition", "error_type"])
    assert s.loc[("synthetic", ALL_TYPES)]["mean_wrong_step_surprise"] == pytest.approx(4.0)
    assert s.loc[("synthetic", "digit")]["mean_wrong_step_surprise"] == pytest.approx(5.0)
    assert math.isnan(s.loc[("clean", ALL_TYPES)]["mean_wrong_step_surprise"])


def test_summary_is_order_independent():
    rows = [
        _row("synthetic", f"s{i}", "digit" if i % 2 else "carry", rec=i % 3 == 0, ok=i)
        for i in range(9)
    ]
    a = summarize(rows)
    b = summarize(list(reversed(rows)))
    pd.testing.assert_frame_equal(a, b)


def test_run_summary_keeps_every_task_when_tasks_finish_in_threads(tmp_path):
    """The pipeline evaluates tasks in concurrent threads, each on a one-task config: the
    run-level eval_summary.parquet must still hold every task's rows, whoever writes last."""
    import threading

    import pandas as pd

    from rayjobs.common import JobContext, save_resolved_config
    from rayjobs.evaluate import write_run_summary
    from selfcorrect import io
    from selfcorrect.config import load_config

    out = str(tmp_path / "run")
    cfg = load_config(None, ["tasks=[multiplication,sudoku]"])
    save_resolved_config(JobContext(cfg, out))
    barrier = threading.Barrier(2)

    def finish(task: str) -> None:
        one = load_config(None, [f"tasks=[{task}]"])
        io.write_parquet(
            io.join(out, task, "eval", "summary.parquet"),
            pd.DataFrame({"task": [task], "model": ["ft"], "accuracy": [0.5]}),
        )
        barrier.wait()  # both task summaries exist before either writes the run summary
        write_run_summary(JobContext(one, out))

    threads = [threading.Thread(target=finish, args=(t,)) for t in cfg.tasks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary = pd.read_parquet(os.path.join(out, "eval_summary.parquet"))
    assert summary["task"].tolist() == ["multiplication", "sudoku"]


def test_discrimination_ranks_each_error_against_its_gold_step():
    """1 when the signal is likelier after the wrong step than after the gold one, 0.5 on a
    tie, 0 below; rows without both scores are left out of the rate."""
    pairs = [(-1.0, -3.0), (-3.0, -1.0), (-2.0, -2.0), (-0.5, -4.0), (None, -1.0)]
    rows = [_row("clean", "p0", ok=3)] + [
        {**_row("synthetic", f"s{i}", "digit"), "signal_logp": w, "paired_signal_logp": g}
        for i, (w, g) in enumerate(pairs)
    ]
    s = summarize(rows).set_index(["condition", "error_type"])
    syn = s.loc[("synthetic", ALL_TYPES)]
    assert syn["n"] == 5 and syn["n_paired"] == 4
    assert syn["discrimination_rate"] == pytest.approx(2.5 / 4)
    assert syn["discrimination_rate_lo"] < 2.5 / 4 < syn["discrimination_rate_hi"]
    assert math.isnan(s.loc[("clean", ALL_TYPES)]["discrimination_rate"])
    # Rows from before the scores (or eval.surprise off): undefined, not 0.
    plain = summarize([_row("synthetic", "s0", "digit")]).iloc[0]
    assert math.isnan(plain["discrimination_rate"])


def test_every_error_row_is_paired_with_the_right_value_for_its_target(case):
    """``paired_step`` (what ``discrimination_rate`` ranks the wrong step against) follows one
    rule for every origin: the correct step of the wrong step's state that writes the same
    target (sudoku cell, multiplication left-hand side), or none. Synthetic rows keep the
    golden next step as ``gold_step``; on sudoku an error written in another cell than the
    golden step's is paired with that cell's right digit, or with nothing when no correct step
    fills that cell yet."""
    from selfcorrect.harvest import pick_gold
    from selfcorrect.tasks import step_target

    task, problem = case["task"], case["problem"]
    answer = task.answer_line(problem)
    prompt_rows = [{"problem_id": f"p{i}", "prompt": case["prompt"]} for i in range(40)]
    items = synthetic_items(task, prompt_rows, seed=0)
    other_cell = unpaired = 0
    for it in items:
        it = dict(it, task=task.name, model="m", temperature=0.0, seed=1)
        (row,) = score_items(task, [it], [lines(R, it["gold_step"], answer)])
        state = state_after(task, problem, it["prefix_steps"])
        wrong, pair = row["wrong_step"], row["paired_step"]
        assert not task.check_step(state, wrong)
        if pair is None:
            unpaired += 1
            assert all(step_target(c) != step_target(wrong) for c in task.correct_steps(state))
            continue
        assert pair == pick_gold(task, state, wrong) and task.check_step(state, pair)
        assert step_target(pair) == step_target(wrong) and pair != wrong
        other_cell += pair != row["gold_step"]
    if task.name == "sudoku":
        assert other_cell > 0 and unpaired > 0
    else:
        assert other_cell == unpaired == 0
    free = dict(clean_items(prompt_rows[:1])[0], task=task.name, model="m", temperature=0.0)
    text = lines(*case["prefix"], case["wrong"], R, case["fix"], *case["rest"], answer)
    own = [r for r in score_items(task, [free], [text]) if r["condition"] == "own_errors"]
    assert own and all(r["paired_step"] in (r["gold_step"], None) for r in own)


def test_the_generation_feed_goes_by_model_then_temperature_then_length():
    """Ray Data batches consecutive rows: the feed keeps each model's rows together (an actor
    holds one model at a time) and puts rows of like length side by side, losing none."""
    from rayjobs.evaluate import by_length

    feed = [
        {"key": i, "model_path": m, "temperature": t, "prefix": "x" * n}
        for i, (m, t, n) in enumerate(
            [
                ("b", 0.0, 9),
                ("a", 0.7, 1),
                ("b", 0.0, 3),
                ("a", 0.0, 5),
                ("b", 0.7, 2),
                ("a", 0.0, 2),
            ]
        )
    ]
    out = by_length(feed, "prefix")
    assert sorted(r["key"] for r in out) == list(range(len(feed)))
    assert [(r["model_path"], r["temperature"], len(r["prefix"])) for r in out] == [
        ("b", 0.0, 3),
        ("b", 0.0, 9),
        ("b", 0.7, 2),
        ("a", 0.0, 2),
        ("a", 0.0, 5),
        ("a", 0.7, 1),
    ]
    scored = [{"key": 0, "prefix": "ab", "step": "cdef"}, {"key": 1, "prefix": "abcd", "step": "e"}]
    assert [r["key"] for r in by_length(scored, "prefix", "step")] == [1, 0]
