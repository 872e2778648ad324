"""The eval stage's generation: every model of a task in one Ray Data pass, against one pass
(one actor pool) per model as the stage ran before.

    python benchmarks/bench_eval.py [--models 5] [--problems 20] [--rounds 2] [--cpus 2]

The smoke preset's eval settings on a local Ray (start-up excluded): ``--models``
random-initialised nano models of multiplication (different seeds), the ``clean`` and
``synthetic`` conditions at temperatures 0 and 1. Reports generations per wall second,
actor-pool start-up and model loads included (they are what a small model's eval pays):

* per model: ``rayjobs.evaluate.evaluate_model`` once per model, one pool each;
* one pass: ``rayjobs.evaluate.evaluate_models``, one pool whose actors switch models;
* one pass, item order: the same with the feeds in item order (``rayjobs.evaluate.by_length``
  off): Ray Data batches consecutive rows, each padded to its longest.

Every side writes the same rows (same items, same seeds): checked after the first round.
The surprise pass is on (teacher-forced scores of every wrong step), so the scoring feed is
measured too (with random-initialised models every row runs to the token cap, so the
generation side understates what sorting saves on trained ones). Apart, in this process,
the scoring pass on the ``tiny`` preset's own items (``_scoring_batches``): the feed in item
order against sorted, forward batches of 128 against 32 (what a CPU actor uses).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import alternate, median_ratio  # noqa: E402

CONDITIONS = ["clean", "synthetic"]
TEMPERATURES = [0.0, 1.0]


def _setup(out: str, n_models: int, problems: int) -> tuple[Any, dict[str, str]]:
    from rayjobs import data as data_job
    from rayjobs.common import JobContext
    from selfcorrect.config import load_config
    from selfcorrect.models import build_model, save_model

    cfg = load_config(
        os.path.join(REPO, "configs", "smoke.yaml"),
        [
            "tasks=[multiplication]",
            f"eval.max_problems={problems}",
            "eval.num_actors=1",
            "eval.surprise=true",
        ],
    )
    data_job.run(JobContext(cfg, out))
    models = {}
    for i in range(n_models):
        model, tok = build_model(cfg.model.preset, cfg.model.max_length, seed=i)
        models[f"m{i}"] = path = os.path.join(out, "models", f"m{i}")
        save_model(model, tok, path)
    return cfg, models


def run(
    models: int = 5, problems: int = 20, rounds: int = 2, cpus: int = 2, scoring_rows: int = 0
) -> dict[str, Any]:
    import ray

    from rayjobs import evaluate as ev

    out = tempfile.mkdtemp(prefix="bench-eval-")
    cfg, paths = _setup(out, models, problems)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    kw = dict(conditions=CONDITIONS, temperatures=TEMPERATURES)
    n_gen = {"n": 0}
    rows: dict[str, Any] = {}

    def per_model() -> float:
        t = time.perf_counter()
        for name, path in paths.items():
            ev.evaluate_model(cfg, "multiplication", path, f"{name}-each", out, **kw)
        return n_gen["n"] / (time.perf_counter() - t)

    def one_pass(suffix: str = "pass") -> float:
        t = time.perf_counter()
        named = {f"{name}-{suffix}": path for name, path in paths.items()}
        ev.evaluate_models(cfg, "multiplication", named, out, **kw)
        return n_gen["n"] / (time.perf_counter() - t)

    def item_order() -> float:
        sort = ev.by_length
        ev.by_length = lambda feed, *text: list(feed)
        try:
            return one_pass("items")
        finally:
            ev.by_length = sort

    try:
        items = ev.build_items(cfg, "multiplication", out, CONDITIONS)
        n_gen["n"] = len(items) * len(TEMPERATURES) * len(paths)
        per_model(), one_pass(), item_order()  # warm-up: imports, file caches
        for name in paths:
            a = ev.io.read_parquet(ev.eval_path(out, "multiplication", f"{name}-each"))
            for other in ("pass", "items"):
                b = ev.io.read_parquet(ev.eval_path(out, "multiplication", f"{name}-{other}"))
                rows[f"{name}-{other}"] = _same_rows(a, b)
        if not all(rows.values()):
            raise AssertionError(f"one pass and per-model passes differ: {rows}")
        med, rates = alternate(
            {"per_model": per_model, "one_pass": one_pass, "item_order": item_order}, rounds
        )
    finally:
        ray.shutdown()
    scoring = _scoring_batches(out, rounds, scoring_rows)
    return {
        "models": models,
        "generations": n_gen["n"],
        "max_new_tokens": cfg.eval.max_new_tokens,
        "preset": cfg.model.preset,
        "cpus": cpus,
        "rounds": rounds,
        "generations_per_s": med,
        "rates": rates,
        "seconds": {k: n_gen["n"] / v for k, v in med.items()},
        "one_pass_over_per_model": median_ratio(rates, "one_pass", "per_model"),
        "sorted_over_item_order": median_ratio(rates, "one_pass", "item_order"),
        "same_rows": True,
        "scoring": scoring,
    }


def _same_rows(a: Any, b: Any) -> bool:
    """The same rows, scores to within 1e-4 nats (batches of other shapes round differently)."""
    import numpy as np

    a, b = a.drop(["model"]).to_pandas(), b.drop(["model"]).to_pandas()
    scores = [c for c in ("wrong_step_surprise", "signal_logp", "paired_signal_logp") if c in a]
    if not a.drop(columns=scores).equals(b.drop(columns=scores)):
        return False
    return all(
        np.allclose(a[c].to_numpy(float), b[c].to_numpy(float), atol=1e-4, equal_nan=True)
        for c in scores
    )


def _scoring_batches(out: str, rounds: int, max_rows: int = 0) -> dict[str, Any]:
    """The scoring pass's feed on the ``tiny`` preset's eval items (synthetic wrong steps and
    their gold steps, both tasks; the cost of teacher forcing does not depend on the weights,
    so a random-initialised ``tiny`` model stands in): Ray Data batches of 128 consecutive
    rows in item order, each scored at forward batch 128 (before); the feed sorted by length
    (``rayjobs.evaluate.by_length``) at 128; sorted at forward batch 32 (a CPU actor's)."""
    import torch

    from rayjobs import data as data_job
    from rayjobs import evaluate as ev
    from rayjobs.common import JobContext
    from selfcorrect.config import load_config
    from selfcorrect.evaluate import render_prefix
    from selfcorrect.generation import step_scores
    from selfcorrect.models import build_model
    from selfcorrect.tasks import signal_line

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as a scoring actor on one CPU
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"), [])
    root = os.path.join(out, "tiny")
    data_job.run(JobContext(cfg, root))
    model, tok = build_model(cfg.model.preset, cfg.model.max_length, seed=0)
    feed = []
    for task in cfg.tasks:
        for it in ev.build_items(cfg, task, root, ["synthetic"]):
            prefix = render_prefix(it["prompt"], it["prefix_steps"])
            for step in (it["wrong_step"], it["gold_step"]):
                feed.append({"prefix": prefix, "step": step, "signal": signal_line("eift")})
    if max_rows:  # a smoke check (--quick): every other row up to the limit, both tasks kept
        feed = feed[:: max(1, len(feed) // max_rows)][:max_rows]

    def side(rows: list[dict[str, Any]], forward: int) -> Any:
        def run() -> float:
            t = time.perf_counter()
            for b in range(0, len(rows), 128):  # one Ray Data batch -> one actor call
                chunk = rows[b : b + 128]
                step_scores(
                    model,
                    tok,
                    [r["prefix"] for r in chunk],
                    [r["step"] for r in chunk],
                    [r["signal"] for r in chunk],
                    batch_size=forward,
                )
            return len(rows) / (time.perf_counter() - t)

        return run

    ordered = ev.by_length(feed, "prefix", "step")
    try:
        med, rates = alternate(
            {
                "items_128": side(feed, 128),
                "sorted_128": side(ordered, 128),
                "sorted_32": side(ordered, 32),
            },
            rounds,
        )
    finally:
        torch.set_num_threads(threads)  # the benchmarks that follow keep theirs
    return {
        "tasks": list(cfg.tasks),
        "rows": len(feed),
        "rows_per_s": med,
        "sorted_over_items": median_ratio(rates, "sorted_128", "items_128"),
        "batch_32_over_128": median_ratio(rates, "sorted_32", "sorted_128"),
        "both_over_before": median_ratio(rates, "sorted_32", "items_128"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=5)
    p.add_argument("--problems", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2)
    a = p.parse_args()
    r = run(a.models, a.problems, a.rounds, a.cpus)
    print(json.dumps({k: v for k, v in r.items() if k != "rates"}, indent=2, default=str))


if __name__ == "__main__":
    main()
