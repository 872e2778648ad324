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
    ANSWER_PREFIX,
    INSEC_CLOSE,
    RECOGNITION_LINE,
    Problem,
    Task,
    applicable_weights,
    sample_error,
)


class Span(IntEnum):
    """What a character is, for the loss. Values are stable: they are stored in Parquet."""

    PROMPT = 0  # weight 0
    GOLDEN = 1  # weight 1
    WRONG = 2  # weight 0: the model sees it but is never trained to produce it
    RECOGNITION = 3  # weight w_recognition
    CORRECTION = 4  # weight w_correction
    MARKER = 5  # unused since InSeC lost its opening tag; kept so stored values stay stable
    MISTAKE = 6  # where an InSeC mistake departs from every correct step: 0 or unlikelihood
    DECISION = 7  # the recognition line's first characters: the decision to flag an error


def decision_length(signal: str) -> int:
    """Characters of a recognition signal that make the decision to emit it.

    The signal's characters up to and including the first one that differs from the answer
    line's prefix: ``AH`` of ``AH! I MADE A MISTAKE.`` (``A`` alone could still be the
    ``ANSWER`` line), ``<`` of ``</mistake>``. Every later character is forced.
    """
    k = 0
    while k < min(len(signal), len(ANSWER_PREFIX)) and signal[k] == ANSWER_PREFIX[k]:
        k += 1
    return min(k + 1, len(signal))


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

    def recognition(self, signal: str) -> None:
        """A recognition line: its decision characters, then the forced rest."""
        k = decision_length(signal)
        self.add(signal[:k], Span.DECISION)
        self.add(signal[k:] + "\n", Span.RECOGNITION)

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


def _injectable(task: Task, problem: Problem, type_weights: dict[str, float] | None) -> list[int]:
    """Golden step positions where some allowed error type applies (the eval's positions)."""
    state, ok = task.initial_state(problem), []
    for i, step in enumerate(task.golden_steps(problem)):
        if applicable_weights(task, state, type_weights):
            ok.append(i)
        state = task.apply_step(state, step)
    return ok


def _with_errors(
    task: Task,
    problem: Problem,
    positions: set[int],
    rng: np.random.Generator,
    type_weights: dict[str, float] | None,
) -> Example:
    """The golden trace with a synthetic error at each of ``positions``: wrong, recognition,
    correct."""
    b = _Builder()
    b.line(task.prompt(problem), Span.PROMPT)
    state = task.initial_state(problem)
    types, where = [], []
    for i, step in enumerate(task.golden_steps(problem)):
        if i in positions:
            wrong, etype = sample_error(task, state, rng, type_weights)
            b.line(wrong, Span.WRONG)
            b.recognition(RECOGNITION_LINE)
            b.line(step, Span.CORRECTION)
            types.append(etype)
            where.append(i)
        else:
            b.line(step, Span.GOLDEN)
        state = task.apply_step(state, step)
    b.line(task.answer_line(problem), Span.GOLDEN)
    return b.build("synthetic" if types else "clean", types, where)


def eift_example(
    task: Task,
    problem: Problem,
    rng: np.random.Generator,
    max_errors: int = 4,
    type_weights: dict[str, float] | None = None,
) -> Example:
    """Golden trace with 1..max_errors synthetic errors, each as: wrong, recognition, correct.

    Errors per trace are uniform over 1..min(max_errors, n); positions are uniform
    without replacement over the n steps where some allowed error type applies (the
    eval's synthetic items use the same positions), so restrictive ``type_weights``
    never fail; a trace with no such step stays clean.
    """
    ok = _injectable(task, problem, type_weights)
    if not ok:
        return clean_example(task, problem)
    k = int(rng.integers(1, min(max_errors, len(ok)) + 1))
    positions = {ok[j] for j in rng.choice(len(ok), size=k, replace=False).tolist()}
    return _with_errors(task, problem, positions, rng, type_weights)


def step_error_example(
    task: Task,
    problem: Problem,
    rng: np.random.Generator,
    rate: float,
    type_weights: dict[str, float] | None = None,
    last_step_rate: float | None = None,
) -> Example:
    """``error_placement: step``: every step where an allowed type applies is, independently,
    a synthetic error with probability ``rate`` (the trace's last step with
    ``last_step_rate`` when given).

    Why: with whole traces injected (1..max_errors errors in a share of traces), whether a
    step is wrong depends on the rest of the trace (errors come in clusters; a clean prefix
    makes an error less likely), and a model learns that trace-level prior instead of
    checking the step. Independent steps leave only the step itself to decide on, as at a
    model's own error or an eval item (a clean prefix, then one error).
    """
    last = len(task.golden_steps(problem)) - 1
    p_last = rate if last_step_rate is None else last_step_rate
    positions = {
        i
        for i in _injectable(task, problem, type_weights)
        if rng.random() < (p_last if i == last else rate)
    }
    return _with_errors(task, problem, positions, rng, type_weights)


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
    b.recognition(RECOGNITION_LINE)
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
    """InSeC: each step where an allowed error type applies independently becomes, with
    probability ``p_mistake``: the unmarked wrong step / ``</mistake>`` / the correct step.

    Format. The InSeC paper marks a mistake and trains the model on the mistake's
    correction, with the mistake itself masked or a negative example (unlikelihood).
    The signal the model learns to write is the closing marker after a wrong step; an
    opening marker before it would have to be written *before* the mistake, i.e. the model
    would plan it (and with weight 0 it is never learned, so at eval, on a wrong step the
    model did not plan, nothing would open). So the wrong step is written unmarked, as the
    model's own errors are, and ``</mistake>`` is the trained recognition signal.

    Loss on the wrong step: weight 0 everywhere; with ``mistake_loss: unlikelihood`` the
    one character where it departs from every correct step (``Span.MISTAKE``) is pushed
    down, never the shared left-hand side or leading digits.
    """
    b = _Builder()
    b.line(task.prompt(problem), Span.PROMPT)
    state = task.initial_state(problem)
    types, where = [], []
    for i, step in enumerate(task.golden_steps(problem)):
        if applicable_weights(task, state, type_weights) and rng.random() < p_mistake:
            wrong, etype = sample_error(task, state, rng, type_weights)
            d = departure(wrong, task.correct_steps(state))
            b.add(wrong[:d], Span.WRONG)
            b.add((wrong + "\n")[d], Span.MISTAKE)
            b.add((wrong + "\n")[d + 1 :], Span.WRONG)
            b.recognition(INSEC_CLOSE)
            b.line(step, Span.CORRECTION)
            types.append(etype)
            where.append(i)
        else:
            b.line(step, Span.GOLDEN)
        state = task.apply_step(state, step)
    b.line(task.answer_line(problem), Span.GOLDEN)
    return b.build("insec", types, where)


def departure(wrong: str, correct: list[str]) -> int:
    """Index of the first character of ``wrong + newline`` that no correct step shares."""
    line = wrong + "\n"
    best = 0
    for c in correct:
        c = c + "\n"
        k = 0
        while k < min(len(line), len(c)) and line[k] == c[k]:
            k += 1
        best = max(best, k)
    return min(best, len(line) - 1)


def onpolicy_trace_probability(fraction: float, mean_errors: float) -> float:
    """Per-trace probability of an on-policy trace so that ``fraction`` of all injected *errors*
    are on-policy (an on-policy trace carries one error, a synthetic one ``mean_errors``)."""
    if fraction <= 0:
        return 0.0
    return fraction * mean_errors / (1 - fraction + fraction * mean_errors)


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
    error_placement: str = "trace",
    last_step_rate: float | None = None,
) -> Example:
    """The per-method mixture: ``ft`` clean only; ``eift`` clean + synthetic at
    ``injection_rate``; ``hybrid`` like eift with ``onpolicy_fraction`` of errors
    drawn from ``onpolicy`` records; ``insec`` per-step marked mistakes.

    ``error_placement``: ``trace`` (DESIGN 3: ``injection_rate`` of the traces carry
    1..max_errors errors) or ``step`` (each step is an error with probability
    ``injection_rate``; ``step_error_example``)."""
    if method == "ft":
        return clean_example(task, problem)
    if method == "insec":
        return insec_example(task, problem, rng, p_mistake, type_weights)
    if method not in ("eift", "hybrid"):
        raise ValueError(f"unknown method {method!r}; choose ft, eift, hybrid or insec")
    if error_placement not in ("trace", "step"):
        raise ValueError(f"error_placement={error_placement!r}; choose trace or step")
    per_step = error_placement == "step"
    if not per_step and rng.random() >= injection_rate:
        return clean_example(task, problem)
    if method == "hybrid":
        if not onpolicy:
            raise ValueError("hybrid needs on-policy errors: run harvest on the train split first")
        n_steps = len(task.golden_steps(problem))
        if per_step:
            mean_errors = injection_rate * (n_steps - 1) + (
                injection_rate if last_step_rate is None else last_step_rate
            )
        else:
            mean_errors = (1 + min(max_errors, n_steps)) / 2
        if rng.random() < onpolicy_trace_probability(onpolicy_fraction, mean_errors):
            rec = onpolicy[int(rng.integers(len(onpolicy)))]
            own = task.parse_prompt(rec["prompt"])
            return onpolicy_example(
                task, own, list(rec["prefix_steps"]), rec["wrong_step"], rec["error_type"]
            )
    if per_step:
        return step_error_example(task, problem, rng, injection_rate, type_weights, last_step_rate)
    return eift_example(task, problem, rng, max_errors, type_weights)
