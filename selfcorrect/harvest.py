"""On-policy error harvesting: turn a model's free generations into first-error records.

Pure functions (no Ray): the Ray Data pipeline in ``rayjobs/harvest.py`` calls
``score_batch`` on batches of generated samples. Every sample yields exactly one
outcome row (so accuracy and error rates come from the same pass) and at most
one error record: its **first** wrong step, with the model's own correct steps
before it, a correct step for that state and the error type (``other`` kept).

Lines are read exactly as eval reads them (``selfcorrect.tasks.base``): a last line cut
by ``max_new_tokens`` is dropped (``complete_lines``), so it is never an error; an ANSWER
line before the work is done is a wrong step (it can be the first error, and a
recognition line after it retracts it); the trace's answer is its first ANSWER line not
retracted. The first error here is the first ``own_errors`` row of eval on the same text.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pyarrow as pa

from selfcorrect.tasks import (
    ANSWER_PREFIX,
    Problem,
    Task,
    answer_index,
    classify_error,
    complete_lines,
    final_answer_correct,
    is_answer,
    walk_trace,
)

# DESIGN 7 columns first, then the extras consumers (hybrid trainer, eval) use.
HARVEST_COLUMNS = [
    "error_id",
    "problem_id",
    "task",
    "model",
    "temperature",
    "step_index",
    "prefix",
    "wrong_step",
    "gold_step",
    "error_type",
    "split",
    "prompt",
    "prefix_steps",
    "completion",
    "sample_index",
    "seed",
    "line_index",
]
OUTCOME_COLUMNS = [
    "problem_id",
    "task",
    "model",
    "split",
    "sample_index",
    "seed",
    "temperature",
    "correct",
    "answered",
    "first_error_index",
    "n_steps",
    "has_error",
]

HARVEST_SCHEMA = pa.schema(
    [
        ("error_id", pa.string()),
        ("problem_id", pa.string()),
        ("task", pa.string()),
        ("model", pa.string()),
        ("temperature", pa.float64()),
        ("step_index", pa.int64()),
        ("prefix", pa.string()),
        ("wrong_step", pa.string()),
        ("gold_step", pa.string()),
        ("error_type", pa.string()),
        ("split", pa.string()),
        ("prompt", pa.string()),
        ("prefix_steps", pa.list_(pa.string())),
        ("completion", pa.string()),
        ("sample_index", pa.int64()),
        ("seed", pa.int64()),
        ("line_index", pa.int64()),
    ]
)
OUTCOME_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("task", pa.string()),
        ("model", pa.string()),
        ("split", pa.string()),
        ("sample_index", pa.int64()),
        ("seed", pa.int64()),
        ("temperature", pa.float64()),
        ("correct", pa.bool_()),
        ("answered", pa.bool_()),
        ("first_error_index", pa.int64()),
        ("n_steps", pa.int64()),
        ("has_error", pa.bool_()),
    ]
)
SCORED_SCHEMA = pa.schema(
    list(HARVEST_SCHEMA)
    + [OUTCOME_SCHEMA.field(c) for c in OUTCOME_COLUMNS if c not in HARVEST_COLUMNS]
)


def sample_seed(seed: int, problem_id: str, sample_index: int) -> int:
    """Decoding seed of one (problem, sample): stable across runs, batchings and retries."""
    key = f"{seed}/{problem_id}/{sample_index}".encode()
    return (zlib.crc32(key) ^ (zlib.crc32(key[::-1]) << 31)) & (2**62 - 1)


def prompt_prefix(prompt: str) -> str:
    """The text a model continues: the prompt line (as in training traces)."""
    return prompt + "\n"


def requests_table(
    problems: pa.Table,
    *,
    samples_per_problem: int,
    temperature: float,
    seed: int,
) -> pa.Table:
    """problems x samples -> one generation request per row (``prefix``, ``seed``, ``temperature``)."""
    if samples_per_problem > 1 and temperature == 0:
        raise ValueError(
            "harvest.samples_per_problem > 1 with harvest.temperature = 0 gives identical "
            "greedy samples; set harvest.temperature > 0 or samples_per_problem = 1"
        )
    pids = problems.column("problem_id").to_pylist()
    prompts = problems.column("prompt").to_pylist()
    rows: dict[str, list[Any]] = {
        "problem_id": [],
        "prompt": [],
        "prefix": [],
        "sample_index": [],
        "seed": [],
        "temperature": [],
    }
    for pid, prompt in zip(pids, prompts, strict=True):
        for s in range(samples_per_problem):
            rows["problem_id"].append(pid)
            rows["prompt"].append(prompt)
            rows["prefix"].append(prompt_prefix(prompt))
            rows["sample_index"].append(s)
            rows["seed"].append(sample_seed(seed, pid, s))
            rows["temperature"].append(float(temperature))
    return pa.table(
        {
            **{k: rows[k] for k in ("problem_id", "prompt", "prefix")},
            "sample_index": pa.array(rows["sample_index"], pa.int64()),
            "seed": pa.array(rows["seed"], pa.int64()),
            "temperature": pa.array(rows["temperature"], pa.float64()),
        }
    )


def pick_gold(task: Task, state: Any, wrong_step: str) -> str | None:
    """A correct step for ``state``; of several (Sudoku), the one closest to the wrong step
    (same cell / same left-hand side), so the correction is the minimal edit."""
    options = task.correct_steps(state)
    if not options:
        return None

    def shared(a: str, b: str) -> int:
        n = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            n += 1
        return n

    return max(options, key=lambda s: (shared(s, wrong_step), -options.index(s)))


def score_sample(task: Task, problem: Problem, prompt: str, completion: str) -> dict[str, Any]:
    """Judge one generation: outcome fields plus the first-error fields (None when no error).

    The model's committed steps are tracked like ``walk_trace`` does (a recognition
    line retracts the step before it), so ``prefix_steps`` always replays to the
    state the wrong step was written in.
    """
    lines = complete_lines(completion)
    events = walk_trace(task, problem, lines)
    committed: list[str] = []
    out: dict[str, Any] = {
        "correct": final_answer_correct(task, problem, completion),
        "answered": answer_index(lines) is not None,
        "first_error_index": -1,
        "has_error": False,
        "step_index": None,
        "line_index": None,
        "prefix": None,
        "wrong_step": None,
        "gold_step": None,
        "error_type": None,
        "prefix_steps": None,
    }
    for ev in events:
        if ev.kind == "recognition":
            if committed:
                committed.pop()
            continue
        if ev.kind in ("step_ok", "answer"):  # (a finished trace's answer is retracted or last)
            committed.append(ev.line)
            continue
        # step_wrong, a premature ANSWER line included
        out["first_error_index"] = len(committed)
        gold = pick_gold(task, ev.state_before, ev.line)
        if gold is not None:  # a wrong step after the last one has no correct step to compare
            out.update(
                has_error=True,
                step_index=len(committed),
                line_index=ev.index,
                prefix=prompt_prefix(prompt) + "".join(line + "\n" for line in lines[: ev.index]),
                wrong_step=ev.line,
                gold_step=gold,
                error_type=classify_error(task, ev.state_before, ev.line),
                prefix_steps=list(committed),
            )
        break
    out["n_steps"] = sum(
        1 for e in events if e.kind in ("step_ok", "step_wrong") and not is_answer(e.line)
    )
    return out


def score_batch(
    batch: dict[str, np.ndarray], task: Task, model_name: str, split: str | None = None
) -> pa.Table:
    """Ray Data batch (requests + ``completion``) -> one row per sample, outcome + error fields.

    ``split`` names the batch's split; None reads it from the batch's ``split`` column (one
    pass over several splits)."""
    rows = []
    for i in range(len(batch["problem_id"])):
        prompt = str(batch["prompt"][i])
        problem = task.parse_prompt(prompt)
        pid = str(batch["problem_id"][i])
        s_idx = int(batch["sample_index"][i])
        scored = score_sample(task, problem, prompt, str(batch["completion"][i]))
        rows.append(
            {
                "error_id": f"{task.name}-{model_name}-{pid}-s{s_idx}",
                "problem_id": pid,
                "task": task.name,
                "model": model_name,
                "split": split if split is not None else str(batch["split"][i]),
                "prompt": prompt,
                "completion": str(batch["completion"][i]),
                "sample_index": s_idx,
                "seed": int(batch["seed"][i]),
                "temperature": float(batch["temperature"][i]),
                **scored,
            }
        )
    return pa.Table.from_pylist(rows, schema=SCORED_SCHEMA)


def split_results(rows: pa.Table | list[dict]) -> tuple[pa.Table, pa.Table]:
    """Scored samples -> (error records, outcomes), sorted by (problem_id, sample_index)."""
    recs = rows.to_pylist() if isinstance(rows, pa.Table) else list(rows)
    recs.sort(key=lambda r: (r["problem_id"], int(r["sample_index"])))
    outcomes = pa.Table.from_pylist(
        [{k: r[k] for k in OUTCOME_COLUMNS} for r in recs], schema=OUTCOME_SCHEMA
    )
    errors = pa.Table.from_pylist(
        [
            {k: (list(r[k]) if k == "prefix_steps" else r[k]) for k in HARVEST_COLUMNS}
            for r in recs
            if r["has_error"]
        ],
        schema=HARVEST_SCHEMA,
    )
    return errors, outcomes


def check_complete(outcomes: pa.Table, requests: pa.Table) -> None:
    """No sample lost or duplicated: outcomes are exactly the requested (problem, sample) pairs."""
    want = sorted(
        zip(
            requests.column("problem_id").to_pylist(),
            requests.column("sample_index").to_pylist(),
            strict=True,
        )
    )
    got = sorted(
        zip(
            outcomes.column("problem_id").to_pylist(),
            outcomes.column("sample_index").to_pylist(),
            strict=True,
        )
    )
    if got != want:
        dup = len(got) - len(set(got))
        missing = len(set(want) - set(got))
        raise RuntimeError(
            f"harvest lost or duplicated samples: {len(got)} results for {len(want)} requests "
            f"({missing} missing, {dup} duplicated); rerun the harvest stage"
        )


def summarize(errors: pa.Table, outcomes: pa.Table) -> dict[str, Any]:
    """Accuracy and error counts from the same pass (for logs and the manifest)."""
    n = outcomes.num_rows
    correct = sum(outcomes.column("correct").to_pylist())
    types: dict[str, int] = {}
    for t in errors.column("error_type").to_pylist():
        types[t] = types.get(t, 0) + 1
    return {
        "n_samples": n,
        "accuracy": correct / n if n else 0.0,
        "n_errors": errors.num_rows,
        "error_rate": errors.num_rows / n if n else 0.0,
        "error_types": dict(sorted(types.items())),
    }


__all__ = [
    "ANSWER_PREFIX",
    "HARVEST_COLUMNS",
    "OUTCOME_COLUMNS",
    "check_complete",
    "pick_gold",
    "prompt_prefix",
    "requests_table",
    "sample_seed",
    "score_batch",
    "score_sample",
    "split_results",
    "summarize",
]
