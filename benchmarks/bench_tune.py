"""The tune stage's trials: the training loop in the trial's own process, against one Ray Train
run per trial as the stage ran before.

    python benchmarks/bench_tune.py [--trials 3] [--steps 20] [--rounds 2] [--cpus 2]

A sweep of ``--trials`` injection rates on multiplication (the `tiny` preset's model and
training settings, ``tune.init=scratch``, ``--steps`` steps a trial, one trial at a time as
in the pipeline when a sweep runs beside another step) on a local Ray, from data on disk:

* ray_train: ``tune.trainer=ray_train``: each trial drives a ``TorchTrainer`` run (a controller
  and a worker process), then evaluates in a Ray task;
* in_trial: ``tune.trainer=in_trial``: the trial's process runs the same loop and evaluation;
* in_trial, a process per trial: the same with ``tune.reuse_actors=false`` (every trial in a
  fresh Ray actor process, as the stage ran before it reused them).

Reports trials per minute, all the sweep does included (``rayjobs.tune.sweep``: Tuner, trials,
results table). Every side must give the same model weights, to the bit (checked on the
first round, which is also the warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import alternate, median_ratio  # noqa: E402

TASK = "multiplication"
SIDES = {  # side -> (tune.trainer, tune.reuse_actors)
    "ray_train": ("ray_train", True),
    "in_trial": ("in_trial", True),
    "in_trial_fresh_process": ("in_trial", False),
}


def _config(side: str, trials: int, steps: int) -> Any:
    from selfcorrect.config import load_config

    trainer, reuse = SIDES[side]
    rates = [round(0.1 * (i + 1), 2) for i in range(trials)]
    return load_config(
        os.path.join(REPO, "configs", "tiny.yaml"),
        [
            f"tasks=[{TASK}]",
            "data.n_train=500",
            f"tune.injection_rates=[{','.join(map(str, rates))}]",
            f"tune.max_steps={steps}",
            "tune.init=scratch",
            "tune.max_concurrent=1",
            "tune.eval_problems=20",
            "tune.val_examples=32",
            f"tune.trainer={trainer}",
            f"tune.reuse_actors={str(reuse).lower()}",
        ],
    )


def _weights(path: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def run(trials: int = 3, steps: int = 20, rounds: int = 2, cpus: int = 2) -> dict[str, Any]:
    import ray
    import torch

    from rayjobs import data as data_job
    from rayjobs import tune as tune_job
    from rayjobs.common import JobContext

    root = tempfile.mkdtemp(prefix="bench-tune-")
    data_dir = os.path.join(root, "data-run")
    data_job.run(JobContext(_config("ray_train", trials, steps), data_dir))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    runs: dict[str, list[str]] = {s: [] for s in SIDES}

    def side(name: str) -> float:
        out = os.path.join(root, f"{name}-{len(runs[name])}")
        shutil.copytree(data_dir, out)  # a fresh sweep: nothing to restore or skip
        runs[name].append(out)
        t = time.perf_counter()
        df = tune_job.sweep(_config(name, trials, steps), TASK, out)
        seconds = time.perf_counter() - t
        if not (df["status"] == "done").all():
            raise AssertionError(f"{name}: trials failed: {df[['status', 'error']]}")
        return 60 * len(df) / seconds

    try:
        first = {s: side(s) for s in SIDES}  # warm-up: imports, Ray's worker pool, file caches
        same = {}
        for name in sorted(os.listdir(os.path.join(runs["ray_train"][0], TASK, "tune", "trials"))):
            ref, *others = (
                _weights(os.path.join(runs[s][0], TASK, "tune", "trials", name, "model"))
                for s in SIDES
            )
            same[name] = all(
                b.keys() == ref.keys() and all(torch.equal(ref[k], b[k]) for k in ref)
                for b in others
            )
        if not all(same.values()):
            raise AssertionError(f"the sides trained different models: {same}")
        med, rates = alternate({s: lambda s=s: side(s) for s in SIDES}, rounds)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "task": TASK,
        "trials": trials,
        "steps": steps,
        "cpus": cpus,
        "rounds": rounds,
        "warm_up_trials_per_min": first,
        "trials_per_min": med,
        "rates": rates,
        "seconds_per_trial": {k: 60 / v for k, v in med.items()},
        "in_trial_over_ray_train": median_ratio(rates, "in_trial", "ray_train"),
        "reused_over_fresh_process": median_ratio(rates, "in_trial", "in_trial_fresh_process"),
        "same_models": True,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2)
    a = p.parse_args()
    r = run(a.trials, a.steps, a.rounds, a.cpus)
    print(json.dumps({k: v for k, v in r.items() if k != "rates"}, indent=2, default=str))


if __name__ == "__main__":
    main()
