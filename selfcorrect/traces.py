"""Training traces: clean, error-injected (EIFT), hybrid, and InSeC, with per-character span labels.

Every builder returns an ``Example``: the full text (prompt line, step lines,
answer line) plus labelled character spans. The loss masks are derived from
these spans in exactly one place (``selfcorrect.loss``), so a trace format
change never silently changes what the model is trained to produce.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from selfcorrect.tasks.base import (
    INSEC_CLOSE,
    INSEC_OPEN,
    RECOGNITION_LINE,
    Problem,
    Task,
    sample_error,
)


class Span(IntEnum):
    """What a character is, for the loss. Values are stable: they are stored in Parquet."""

    PROMPT = 0  # weight 0
    GOLDEN = 1  # weight 1
    WRONG = 2  # weight 0: the model sees it but is never trained to produce it
    RECOGNITION = 3  # weight w_recognition
    CORRECTION = 4  # weight w_correction
    MARKER = 5  # InSeC opening tag before a mistake: weight 0
    MISTAKE = 6  # InSeC mistake body: weight 0 (mask) or unlikelihood


@dataclass
class Example:
    """One training text with labelled character spans ``(start, end, Span)`` covering it exactly."""

    text: str
    spans: list[tuple[int, int, int]]
    source: str  # clean | synthetic | onpolicy | insec
    error_types: list[str] = field(default_factory=list)
    error_steps: list[int] = field(default_factory=list)

    def char_labels(self) -> np.ndarray:
        labels = np.full(len(self.text), -1, dtype=np.int8)
        for s, e, k in self.spans:
            labels[s:e] = k
        return labels


class _Builder:
    def __init__(self) -> None:
        self.text: list[str] = []
        self.spans: list[tuple[int, int, int]] = []
        self.n = 0

    def add(self, s: str, kind: Span) -> None:
        if s:
            self.text.append(s)
            self.spans.append((self.n, self.n + len(s), int(kind)))
            self.n += len(s)

    def line(self, s: str, kind: Span) -> None:
        self.add(s + "\n", kind)

    def build(self, source: str, types: list[str], steps: list[int]) -> Example:
        return Example("".join(self.text), self.spans, source, types, steps)


def clean_example(task: Task, problem: Problem) -> Example:
    b = _Builder()
    b.line(task.prompt(problem), Span.PROMPT)
    for step in task.golden_steps(problem):
        b.line(step, Span.GOLDEN)
    b.line(task.answer_line(problem), Span.GOLDEN)
    return b.build("clean", [], [])


def _finish_golden(b: _Builder, task: Task, problem: Problem, state: Any) -> None:
    """Golden continuation from ``state``: the task's first correct step until done."""
    while not task.is_done(state):
        step = task.correct_steps(state)[0]
        b.line(step, Span.GOLDEN)
        state = task.apply_step(state, step)
    b.line(task.answer_line(problem), Span.GOLDEN)


def eift_example(
    task: Task,
    problem: Problem,
    rng: np.random.Generator,
    max_errors: int = 4,
    type_weights: dict[str, float] | None = None,
) -> Example:
    """Golden trace with 1..max_errors synthetic errors, each as: wrong, recognition, correct.

    Errors per trace are uniform over 1..min(max_errors, n_steps); positions are
    uniform without replacement.
    """
    steps = task.golden_steps(problem)
    k = int(rng.integers(1, min(max_errors, len(steps)) + 1))
    positions = set(rng.choice(len(steps), size=k, replace=False).tolist())
    b = _Builder()
    b.line(task.prompt(problem), Span.PROMPT)
    state = task.initial_state(problem)
    types, where = [], []
    for i, step in enumerate(steps):
        if i in positions:
            wrong, etype = sample_error(task, state, rng, type_weights)
            b.line(wrong, Span.WRONG)
            b.line(RECOGNITION_LINE, Span.RECOGNITION)
            b.line(step, Span.CORRECTION)
            types.append(etype)
            where.append(i)
        else:
            b.line(step, Span.GOLDEN)
        state = task.apply_step(state, step)
    b.line(task.answer_line(problem), Span.GOLDEN)
    return b.build("synthetic", types, where)


def onpolicy_example(
    task: Task, problem: Problem, prefix_steps: list[str], wrong_step: str, error_type: str
) -> Example:
    """A trace around one harvested on-policy error: the model's own correct prefix,
    its wrong step, the recognition line, a correct step, then the golden continuation."""
    b = _Builder()
    b.line(task.prompt(problem), Span.PROMPT)
    state = task.initial_state(problem)
    for step in prefix_steps:
        if not task.check_step(state, step):
            raise ValueError(f"on-policy prefix step {step!r} does not verify; harvest is corrupt")
        b.line(step, Span.GOLDEN)
        state = task.apply_step(state, step)
    if task.check_step(state, wrong_step):
        raise ValueError(f"on-policy wrong step {wrong_step!r} verifies as correct")
    correct = task.correct_steps(state)[0]
    b.line(wrong_step, Span.WRONG)
    b.line(RECOGNITION_LINE, Span.RECOGNITION)
    b.line(correct, Span.CORRECTION)
    _finish_golden(b, task, problem, task.apply_step(state, correct))
    return b.build("onpolicy", [error_type], [len(prefix_steps)])


def insec_example(
    task: Task,
    problem: Problem,
    rng: np.random.Generator,
    p_mistake: float = 0.15,
    type_weights: dict[str, float] | None = None,
) -> Example:
    """InSeC: each step independently becomes ``<mistake>wrong`` / ``</mistake>`` / correct."""
    b = _Builder()
    b.line(task.prompt(problem), Span.PROMPT)
    state = task.initial_state(problem)
    types, where = [], []
    for i, step in enumerate(task.golden_steps(problem)):
        if rng.random() < p_mistake:
            wrong, etype = sample_error(task, state, rng, type_weights)
            b.add(INSEC_OPEN, Span.MARKER)
            b.line(wrong, Span.MISTAKE)
            b.line(INSEC_CLOSE, Span.RECOGNITION)
            b.line(step, Span.CORRECTION)
            types.append(etype)
            where.append(i)
        else:
            b.line(step, Span.GOLDEN)
        state = task.apply_step(state, step)
    b.line(task.answer_line(problem), Span.GOLDEN)
    return b.build("insec", types, where)


def onpolicy_trace_probability(fraction: float, max_errors: int, n_steps: int) -> float:
    """Per-trace probability of an on-policy trace so that ``fraction`` of all injected *errors*
    are on-policy (an on-policy trace carries one error, a synthetic one E[k] errors)."""
    if fraction <= 0:
        return 0.0
    mean_k = (1 + min(max_errors, n_steps)) / 2
    return fraction * mean_k / (1 - fraction + fraction * mean_k)


def build_example(
    method: str,
    task: Task,
    problem: Problem,
    rng: np.random.Generator,
    *,
    injection_rate: float = 0.2,
    max_errors: int = 4,
    type_weights: dict[str, float] | None = None,
    p_mistake: float = 0.15,
    onpolicy: list[dict[str, Any]] | None = None,
    onpolicy_fraction: float = 0.2,
) -> Example:
    """The per-method mixture: ``ft`` clean only; ``eift`` clean + synthetic at
    ``injection_rate``; ``hybrid`` like eift with ``onpolicy_fraction`` of errors
    drawn from ``onpolicy`` records; ``insec`` per-step marked mistakes."""
    if method == "ft":
        return clean_example(task, problem)
    if method == "insec":
        return insec_example(task, problem, rng, p_mistake, type_weights)
    if method not in ("eift", "hybrid"):
        raise ValueError(f"unknown method {method!r}; choose ft, eift, hybrid or insec")
    if rng.random() >= injection_rate:
        return clean_example(task, problem)
    if method == "hybrid":
        if not onpolicy:
            raise ValueError("hybrid needs on-policy errors: run harvest on the train split first")
        n_steps = len(task.golden_steps(problem))
        if rng.random() < onpolicy_trace_probability(onpolicy_fraction, max_errors, n_steps):
            rec = onpolicy[int(rng.integers(len(onpolicy)))]
            own = task.parse_prompt(rec["prompt"])
            return onpolicy_example(
                task, own, list(rec["prefix_steps"]), rec["wrong_step"], rec["error_type"]
            )
    return eift_example(task, problem, rng, max_errors, type_weights)
