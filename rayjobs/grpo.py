"""Stage `grpo`: the on-policy RL baseline, <task>/models/ft/ -> <task>/models/grpo/.

python -m rayjobs.grpo --config configs/tiny.yaml --output-dir runs/tiny

GRPO on Ray Train workers (``TorchTrainer``) with the supervised trainer's
engine: DeepSpeed ZeRO 1-3 from ``train.zero_stage`` (CPU via gloo with
DS_ACCELERATOR=cpu, GPU via NCCL), or DDP at stage 0. Every step each worker
samples ``grpo.group_size`` completions for its share of the step's prompts with
the shared KV-cached generator, scores them with the task verifier and takes a
clipped-ratio + KL update (``selfcorrect.grpo``). Held-out greedy accuracy is
measured before training (the FT model's) and during it.

Checkpoints go to Ray Train storage every ``grpo.checkpoint_every`` steps; a
failed worker (``train.max_failures``) or a rerun of the same config resumes
from the latest one. The final model is published atomically with
``save_pretrained`` next to ``metrics.json`` / ``metrics.parquet``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from rayjobs.common import (
    JobContext,
    init_ray,
    job_main,
    parse_args,
    run_stage,
    save_resolved_config,
)
from rayjobs.train import _ray_storage, method_config, publish_final, train_hash
from selfcorrect import io
from selfcorrect.config import Config
from selfcorrect.grpo import check_batch_shape, grpo_world_size


def grpo_hash(cfg: Config, task: str) -> str:
    """What the GRPO model depends on: the FT model it starts from (its training hash: seed,
    data, model, clean training settings) and the GRPO settings; not which other methods
    ``train.methods`` lists."""
    blob = {"ft": train_hash(method_config(cfg, task), task, "ft"), "grpo": cfg.to_dict()["grpo"]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_grpo(
    cfg: Config, task_name: str, init_model_path: str, output_dir: str
) -> dict[str, Any]:
    """Train GRPO from ``init_model_path`` and publish the model to ``output_dir`` atomically.

    Prompts come from ``<output_dir>/../../data/{train,test}.parquet`` (the task's data
    stage). Returns the last step's metrics; the per-step history is written next to
    the model as metrics.json and metrics.parquet. Ray must be initialised.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from selfcorrect import console
    from selfcorrect.grpo import train_loop_per_worker
    from selfcorrect.models import ModelPathError

    check_batch_shape(cfg)
    if not io.exists(io.join(init_model_path, "config.json")):
        raise ModelPathError(
            f"GRPO starts from the FT model, but {init_model_path!r} holds none; train it first "
            "(python -m rayjobs.train) or point grpo at another model directory"
        )
    task_dir = str(output_dir).rstrip("/").rsplit("/", 2)[0]  # <out>/<task>/models/grpo
    train_tab = io.read_parquet(io.join(task_dir, "data", "train.parquet"), required=["prompt"])
    test_tab = io.read_parquet(io.join(task_dir, "data", "test.parquet"), required=["prompt"])
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "task": task_name,
            "init_model_path": str(init_model_path),
            "train_prompts": train_tab.column("prompt").to_pylist(),
            "eval_prompts": test_tab.column("prompt").to_pylist()[: cfg.grpo.eval_problems],
            "console": console.worker_spec(),  # quiet mode: where workers log and report
        },
        scaling_config=ScalingConfig(
            num_workers=grpo_world_size(cfg), use_gpu=t.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=f"grpo-{task_name}-{grpo_hash(cfg, task_name)}",
            storage_path=_ray_storage(output_dir),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    history = publish_final(result, output_dir, "grpo_state.json", f"GRPO for {task_name}")
    return history[-1]


def run(ctx: JobContext) -> None:
    cfg = ctx.cfg
    if not cfg.grpo.enabled:
        print("[grpo] disabled (grpo.enabled=false)")
        return
    init_ray(cfg)
    for name in cfg.tasks:

        def build(rec: dict, name: str = name) -> None:
            rel = f"{name}/models/grpo"
            m = train_grpo(cfg, name, ctx.path(name, "models", "ft"), ctx.path(rel))
            rec["artifacts"].append(rel)
            rec["final"] = {k: v for k, v in m.items() if isinstance(v, (int, float))}
            acc = m.get("heldout_accuracy")
            print(f"[grpo] {name}: {ctx.path(rel)} (held-out accuracy {acc})")

        run_stage(ctx, f"{name}/grpo", grpo_hash(cfg, name), build)


@job_main
def main(argv: list[str] | None = None) -> None:
    ctx = parse_args(__doc__, argv)
    save_resolved_config(ctx)
    run(ctx)
    print(f"GRPO models written under {ctx.output_dir}/<task>/models/grpo/")


if __name__ == "__main__":
    main()
