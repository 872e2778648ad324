"""Building training batches: the CPU work every training step pays before its forward pass.

    python benchmarks/bench_examples.py [--config configs/tiny.yaml] [--batches 10] [--rounds 3]

A step of ``run_training`` first builds its batch (``ExampleStream.local_batch``: problems,
golden traces, injected errors, tokenisation, per-token loss weights) on the step's critical
path. Measured here, per task and method, in this one run:

* **token weights**: ``selfcorrect.loss.token_weights`` (vectorised over the tokens) against
  ``token_weights_reference`` (the per-token rule) on the same encoded examples, alternating
  per round: the ratio;
* **which error types apply**: the same batches built with the task's own
  ``applicable_types`` (multiplication's shortcut) against the enumeration of every
  injector's outcomes (``type_distributions``, what every task falls back on), alternating
  per round: the ratio; the two batches are checked identical first;
* **share of a step**: seconds to build one batch against the seconds of a training step on
  the preset's model (``run_training`` in one process, its own step timing, which includes
  the build): what the batch costs the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.bench_train import bench_config, bench_prompts, step_reports  # noqa: E402
from benchmarks.common import alternate, load_avg, median_ratio  # noqa: E402
from selfcorrect.loss import frame_example, token_weights, token_weights_reference  # noqa: E402
from selfcorrect.models import build_model  # noqa: E402
from selfcorrect.training import ExampleStream  # noqa: E402


def _encoded(stream: ExampleStream, batches: int) -> list[tuple[Any, Any]]:
    """(offsets, char labels) of ``batches`` steps' examples (problems 0..batch_size-1), framed
    and tokenised as ``encode_example`` does before it calls ``token_weights``."""
    out = []
    for step in range(batches):
        for j in range(stream.cfg.train.batch_size):
            ex = frame_example(stream.tok, stream.trace(step, j, j))
            enc = stream.tok(ex.text, add_special_tokens=False, return_offsets_mapping=True)
            out.append((enc["offset_mapping"], ex.char_labels()))
    return out


class _Enumerated:
    """The task without its own ``applicable_types``: the enumeration answers (the baseline)."""

    def __init__(self, task: Any) -> None:
        self._task = task

    def __getattr__(self, name: str) -> Any:
        if name == "applicable_types":
            raise AttributeError(name)
        return getattr(self._task, name)


def _same_batches(a: ExampleStream, b: ExampleStream, steps: int) -> bool:
    for s in range(steps):
        for x, y in zip(a.local_batch(s, 0, 1), b.local_batch(s, 0, 1), strict=True):
            if x.keys() != y.keys() or any((x[k] != y[k]).any() for k in x):
                return False
    return True


def step_seconds(cfg: Any, task: str, method: str, prompts: list[str], steps: int) -> float:
    """Median seconds of a ``run_training`` step (first step = warm-up, not counted)."""
    times = sorted(r["step_s"] for r in step_reports(cfg, task, method, prompts, steps))
    return times[len(times) // 2]


def run(
    config: str = "configs/tiny.yaml",
    batches: int = 10,
    steps: int = 3,
    threads: int = 1,
    rounds: int = 3,
    methods: Sequence[str] = ("ft", "eift", "insec"),
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    res: dict[str, Any] = {"config": config, "batches": batches, "steps": steps}
    res.update(rounds=rounds, threads=threads, load_avg_start=load_avg(), rows=[])
    base = bench_config(config, overrides, steps, threads)
    _, tok = build_model(base.model.preset, base.model.max_length)
    for task in base.tasks:
        prompts = bench_prompts(base, task)
        for method in methods:
            stream = ExampleStream(base, task, method, prompts, tok)
            stream.local_batch(0, 0, 1)  # warm: parsed problems are cached by the stream

            enumerated = ExampleStream(base, task, method, prompts, tok)
            enumerated.task = _Enumerated(enumerated.task)
            if not _same_batches(stream, enumerated, 2):
                raise AssertionError(f"{task}/{method}: applicable_types changed the batches")

            def builder(stream: ExampleStream) -> Any:
                def build() -> float:
                    t0 = time.perf_counter()
                    for s in range(batches):
                        stream.local_batch(s, 0, 1)
                    return batches / (time.perf_counter() - t0)  # batches per second

                return build

            enc = _encoded(stream, 2)
            w = stream.weights

            def weights_side(fn: Any, enc: list = enc, w: Any = w) -> Any:
                def side() -> float:
                    t0 = time.perf_counter()
                    for offsets, labels in enc:
                        fn(offsets, labels, w)
                    return len(enc) / (time.perf_counter() - t0)  # examples per second

                return side

            med, rates = alternate(
                {
                    "vectorised": weights_side(token_weights),
                    "reference": weights_side(token_weights_reference),
                    "build": builder(stream),
                    "build_enumerated": builder(enumerated),
                },
                rounds,
            )
            step_s = step_seconds(base, task, method, prompts, steps)
            build_s = 1 / med["build"]
            res["rows"].append(
                {
                    "task": task,
                    "method": method,
                    "build_s": build_s,
                    "step_s": step_s,
                    "build_share": build_s / step_s,
                    "weights_examples_per_s": {k: med[k] for k in ("vectorised", "reference")},
                    "weights_vectorised_over_reference": median_ratio(
                        rates, "vectorised", "reference"
                    ),
                    "own_applicable_types": hasattr(stream.task, "applicable_types"),
                    "build_over_enumerated": median_ratio(rates, "build", "build_enumerated"),
                }
            )
            print(f"[examples] {res['rows'][-1]}", flush=True)
    res["load_avg_end"] = load_avg()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    res = run(
        args.config, args.batches, args.steps, args.threads, args.rounds, overrides=args.overrides
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
