"""Problem datasets: deterministic for a seed, train and test disjoint (DESIGN 7 columns)."""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa

from selfcorrect.tasks import ANSWER_PREFIX, Problem, Task

DATA_COLUMNS = ["problem_id", "task", "split", "prompt", "steps", "answer"]


def stream_rng(seed: int, *names: str | int) -> np.random.Generator:
    """An independent RNG per (seed, purpose...): stages never share random streams."""
    keys = [seed] + [n if isinstance(n, int) else zlib.crc32(str(n).encode()) for n in names]
    return np.random.default_rng(keys)


def sample_unique(task: Task, n: int, rng: np.random.Generator, exclude: set[str]) -> list[Problem]:
    """``n`` distinct problems whose keys are not in ``exclude``."""
    seen = set(exclude)
    out: list[Problem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(
                f"could only find {len(out)} distinct {task.name} problems of the {n} asked; "
                "lower data.n_train/n_test or make problems larger (more digits / empty cells)"
            )
        p = task.sample_problem(rng)
        if p.key not in seen:
            seen.add(p.key)
            out.append(p)
    return out


def problem_rows(task: Task, problems: list[Problem], split: str) -> list[dict]:
    return [
        {
            "problem_id": f"{task.name}-{split}-{i:06d}",
            "task": task.name,
            "split": split,
            "prompt": task.prompt(p),
            "steps": task.golden_steps(p),
            "answer": task.answer_line(p)[len(ANSWER_PREFIX) :],
        }
        for i, p in enumerate(problems)
    ]


def make_splits(task: Task, n_train: int, n_test: int, seed: int) -> dict[str, pa.Table]:
    """Test first, then train excluding every test problem."""
    test = sample_unique(task, n_test, stream_rng(seed, task.name, "test"), set())
    train = sample_unique(
        task, n_train, stream_rng(seed, task.name, "train"), {p.key for p in test}
    )
    return {
        "train": pa.Table.from_pylist(problem_rows(task, train, "train")),
        "test": pa.Table.from_pylist(problem_rows(task, test, "test")),
    }


def load_problems(task: Task, table: pa.Table) -> list[Problem]:
    """Parquet rows -> Problems, re-validating every prompt (a malformed one is a clear error)."""
    return [task.parse_prompt(p) for p in table.column("prompt").to_pylist()]
