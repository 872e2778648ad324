"""The one interface every task implements, plus the task-agnostic pieces built on it.

A task knows how to: sample a problem from a seed, render its golden chain of
thought as steps, check one step against the current state, apply a step, check
the final answer, and inject / classify / score synthetic errors. Everything
else in the project (data, harvest, coverage, GRPO rewards, eval) goes through
this interface, so the verifier is the single source of truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

RECOGNITION_LINE = "AH! I MADE A MISTAKE."
INSEC_OPEN = "<mistake>"
INSEC_CLOSE = "</mistake>"
ANSWER_PREFIX = "ANSWER "
OTHER = "other"


class MalformedProblemError(ValueError):
    """A prompt or problem that does not describe a valid instance of the task."""


@dataclass(frozen=True)
class Problem:
    """One task instance. ``key`` is a canonical string used for dedup and train/test split."""

    task: str
    key: str
    data: dict[str, Any] = field(hash=False, compare=False)


@runtime_checkable
class Task(Protocol):
    """The small interface each task module implements (see multiplication.py, sudoku.py)."""

    name: str
    error_types: tuple[str, ...]

    def sample_problem(self, rng: np.random.Generator) -> Problem: ...
    def prompt(self, problem: Problem) -> str: ...
    def parse_prompt(self, prompt: str) -> Problem: ...
    def golden_steps(self, problem: Problem) -> list[str]: ...
    def answer_line(self, problem: Problem) -> str: ...
    def check_answer(self, problem: Problem, line: str) -> bool: ...

    def initial_state(self, problem: Problem) -> Any: ...
    def check_step(self, state: Any, step: str) -> bool: ...
    def apply_step(self, state: Any, step: str) -> Any: ...
    def correct_steps(self, state: Any) -> list[str]: ...
    def is_done(self, state: Any) -> bool: ...

    # synthetic errors
    def type_distributions(self, state: Any) -> dict[str, dict[int, float]]: ...
    def sample_error_of_type(self, state: Any, etype: str, rng: np.random.Generator) -> str: ...
    def sample_codes_of_type(
        self, state: Any, etype: str, n: int, rng: np.random.Generator
    ) -> np.ndarray: ...
    def encode_step(self, state: Any, step: str) -> int | None: ...
    def decode_step(self, state: Any, code: int) -> str: ...


# ---------------------------------------------------------------------------
# Error mixture over types: shared by every task.
# ---------------------------------------------------------------------------


def applicable_weights(
    task: Task, state: Any, weights: dict[str, float] | None = None
) -> dict[str, float]:
    """Type weights renormalised over the types that can produce an error at ``state``."""
    dists = task.type_distributions(state)
    raw = {t: (1.0 if weights is None else float(weights.get(t, 0.0))) for t in task.error_types}
    live = {t: w for t, w in raw.items() if w > 0 and dists.get(t)}
    total = sum(live.values())
    if total == 0:
        return {}
    return {t: w / total for t, w in live.items()}


def sample_error(
    task: Task, state: Any, rng: np.random.Generator, weights: dict[str, float] | None = None
) -> tuple[str, str]:
    """Draw one synthetic wrong step at ``state``: pick a type by weight, then the step.

    Returns ``(step, error_type)``. Raises ValueError if no type applies here.
    """
    w = applicable_weights(task, state, weights)
    if not w:
        raise ValueError(f"no synthetic error type applies at this {task.name} state")
    types = list(w)
    etype = types[int(rng.choice(len(types), p=np.array([w[t] for t in types])))]
    return task.sample_error_of_type(state, etype, rng), etype


def sample_errors(
    task: Task,
    state: Any,
    n: int,
    rng: np.random.Generator,
    weights: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised: ``n`` synthetic errors at one state as (codes int64[n], type_index int16[n]).

    Codes are the task's step encoding (``encode_step``); type indices index
    ``task.error_types``. This is what coverage calls 10,000 times per error.
    """
    w = applicable_weights(task, state, weights)
    codes = np.empty(n, dtype=np.int64)
    tidx = np.full(n, -1, dtype=np.int16)
    if not w:
        return codes[:0], tidx[:0]
    types = list(w)
    counts = rng.multinomial(n, [w[t] for t in types])
    start = 0
    for t, c in zip(types, counts, strict=True):
        if c:
            codes[start : start + c] = task.sample_codes_of_type(state, t, int(c), rng)
            tidx[start : start + c] = task.error_types.index(t)
            start += c
    perm = rng.permutation(n)
    return codes[perm], tidx[perm]


def error_probability(
    task: Task, state: Any, step: str, weights: dict[str, float] | None = None
) -> float | None:
    """Exact probability that the injector produces ``step`` at ``state`` (None if not encodable)."""
    code = task.encode_step(state, step)
    if code is None:
        return 0.0
    w = applicable_weights(task, state, weights)
    dists = task.type_distributions(state)
    return float(sum(w[t] * dists[t].get(code, 0.0) for t in w))


def classify_error(task: Task, state: Any, step: str) -> str:
    """Map any wrong step to the taxonomy type most likely to have produced it, else ``other``.

    Types may overlap (a +5 shift is both ``int_10`` and ``int_100``); the
    maximum-likelihood type under uniform type weights is returned, ties broken
    by taxonomy order. ``possible_types`` gives the full set.
    """
    types = possible_types(task, state, step)
    if not types:
        return OTHER
    return max(types, key=lambda t: (types[t], -task.error_types.index(t)))


def possible_types(task: Task, state: Any, step: str) -> dict[str, float]:
    """Every taxonomy type that could produce ``step`` here, with its per-type probability."""
    if task.check_step(state, step):
        return {}
    code = task.encode_step(state, step)
    if code is None:
        return {}
    dists = task.type_distributions(state)
    return {t: dists[t][code] for t in task.error_types if dists.get(t, {}).get(code, 0.0) > 0}


# ---------------------------------------------------------------------------
# Reading generated text back.
# ---------------------------------------------------------------------------


def split_lines(text: str) -> list[str]:
    """Generated text -> stripped non-empty lines, InSeC open tags removed. Never raises."""
    out = []
    for raw in text.replace("\r", "").split("\n"):
        line = raw.replace(INSEC_OPEN, "").strip()
        if line:
            out.append(line)
    return out


def is_recognition(line: str) -> bool:
    """The EIFT recognition line or the InSeC closing marker on its own line."""
    return line.strip() in (RECOGNITION_LINE, INSEC_CLOSE)


@dataclass
class LineEvent:
    """One generated line, judged against the state it was produced in."""

    index: int
    line: str
    kind: str  # "step_ok" | "step_wrong" | "recognition" | "answer"
    state_before: Any


def walk_trace(
    task: Task, problem: Problem, lines: list[str], state: Any = None
) -> list[LineEvent]:
    """Judge each line of a continuation in order, tracking the state as the model commits.

    A wrong step that the model goes on from is applied (the model now lives in
    that state); a recognition line retracts the step before it. Malformed lines
    are wrong steps that leave the state unchanged. Stops after the answer line.
    """
    state = task.initial_state(problem) if state is None else state
    history: list[Any] = []
    events: list[LineEvent] = []
    for i, line in enumerate(lines):
        if line.startswith(ANSWER_PREFIX.strip()):
            events.append(LineEvent(i, line, "answer", state))
            break
        if is_recognition(line):
            events.append(LineEvent(i, line, "recognition", state))
            if history:
                state = history.pop()
            continue
        ok = task.check_step(state, line)
        events.append(LineEvent(i, line, "step_ok" if ok else "step_wrong", state))
        history.append(state)
        state = task.apply_step(state, line)
    return events


def final_answer_correct(task: Task, problem: Problem, text: str) -> bool:
    """True when the first ANSWER line of ``text`` is the right answer."""
    for line in split_lines(text):
        if line.startswith(ANSWER_PREFIX.strip()):
            return task.check_answer(problem, line)
    return False
