"""Tasks: one module each, all behind the ``Task`` interface in ``base``."""

from __future__ import annotations

from typing import Any

from selfcorrect.tasks.base import (
    ANSWER_PREFIX,
    INSEC_CLOSE,
    INSEC_OPEN,
    OTHER,
    RECOGNITION_LINE,
    LineEvent,
    MalformedProblemError,
    Problem,
    Task,
    answer_index,
    applicable_types,
    applicable_weights,
    classify_error,
    clean_line,
    complete_lines,
    error_probability,
    final_answer_correct,
    is_answer,
    is_recognition,
    possible_types,
    sample_error,
    sample_errors,
    signal_line,
    split_lines,
    step_target,
    trace_end,
    walk_trace,
)
from selfcorrect.tasks.multiplication import Multiplication
from selfcorrect.tasks.sudoku import Sudoku

TASKS = {"multiplication": Multiplication, "sudoku": Sudoku}


def get_task(name: str, **options: Any) -> Task:
    """Build a task by name with its options (e.g. ``digits_a=4``)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](**options)


__all__ = [
    "ANSWER_PREFIX",
    "INSEC_CLOSE",
    "INSEC_OPEN",
    "OTHER",
    "RECOGNITION_LINE",
    "TASKS",
    "LineEvent",
    "MalformedProblemError",
    "Multiplication",
    "Problem",
    "Sudoku",
    "Task",
    "answer_index",
    "applicable_types",
    "applicable_weights",
    "classify_error",
    "clean_line",
    "complete_lines",
    "error_probability",
    "final_answer_correct",
    "get_task",
    "is_answer",
    "is_recognition",
    "signal_line",
    "possible_types",
    "sample_error",
    "sample_errors",
    "split_lines",
    "step_target",
    "trace_end",
    "walk_trace",
]
