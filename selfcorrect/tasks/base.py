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


def applicable_types(task: Task, state: Any) -> set[str]:
    """The error types that can produce a wrong step at ``state``: those whose
    ``type_distributions`` entry is non-empty.

    A task may define ``applicable_types(state)`` itself, to answer without enumerating every
    injector's outcomes (the training stream asks at every step of every trace); it must
    give the same set (multiplication's is tested against the enumeration).
    """
    own = getattr(task, "applicable_types", None)
    if own is not None:
        return own(state)
    return {t for t, dist in task.type_distributions(state).items() if dist}


def applicable_weights(
    task: Task, state: Any, weights: dict[str, float] | None = None
) -> dict[str, float]:
    """Type weights renormalised over the types that can produce an error at ``state``."""
    types = applicable_types(task, state)
    raw = {t: (1.0 if weights is None else float(weights.get(t, 0.0))) for t in task.error_types}
    live = {t: w for t, w in raw.items() if w > 0 and t in types}
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
#
# One set of rules, used by harvest, eval and the generation engine's stopping rule
# alike, and by GRPO rewards through ``walk_trace`` / ``final_answer_correct`` (issue 20):
#
# * A line is complete when it ends in a newline (every trained line does, the answer
#   line included). An unterminated last line is a cut made by the token cap, not a line
#   the model chose to write: it is dropped, so it is never an error nor a correct step.
#   Only an unterminated ANSWER line is kept: a premature answer is wrong whatever its
#   value, and a final answer cut short is not the right answer.
# * An ANSWER line written before the work is done is a wrong step, one the model can
#   recognise like any other: a recognition line right after an ANSWER line retracts it.
#   The trace's answer is its first ANSWER line that is not retracted; the trace ends
#   there, and nothing after it is read.
# ---------------------------------------------------------------------------


def clean_line(raw: str) -> str:
    """One raw line of generated text as it is judged: InSeC open tags removed, stripped."""
    return raw.replace("\r", "").replace(INSEC_OPEN, "").strip()


def split_lines(text: str) -> list[str]:
    """Generated text -> stripped non-empty lines, InSeC open tags removed. Never raises."""
    out = []
    for raw in text.split("\n"):
        line = clean_line(raw)
        if line:
            out.append(line)
    return out


def is_recognition(line: str) -> bool:
    """The EIFT recognition line or the InSeC closing marker on its own line."""
    return line.strip() in (RECOGNITION_LINE, INSEC_CLOSE)


def step_target(step: str) -> str:
    """What a step writes to: the text before its ``=`` (a sudoku cell, a multiplication
    partial product or sum). Two steps with one target differ only in the value written."""
    return step.split("=", 1)[0].strip()


def signal_line(method: str) -> str:
    """The line a model trained by ``method`` writes to flag an error: InSeC's closing
    marker, every other method's recognition line (FT and GRPO are never taught one)."""
    return INSEC_CLOSE if method == "insec" else RECOGNITION_LINE


def is_answer(line: str) -> bool:
    """An ``ANSWER ...`` line (judged after ``clean_line``)."""
    return line.strip().startswith(ANSWER_PREFIX.strip())


def complete_lines(text: str) -> list[str]:
    """The lines of a generation that the model finished: ``split_lines`` without a last
    line cut off by the token cap (an unterminated tail), unless that tail is an ANSWER line.
    """
    lines = split_lines(text)
    if lines and not text.rstrip(" \t\r").endswith("\n") and not is_answer(lines[-1]):
        lines = lines[:-1]
    return lines


def answer_index(lines: list[str]) -> int | None:
    """Index of the trace's answer: its first ANSWER line not retracted by a recognition
    line right after it (None when the trace has none)."""
    for i, line in enumerate(lines):
        if is_answer(line) and not (i + 1 < len(lines) and is_recognition(lines[i + 1])):
            return i
    return None


def trace_end(text: str) -> int | None:
    """End (after its newline) of the trace's answer line in ``text``, once it is known to
    stand: when the next complete line after it is not a recognition line. None before that.

    ``text`` must start at the beginning of a line. This is the generation engine's
    stopping rule: a row stops there, and what follows is cut.
    """
    pending: int | None = None  # end of the last complete line, when it is an ANSWER line
    pos = 0
    while True:
        nl = text.find("\n", pos)
        if nl < 0:
            return None
        line = clean_line(text[pos:nl])
        pos = nl + 1
        if not line:
            continue
        if pending is not None and not is_recognition(line):
            return pending
        pending = pos if is_answer(line) else None


@dataclass
class LineEvent:
    """One generated line, judged against the state it was produced in."""

    index: int
    line: str
    kind: str  # "step_ok" | "step_wrong" (a premature ANSWER too) | "recognition" | "answer"
    state_before: Any


def walk_trace(
    task: Task, problem: Problem, lines: list[str], state: Any = None
) -> list[LineEvent]:
    """Judge each line of a continuation in order, tracking the state as the model commits.

    A wrong step that the model goes on from is applied (the model now lives in
    that state); a recognition line retracts the line before it. Malformed lines
    are wrong steps that leave the state unchanged. An ANSWER line is ``answer``
    when the work is done and ``step_wrong`` (a premature answer) when it is not;
    either leaves the state unchanged. The walk stops after the trace's answer (the
    first ANSWER line not retracted, see ``answer_index``).
    """
    state = task.initial_state(problem) if state is None else state
    history: list[Any] = []
    events: list[LineEvent] = []
    for i, line in enumerate(lines):
        if is_answer(line):
            kind = "answer" if task.is_done(state) else "step_wrong"
            events.append(LineEvent(i, line, kind, state))
            if i + 1 < len(lines) and is_recognition(lines[i + 1]):
                history.append(state)  # retracted next: back to this same state
                continue
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
    """True when the trace's answer (``answer_index`` over ``complete_lines``) is right."""
    lines = complete_lines(text)
    i = answer_index(lines)
    return i is not None and task.check_answer(problem, lines[i])
