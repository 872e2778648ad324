"""4x4 Sudoku (2x2 boxes) solvable by naked singles alone (DESIGN 2.2).

    1... .4.2 2.4. .3.1
    r1c2=2
    ...
    ANSWER 1234 3412 2143 4321

A step places one digit. It is correct when the cell is empty and has exactly
one candidate in the current grid, and the step places that candidate. Any
naked single is accepted; the golden trace takes the first in row-major order.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

from selfcorrect.tasks.base import ANSWER_PREFIX, MalformedProblemError, Problem

N = 4
_STEP = re.compile(r"^r([1-4])c([1-4])=([1-4])$")
_PROMPT = re.compile(r"^([1-4.]{4}) ([1-4.]{4}) ([1-4.]{4}) ([1-4.]{4})$")

# Cells sharing a row, column or box with each cell (precomputed once).
_PEERS = [
    sorted(
        (
            {r * N + c2 for c2 in range(N)}
            | {r2 * N + c for r2 in range(N)}
            | {(r // 2 * 2 + dr) * N + (c // 2 * 2 + dc) for dr in range(2) for dc in range(2)}
        )
        - {r * N + c}
    )
    for r in range(N)
    for c in range(N)
]

Grid = tuple[int, ...]  # 16 cells, row-major, 0 = empty


def candidates(grid: Grid, cell: int) -> list[int]:
    """Digits not yet used by any peer of ``cell``."""
    used = {grid[p] for p in _PEERS[cell]}
    return [d for d in range(1, N + 1) if d not in used]


def naked_singles(grid: Grid) -> list[tuple[int, int]]:
    """(cell, digit) for every empty cell with exactly one candidate, row-major."""
    out = []
    for cell in range(N * N):
        if grid[cell] == 0:
            cand = candidates(grid, cell)
            if len(cand) == 1:
                out.append((cell, cand[0]))
    return out


def solve_by_singles(grid: Grid) -> Grid | None:
    """Fill by naked singles only; None if they get stuck before the grid is full."""
    g = list(grid)
    while 0 in g:
        singles = naked_singles(tuple(g))
        if not singles:
            return None
        cell, d = singles[0]
        g[cell] = d
    return tuple(g)


def is_valid_solution(grid: Grid) -> bool:
    return 0 not in grid and all(grid[p] != grid[c] for c in range(N * N) for p in _PEERS[c])


def render_grid(grid: Grid) -> str:
    return " ".join(
        "".join(str(d) if d else "." for d in grid[r * N : (r + 1) * N]) for r in range(N)
    )


def _step(cell: int, digit: int) -> str:
    return f"r{cell // N + 1}c{cell % N + 1}={digit}"


_BASE = (1, 2, 3, 4, 3, 4, 1, 2, 2, 1, 4, 3, 4, 3, 2, 1)


class Sudoku:
    """4x4 naked-singles Sudoku."""

    name = "sudoku"
    error_types = ("invalid", "non_naked_single")

    def __init__(self, min_empty: int = 6, max_empty: int = 12, next_cell_share: float = 0.0):
        if not 1 <= min_empty <= max_empty <= 16:
            raise ValueError("sudoku needs 1 <= min_empty <= max_empty <= 16")
        if not 0.0 <= next_cell_share <= 1.0:
            raise ValueError("sudoku next_cell_share must be in [0, 1]")
        self.min_empty, self.max_empty = min_empty, max_empty
        # The share of ``invalid`` errors placed in the cell the golden trace fills next (only
        # the digit is wrong), the rest in a uniformly random empty cell. At 0 (the paper's
        # injector) a model can flag an unexpected *cell* without checking the digit.
        self.next_cell_share = float(next_cell_share)

    # -- problems ---------------------------------------------------------
    def _random_solution(self, rng: np.random.Generator) -> Grid:
        """A random valid grid: a base grid under random digit, row, column and transpose symmetries."""
        digits = rng.permutation(N) + 1
        bands = rng.permutation(2)
        rows = [b * 2 + r for b in bands for r in rng.permutation(2)]
        stacks = rng.permutation(2)
        cols = [s * 2 + c for s in stacks for c in rng.permutation(2)]
        g = [digits[_BASE[rows[r] * N + cols[c]] - 1] for r in range(N) for c in range(N)]
        if rng.integers(2):
            g = [g[c * N + r] for r in range(N) for c in range(N)]
        return tuple(int(x) for x in g)

    def sample_problem(self, rng: np.random.Generator) -> Problem:
        solution = self._random_solution(rng)
        target = int(rng.integers(self.min_empty, self.max_empty + 1))
        while True:
            puzzle = list(solution)
            for cell in rng.permutation(N * N):
                if sum(1 for d in puzzle if d == 0) >= target:
                    break
                keep = puzzle[cell]
                puzzle[cell] = 0
                if solve_by_singles(tuple(puzzle)) is None:
                    puzzle[cell] = keep
            if sum(1 for d in puzzle if d == 0) >= self.min_empty:
                break
        grid = tuple(puzzle)
        return Problem(self.name, render_grid(grid), {"grid": grid, "solution": solution})

    def prompt(self, problem: Problem) -> str:
        return problem.key

    def parse_prompt(self, prompt: str) -> Problem:
        m = _PROMPT.match(prompt.strip())
        if not m:
            raise MalformedProblemError(
                f"sudoku prompt {prompt!r} is not four space-separated rows of 4 characters from "
                "'1234.'; fix the puzzle (e.g. '1... .4.2 2.4. .3.1')"
            )
        grid = tuple(0 if ch == "." else int(ch) for row in m.groups() for ch in row)
        if any(grid[c] and grid[c] == grid[p] for c in range(N * N) for p in _PEERS[c]):
            raise MalformedProblemError(
                f"sudoku puzzle {prompt!r} repeats a digit in a row, column or box"
            )
        solution = solve_by_singles(grid)
        if solution is None:
            raise MalformedProblemError(
                f"sudoku puzzle {prompt!r} cannot be solved by naked singles alone; "
                "give more clues or use a puzzle from the generator"
            )
        return Problem(self.name, render_grid(grid), {"grid": grid, "solution": solution})

    def golden_steps(self, problem: Problem) -> list[str]:
        state, steps = self.initial_state(problem), []
        while not self.is_done(state):
            step = self.correct_steps(state)[0]
            steps.append(step)
            state = self.apply_step(state, step)
        return steps

    def answer_line(self, problem: Problem) -> str:
        return ANSWER_PREFIX + render_grid(tuple(problem.data["solution"]))

    def check_answer(self, problem: Problem, line: str) -> bool:
        return line.strip() == self.answer_line(problem)

    # -- verifier ---------------------------------------------------------
    def initial_state(self, problem: Problem) -> Grid:
        return tuple(problem.data["grid"])

    @staticmethod
    def _parse(step: str) -> tuple[int, int] | None:
        m = _STEP.match(step.strip())
        if not m:
            return None
        return (int(m.group(1)) - 1) * N + int(m.group(2)) - 1, int(m.group(3))

    def check_step(self, state: Grid, step: str) -> bool:
        parsed = self._parse(step)
        if parsed is None or state[parsed[0]] != 0:
            return False
        return candidates(state, parsed[0]) == [parsed[1]]

    def apply_step(self, state: Grid, step: str) -> Grid:
        """Place the digit if the cell is empty (right or wrong); otherwise nothing changes."""
        parsed = self._parse(step)
        if parsed is None or state[parsed[0]] != 0:
            return state
        g = list(state)
        g[parsed[0]] = parsed[1]
        return tuple(g)

    def correct_steps(self, state: Grid) -> list[str]:
        return [_step(c, d) for c, d in naked_singles(state)]

    def is_done(self, state: Grid) -> bool:
        return 0 not in state

    # -- synthetic errors -------------------------------------------------
    # Codes are cell * 10 + digit; only placements into empty cells are encodable.
    def encode_step(self, state: Grid, step: str) -> int | None:
        parsed = self._parse(step)
        if parsed is None or state[parsed[0]] != 0:
            return None
        return parsed[0] * 10 + parsed[1]

    def decode_step(self, state: Grid, code: int) -> str:
        return _step(int(code) // 10, int(code) % 10)

    def _options(self, state: Grid, etype: str) -> list[tuple[int, list[int]]]:
        """(cell, digits) the injector of ``etype`` chooses from: cell first (uniformly, but
        see ``_next_cell_option``), then digit."""
        out = []
        for cell in range(N * N):
            if state[cell] != 0:
                continue
            cand = candidates(state, cell)
            if etype == "invalid":
                digits = [d for d in range(1, N + 1) if d not in cand]
            elif etype == "non_naked_single":
                digits = cand if len(cand) >= 2 else []
            else:
                raise ValueError(f"unknown sudoku error type {etype!r}")
            if digits:
                out.append((cell, digits))
        return out

    def _next_cell_option(self, state: Grid, etype: str, opts: list) -> int | None:
        """Index in ``opts`` of the cell the golden trace fills next, when ``etype`` places a
        share of its errors there (``invalid`` with ``next_cell_share`` > 0); else None."""
        if etype != "invalid" or self.next_cell_share == 0.0:
            return None
        singles = naked_singles(state)
        if not singles:  # a stuck grid (after a wrong step): no golden next cell
            return None
        return next((i for i, (c, _) in enumerate(opts) if c == singles[0][0]), None)

    def _cell_weights(self, state: Grid, etype: str, opts: list) -> np.ndarray:
        """Probability of each option's cell: uniform, with ``next_cell_share`` moved to the
        golden next cell for ``invalid``."""
        w = np.full(len(opts), 1.0 / len(opts)) if opts else np.zeros(0)
        j = self._next_cell_option(state, etype, opts)
        if j is not None:
            w *= 1.0 - self.next_cell_share
            w[j] += self.next_cell_share
        return w

    def type_distributions(self, state: Grid) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for etype in self.error_types:
            dist: dict[int, float] = defaultdict(float)
            opts = self._options(state, etype)
            for (cell, digits), w in zip(opts, self._cell_weights(state, etype, opts), strict=True):
                for d in digits:
                    dist[cell * 10 + d] += w / len(digits)
            out[etype] = dict(dist)
        return out

    def sample_error_of_type(self, state: Grid, etype: str, rng: np.random.Generator) -> str:
        """Readable one-sample injector: a random eligible empty cell (the golden next cell
        with probability ``next_cell_share`` for ``invalid``), then a random bad digit."""
        opts = self._options(state, etype)
        i = int(rng.integers(len(opts)))
        j = self._next_cell_option(state, etype, opts)
        if j is not None and rng.random() < self.next_cell_share:
            i = j
        cell, digits = opts[i]
        return _step(cell, digits[int(rng.integers(len(digits)))])

    def sample_codes_of_type(
        self, state: Grid, etype: str, n: int, rng: np.random.Generator
    ) -> np.ndarray:
        opts = self._options(state, etype)
        # Pad each cell's digit list to 4 so the draw is one fancy-index.
        table = np.zeros((len(opts), N), dtype=np.int64)
        sizes = np.array([len(d) for _, d in opts], dtype=np.int64)
        cells = np.array([c for c, _ in opts], dtype=np.int64)
        for i, (_, digits) in enumerate(opts):
            table[i, : len(digits)] = digits
        which = rng.integers(0, len(opts), n)
        nxt = self._next_cell_option(state, etype, opts)
        if nxt is not None:  # no extra draw at share 0: the paper's stream is unchanged
            which[rng.random(n) < self.next_cell_share] = nxt
        j = (rng.random(n) * sizes[which]).astype(np.int64)
        return cells[which] * 10 + table[which, j]
