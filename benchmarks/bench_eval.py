"""The eval stage's generation: every model of a task in one Ray Data pass, against one pass
(one actor pool) per model as the stage ran before.

    python benchmarks/bench_eval.py [--models 5] [--problems 20] [--rounds 2] [--cpus 2]

The smoke preset's eval settings on a local Ray (start-up excluded): ``--models``
random-initialised nano models of multiplication (different seeds), the ``clean`` and
``synthetic`` conditions at temperatures 0 and 1. Reports generations per wall second,
actor-pool start-up and model loads included (they are what a small model's eval pays):

* per model: ``rayjobs.evaluate.evaluate_model`` once per model, one pool each;
* one pass: ``rayjobs.evaluate.evaluate_models``, one pool whose actors switch models.

Both sides write the same rows (same items, same seeds): checked after the first round.
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
        ["tasks=[multiplication]", f"eval.max_problems={problems}", "eval.num_actors=1"],
    )
    data_job.run(JobContext(cfg, out))
    models = {}
    for i in range(n_models):
        model, tok = build_model(cfg.model.preset, cfg.model.max_length, seed=i)
        models[f"m{i}"] = path = os.path.join(out, "models", f"m{i}")
        save_model(model, tok, path)
    return cfg, models


def run(models: int = 5, problems: int = 20, rounds: int = 2, cpus: int = 2) -> dict[str, Any]:
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

    def one_pass() -> float:
        t = time.perf_counter()
        named = {f"{name}-pass": path for name, path in paths.items()}
        ev.evaluate_models(cfg, "multiplication", named, out, **kw)
        return n_gen["n"] / (time.perf_counter() - t)

    try:
        items = ev.build_items(cfg, "multiplication", out, CONDITIONS)
        n_gen["n"] = len(items) * len(TEMPERATURES) * len(paths)
        per_model(), one_pass()  # warm-up: imports, file caches
        for name in paths:
            a = ev.io.read_parquet(ev.eval_path(out, "multiplication", f"{name}-each"))
            b = ev.io.read_parquet(ev.eval_path(out, "multiplication", f"{name}-pass"))
            rows[name] = a.drop(["model"]).equals(b.drop(["model"]))
        if not all(rows.values()):
            raise AssertionError(f"one pass and per-model passes differ: {rows}")
        med, rates = alternate({"per_model": per_model, "one_pass": one_pass}, rounds)
    finally:
        ray.shutdown()
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
        "same_rows": True,
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
