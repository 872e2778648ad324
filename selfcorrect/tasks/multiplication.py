"""Long multiplication, one partial product or running sum per step (DESIGN 2.1).

    5678*1234
    5678*4=22712
    5678*30=170340
    22712+170340=193052
    ...
    ANSWER 7006652

Golden order: partial product of digit 0, then for each further digit i its
partial product and the running sum. A step is correct when its left-hand side
is the one this order calls for given the values written so far, and its
result is the true value of that left-hand side.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from selfcorrect.tasks.base import ANSWER_PREFIX, MalformedProblemError, Problem

_MUL = re.compile(r"^(\d+)\*(\d+)=(-?\d+)$")
_ADD = re.compile(r"^(-?\d+)\+(-?\d+)=(-?\d+)$")
_PROMPT = re.compile(r"^(\d+)\*(\d+)$")


@dataclass(frozen=True)
class MulState:
    """Position ``k`` in the golden order plus the values the trace has written so far."""

    a: int
    b: int
    k: int = 0
    acc: int = 0  # running sum as written
    last: int = 0  # last partial product as written

    @property
    def n_steps(self) -> int:
        return 2 * len(str(self.b)) - 1

    def expected_lhs(self) -> tuple[str, int, int]:
        """('mul', a, multiplier) or ('add', acc, last) for the step at position k."""
        if self.k == 0:
            return ("mul", self.a, int(str(self.b)[-1]))
        if self.k % 2 == 1:
            i = (self.k + 1) // 2
            digit = int(str(self.b)[::-1][i])
            return ("mul", self.a, digit * 10**i)
        return ("add", self.acc, self.last)


def _lhs_text(lhs: tuple[str, int, int]) -> str:
    op, x, y = lhs
    return f"{x}*{y}" if op == "mul" else f"{x}+{y}"


def _true_value(lhs: tuple[str, int, int]) -> int:
    op, x, y = lhs
    return x * y if op == "mul" else x + y


def _carries(lhs: tuple[str, int, int]) -> list[tuple[int, int]]:
    """(power of ten the carry lands in, carry value) for each column that produced a carry."""
    op, x, y = lhs
    out = []
    if op == "mul":
        # x * (d * 10^shift): column arithmetic of x * d, shifted.
        s = str(y)
        d, shift = int(s[0]), len(s) - 1
        carry = 0
        for j, ch in enumerate(reversed(str(x))):
            col = int(ch) * d + carry
            carry = col // 10
            if carry:
                out.append((j + 1 + shift, carry))
    else:
        if x < 0 or y < 0:
            return []
        xs, ys = str(x)[::-1], str(y)[::-1]
        carry = 0
        for j in range(max(len(xs), len(ys))):
            col = (int(xs[j]) if j < len(xs) else 0) + (int(ys[j]) if j < len(ys) else 0) + carry
            carry = col // 10
            if carry:
                out.append((j + 1, carry))
    return out


class Multiplication:
    """n-digit x m-digit long multiplication."""

    name = "multiplication"
    error_types = ("carry", "int_10", "int_100", "digit", "digit_close", "two_digits")

    def __init__(self, digits_a: int = 4, digits_b: int = 4):
        if digits_a < 1 or digits_b < 1:
            raise ValueError("multiplication.digits_a and digits_b must be >= 1")
        self.digits_a, self.digits_b = digits_a, digits_b

    # -- problems ---------------------------------------------------------
    def sample_problem(self, rng: np.random.Generator) -> Problem:
        a = int(rng.integers(10 ** (self.digits_a - 1), 10**self.digits_a))
        b = int(rng.integers(10 ** (self.digits_b - 1), 10**self.digits_b))
        return Problem(self.name, f"{a}*{b}", {"a": a, "b": b})

    def prompt(self, problem: Problem) -> str:
        return problem.key

    def parse_prompt(self, prompt: str) -> Problem:
        m = _PROMPT.match(prompt.strip())
        if not m:
            raise MalformedProblemError(
                f"multiplication prompt {prompt!r} is not of the form '<a>*<b>' with positive "
                "integers; fix the prompt (e.g. '5678*1234')"
            )
        a, b = int(m.group(1)), int(m.group(2))
        if a <= 0 or b <= 0 or str(a) != m.group(1) or str(b) != m.group(2):
            raise MalformedProblemError(
                f"multiplication prompt {prompt!r}: operands must be positive, without leading zeros"
            )
        return Problem(self.name, f"{a}*{b}", {"a": a, "b": b})

    def golden_steps(self, problem: Problem) -> list[str]:
        state, steps = self.initial_state(problem), []
        while not self.is_done(state):
            step = self.correct_steps(state)[0]
            steps.append(step)
            state = self.apply_step(state, step)
        return steps

    def answer_line(self, problem: Problem) -> str:
        return f"{ANSWER_PREFIX}{problem.data['a'] * problem.data['b']}"

    def check_answer(self, problem: Problem, line: str) -> bool:
        return line.strip() == self.answer_line(problem)

    # -- verifier ---------------------------------------------------------
    def initial_state(self, problem: Problem) -> MulState:
        return MulState(problem.data["a"], problem.data["b"])

    def _parse(self, step: str) -> tuple[tuple[str, int, int], int] | None:
        step = step.strip()
        if m := _MUL.match(step):
            return ("mul", int(m.group(1)), int(m.group(2))), int(m.group(3))
        if m := _ADD.match(step):
            return ("add", int(m.group(1)), int(m.group(2))), int(m.group(3))
        return None

    def check_step(self, state: MulState, step: str) -> bool:
        if self.is_done(state):
            return False
        parsed = self._parse(step)
        lhs = state.expected_lhs()
        return (
            parsed is not None
            and parsed[0] == lhs
            and step.strip() == f"{_lhs_text(lhs)}={_true_value(lhs)}"
        )

    def apply_step(self, state: MulState, step: str) -> MulState:
        """Advance with the written result when the step has the expected left-hand side."""
        parsed = self._parse(step)
        if self.is_done(state) or parsed is None or parsed[0] != state.expected_lhs():
            return state
        (op, _, _), value = parsed
        k = state.k + 1
        if op == "add":
            return MulState(state.a, state.b, k, acc=value, last=state.last)
        if state.k == 0:
            return MulState(state.a, state.b, k, acc=value, last=value)
        return MulState(state.a, state.b, k, acc=state.acc, last=value)

    def correct_steps(self, state: MulState) -> list[str]:
        if self.is_done(state):
            return []
        lhs = state.expected_lhs()
        return [f"{_lhs_text(lhs)}={_true_value(lhs)}"]

    def is_done(self, state: MulState) -> bool:
        return state.k >= state.n_steps

    # -- synthetic errors -------------------------------------------------
    # Codes are the written result: the left-hand side is fixed by the state.
    def encode_step(self, state: MulState, step: str) -> int | None:
        parsed = self._parse(step)
        if self.is_done(state) or parsed is None or parsed[0] != state.expected_lhs():
            return None
        lhs = state.expected_lhs()
        # Leading zeros ("5678*4=022712") are not something any injector writes.
        if step.strip() != f"{_lhs_text(lhs)}={parsed[1]}":
            return None
        return parsed[1]

    def decode_step(self, state: MulState, code: int) -> str:
        return f"{_lhs_text(state.expected_lhs())}={int(code)}"

    def applicable_types(self, state: MulState) -> set[str]:
        """The types whose ``type_distributions`` entry is non-empty, without enumerating them:
        the training stream asks at every step of every trace, and the enumeration was ~8% of
        a multiplication EIFT step."""
        if self.is_done(state):
            return set()
        lhs = state.expected_lhs()
        t = _true_value(lhs)
        out = {"int_10", "int_100"} | ({"carry"} if _carries(lhs) else set())
        if t >= 0:  # every digit has another value and a close one; pairs need two digits
            out |= {"digit", "digit_close"} | ({"two_digits"} if t >= 10 else set())
        return out

    def type_distributions(self, state: MulState) -> dict[str, dict[int, float]]:
        """Exact distribution of each injector over results, by enumeration."""
        if self.is_done(state):
            return {t: {} for t in self.error_types}
        lhs = state.expected_lhs()
        t = _true_value(lhs)
        s = str(t)
        L = len(s)
        out: dict[str, dict[int, float]] = {}

        carry = [t - c * 10**p for p, c in _carries(lhs)] + [t + 10**p for p, _ in _carries(lhs)]
        out["carry"] = _uniform(carry)
        out["int_10"] = _uniform([t + d for d in range(-10, 11) if d])
        out["int_100"] = _uniform([t + d for d in range(-100, 101) if d])
        if t < 0:  # only reachable after the trace committed a wrong negative value
            out.update(digit={}, digit_close={}, two_digits={})
            return out

        # Replacing digits of s changes t by (new - old) * place: integer arithmetic, the same
        # results as rebuilding the string (this runs for every step of every training trace).
        place = [10 ** (L - 1 - p) for p in range(L)]
        digit: dict[int, float] = defaultdict(float)
        for pos in range(L):
            opts, old = _digit_options(s, pos), int(s[pos])
            for new in opts:
                digit[t + (new - old) * place[pos]] += 1 / L / len(opts)
        out["digit"] = dict(digit)

        close: dict[int, float] = defaultdict(float)
        close_pos = [p for p in range(L) if _close_options(s, p)]
        for pos in close_pos:
            opts, old = _close_options(s, pos), int(s[pos])
            for new in opts:
                close[t + (new - old) * place[pos]] += 1 / len(close_pos) / len(opts)
        out["digit_close"] = dict(close)

        two: dict[int, float] = defaultdict(float)
        if L >= 2:
            for pos in range(L - 1):
                old = int(s[pos : pos + 2])
                opts = [x for x in range(100) if x != old and not (pos == 0 and x < 10)]
                for x in opts:
                    two[t + (x - old) * place[pos + 1]] += 1 / (L - 1) / len(opts)
        out["two_digits"] = dict(two)
        return out

    def sample_error_of_type(self, state: MulState, etype: str, rng: np.random.Generator) -> str:
        """Readable one-sample injector: the reference the vectorised sampler is tested against."""
        lhs = state.expected_lhs()
        t = _true_value(lhs)
        s = str(t)
        if etype == "carry":
            options = [t - c * 10**p for p, c in _carries(lhs)] + [
                t + 10**p for p, _ in _carries(lhs)
            ]
            value = options[int(rng.integers(len(options)))]
        elif etype in ("int_10", "int_100"):
            bound = 10 if etype == "int_10" else 100
            value = t
            while value == t:  # a sample equal to the correct step is redrawn
                value = t + int(rng.integers(-bound, bound + 1))
        elif etype == "digit":
            pos = int(rng.integers(len(s)))
            new = s[pos]
            while new == s[pos] or (pos == 0 and len(s) > 1 and new == "0"):
                new = str(int(rng.integers(10)))
            value = _replace(s, pos, new)
        elif etype == "digit_close":
            positions = [p for p in range(len(s)) if _close_options(s, p)]
            pos = positions[int(rng.integers(len(positions)))]
            opts = _close_options(s, pos)
            value = _replace(s, pos, str(opts[int(rng.integers(len(opts)))]))
        elif etype == "two_digits":
            pos = int(rng.integers(len(s) - 1))
            pair = s[pos : pos + 2]
            while pair == s[pos : pos + 2] or (pos == 0 and pair[0] == "0"):
                pair = f"{int(rng.integers(10))}{int(rng.integers(10))}"
            value = _replace(s, pos, pair)
        else:
            raise ValueError(f"unknown multiplication error type {etype!r}")
        return f"{_lhs_text(lhs)}={value}"

    def sample_codes_of_type(
        self, state: MulState, etype: str, n: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Vectorised injector: ``n`` wrong results of one type, as int64."""
        lhs = state.expected_lhs()
        t = _true_value(lhs)
        s = str(t)
        L = len(s)
        if etype == "carry":
            opts = np.array(
                [t - c * 10**p for p, c in _carries(lhs)] + [t + 10**p for p, _ in _carries(lhs)],
                dtype=np.int64,
            )
            return opts[rng.integers(0, len(opts), n)]
        if etype in ("int_10", "int_100"):
            bound = 10 if etype == "int_10" else 100
            d = rng.integers(0, 2 * bound, n)
            return t + np.where(d < bound, d - bound, d - bound + 1).astype(np.int64)
        digits = np.array([int(c) for c in s], dtype=np.int64)
        place = 10 ** np.arange(L - 1, -1, -1, dtype=np.int64)  # place value of each position
        if etype == "digit":
            pos = rng.integers(0, L, n)
            old = digits[pos]
            lead = (pos == 0) & (L > 1)
            # Choose among the allowed digits by index, skipping the old digit (and 0 when leading).
            k = np.where(lead, 8, 9)
            idx = (rng.random(n) * k).astype(np.int64)
            new = idx + lead  # candidates start at 1 when leading
            new = new + (new >= old)  # skip the old digit
            return t + (new - old) * place[pos]
        if etype == "digit_close":
            table = [(p, _close_options(s, p)) for p in range(L) if _close_options(s, p)]
            which = rng.integers(0, len(table), n)
            out = np.empty(n, dtype=np.int64)
            for j, (p, opts) in enumerate(table):
                sel = which == j
                new = np.array(opts, dtype=np.int64)[rng.integers(0, len(opts), int(sel.sum()))]
                out[sel] = t + (new - digits[p]) * place[p]
            return out
        if etype == "two_digits":
            pos = rng.integers(0, L - 1, n)
            old = digits[pos] * 10 + digits[pos + 1]
            lead = pos == 0
            # pairs 00..99 minus the old pair, minus pairs with a leading 0 at position 0
            k = np.where(lead, 89, 99)
            idx = (rng.random(n) * k).astype(np.int64)
            new = idx + 10 * lead  # skip 00..09 when leading
            new = new + (new >= old)
            return t + (new - old) * place[pos + 1]
        raise ValueError(f"unknown multiplication error type {etype!r}")


def _uniform(values: list[int]) -> dict[int, float]:
    out: dict[int, float] = defaultdict(float)
    for v in values:
        out[v] += 1 / len(values)
    return dict(out)


def _replace(s: str, pos: int, new: str) -> int:
    return int(s[:pos] + new + s[pos + len(new) :])


def _digit_options(s: str, pos: int) -> list[int]:
    lo = 1 if (pos == 0 and len(s) > 1) else 0
    return [d for d in range(lo, 10) if d != int(s[pos])]


def _close_options(s: str, pos: int) -> list[int]:
    lo = 1 if (pos == 0 and len(s) > 1) else 0
    d = int(s[pos])
    return [d + k for k in (-2, -1, 1, 2) if lo <= d + k <= 9]


def _pair_options(s: str, pos: int) -> list[str]:
    old = s[pos : pos + 2]
    return [f"{x:02d}" for x in range(100) if f"{x:02d}" != old and not (pos == 0 and x < 10)]
