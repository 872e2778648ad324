"""Stage `grpo`: the on-policy RL baseline, <task>/models/ft/ -> <task>/models/grpo/.

python -m rayjobs.grpo --config configs/tiny.yaml --output-dir runs/tiny

GRPO on Ray Train workers (``TorchTrainer``) with DeepSpeed ZeRO
(``train.zero_stage``; CPU via gloo with DS_ACCELERATOR=cpu, GPU via NCCL).
Every step each worker takes its share of the step's prompts, samples
``grpo.group_size`` completions per prompt with the shared KV-cached generator
(``selfcorrect.generation.generate``), scores them with the task verifier
(``selfcorrect.grpo`` rewards), and takes a clipped-ratio + KL update. Held-out
greedy accuracy is measured before training (the FT model's) and during it.

Checkpoints (DeepSpeed state + metric history) go to Ray Train storage every
``grpo.checkpoint_every`` steps; a failed worker or a rerun of the same config
resumes from the latest one. The final model is published atomically with
``save_pretrained`` next to ``metrics.json`` / ``metrics.parquet``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from rayjobs.common import JobContext, init_ray, parse_args, run_stage, save_resolved_config
from selfcorrect import io
from selfcorrect.config import Config, ConfigError, config_from_dict

STATE_FILE = "grpo_state.json"
DS_TAG = "ds"


def grpo_hash(cfg: Config, task: str) -> str:
    """What the GRPO model depends on: data, the FT model's recipe, and the GRPO settings."""
    return cfg.section_hash("seed", task, "data", "model", "train", "grpo")


def _world_size(cfg: Config) -> int:
    return cfg.grpo.num_workers or cfg.train.num_workers


def check_batch_shape(cfg: Config) -> tuple[int, int, int]:
    """(prompts per worker, sequences per worker, micro batch): clear error if they do not split."""
    g, world = cfg.grpo, _world_size(cfg)
    if g.prompts_per_step % world:
        raise ConfigError(
            f"config key 'grpo.prompts_per_step': {g.prompts_per_step} prompts do not split over "
            f"{world} workers; make it a multiple of {world}"
        )
    local_prompts = g.prompts_per_step // world
    local_seqs = local_prompts * g.group_size
    micro = g.micro_batch_size or local_seqs
    if local_seqs % micro:
        raise ConfigError(
            f"config key 'grpo.micro_batch_size': {micro} does not divide the {local_seqs} "
            f"sequences per worker (prompts_per_step / workers * group_size)"
        )
    return local_prompts, local_seqs, micro


# ---------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------


def deepspeed_config(cfg: Config, micro: int, grad_accum: int, world: int) -> dict[str, Any]:
    """DeepSpeed config from the shared train section (ZeRO stage, bf16) and the GRPO section."""
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro * grad_accum * world,
        "gradient_clipping": cfg.grpo.max_grad_norm,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": bool(cfg.train.bf16)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _local_model_dir(path: str) -> str:
    """A model dir this worker can read: local paths as they are, URIs downloaded to a temp dir."""
    if not io.is_uri(path):
        return path
    import pyarrow.fs as pafs

    dst = tempfile.mkdtemp(prefix="grpo-init-")
    fs, p = pafs.FileSystem.from_uri(path)
    pafs.copy_files(p, dst, source_filesystem=fs)
    return dst


def _all_sum(values: list[float]) -> list[float]:
    """Sum floats over every worker (gloo on CPU, NCCL on GPU)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


def _all_max(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: rollouts, rewards, DeepSpeed updates, metrics, checkpoints."""
    import contextlib

    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    from selfcorrect.data import stream_rng
    from selfcorrect.generation import generate
    from selfcorrect.grpo import (
        completion_batch,
        get_reward,
        group_advantages,
        grpo_loss,
        reward_answer,
        token_logprobs,
    )
    from selfcorrect.models import load_model, save_model
    from selfcorrect.tasks import get_task

    cfg = config_from_dict(config["cfg"])
    g = cfg.grpo
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    local_prompts, local_seqs, micro = check_batch_shape(cfg)
    torch.set_num_threads(max(1, cfg.train.cpus_per_worker))
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if cfg.train.bf16 and device.type == "cuda" else torch.float32

    task_name = config["task"]
    task = get_task(task_name, **cfg.task_options(task_name))
    reward_fn = get_reward(
        g.reward, bonus=g.correction_bonus, false_alarm_penalty=g.false_alarm_penalty
    )
    train_prompts: list[str] = config["train_prompts"]
    eval_prompts: list[str] = config["eval_prompts"]
    train_problems = [task.parse_prompt(p) for p in train_prompts]
    eval_problems = [task.parse_prompt(p) for p in eval_prompts]

    init_dir = _local_model_dir(config["init_model_path"])
    policy, tok = load_model(init_dir, dtype=dtype, device=device)
    ref, _ = load_model(init_dir, dtype=dtype, device=device)
    ref.requires_grad_(False)
    policy.train()
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=g.lr, weight_decay=g.weight_decay, betas=(0.9, 0.99)
    )
    n_micro = local_seqs // micro
    engine, *_ = deepspeed.initialize(
        model=policy,
        optimizer=optimizer,
        config=deepspeed_config(cfg, micro, n_micro, world),
    )

    def gathered():
        # ZeRO-3 shards parameters: gather them for generation and for the final save.
        if cfg.train.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
        return contextlib.nullcontext()

    history: list[dict[str, Any]] = []
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = json.loads(Path(d, STATE_FILE).read_text())
            start, history = int(state["step"]), list(state["history"])
            if Path(d, DS_TAG).exists():
                engine.load_checkpoint(d, tag=DS_TAG)
        if rank == 0:
            print(f"[grpo] {task_name}: resumed at step {start}")

    def heldout() -> dict[str, float]:
        """Greedy accuracy and reward on this worker's shard of held-out problems, summed."""
        if not eval_prompts:
            return {}
        mine = list(range(rank, len(eval_prompts), world))
        with gathered():
            texts = generate(
                engine.module,
                tok,
                [eval_prompts[i] + "\n" for i in mine],
                max_new_tokens=g.max_new_tokens,
                temperature=0.0,
                batch_size=64,
            )
        acc = sum(
            reward_answer(task, eval_problems[i], t) for i, t in zip(mine, texts, strict=True)
        )
        rew = sum(reward_fn(task, eval_problems[i], t) for i, t in zip(mine, texts, strict=True))
        acc, rew = _all_sum([acc, rew])
        n = len(eval_prompts)
        return {"heldout_accuracy": acc / n, "heldout_reward": rew / n}

    def report(step: int, metrics: dict[str, Any], final: bool) -> None:
        """Report this step; every checkpoint_every steps (and at the end) with a checkpoint."""
        due = final or (g.checkpoint_every and step % g.checkpoint_every == 0)
        if not due:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag=DS_TAG)  # every rank writes its shard
            if final:
                with gathered():
                    if rank == 0:
                        save_model(engine.module, tok, os.path.join(d, "model"))
            if rank == 0:
                Path(d, STATE_FILE).write_text(
                    json.dumps({"step": step, "history": history, "final": final})
                )
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))

    if start == 0 and not history:
        metrics = {"step": 0, **heldout()}
        history.append(metrics)
        if rank == 0:
            print(f"[grpo] {task_name}: before training {metrics}")
    t_start = time.time()
    step = start
    for step in range(start + 1, g.steps + 1):
        t0 = time.time()
        # Same prompts and seeds for a step whatever the number of workers.
        rng = stream_rng(cfg.seed, task_name, "grpo", step)
        idx = rng.choice(
            len(train_prompts),
            size=g.prompts_per_step,
            replace=len(train_prompts) < g.prompts_per_step,
        )
        seeds = rng.integers(0, 2**31 - 1, size=(g.prompts_per_step, g.group_size))
        lo, hi = rank * local_prompts, (rank + 1) * local_prompts
        my_idx = [int(i) for i in idx[lo:hi]]
        prefixes = [train_prompts[i] + "\n" for i in my_idx for _ in range(g.group_size)]
        problems = [train_problems[i] for i in my_idx for _ in range(g.group_size)]
        with gathered():
            completions = generate(
                engine.module,
                tok,
                prefixes,
                max_new_tokens=g.max_new_tokens,
                temperature=g.temperature,
                seeds=[int(s) for s in seeds[lo:hi].reshape(-1)],
                batch_size=max(64, local_seqs),
            )
        t_gen = time.time() - t0

        t1 = time.time()
        rewards = torch.tensor(
            [reward_fn(task, p, c) for p, c in zip(problems, completions, strict=True)],
            dtype=torch.float32,
        )  # [local_seqs], group after group
        adv = group_advantages(rewards, g.group_size)  # [local_seqs]
        batch = completion_batch(tok, prefixes, completions, g.max_new_tokens)
        batch = {k: v.to(device) for k, v in batch.items()}
        adv = adv.to(device)
        mask = batch["completion_mask"][:, 1:]  # [B, T-1] next-token positions in completions
        chunks = [slice(i, i + micro) for i in range(0, local_seqs, micro)]

        def sub(s: slice, batch: dict[str, torch.Tensor] = batch) -> dict[str, torch.Tensor]:
            return {k: v[s] for k, v in batch.items()}

        with torch.no_grad():
            ref_lp = [token_logprobs(ref, sub(s), temperature=g.temperature)[0] for s in chunks]
            old_lp = (
                [token_logprobs(engine, sub(s), temperature=g.temperature)[0] for s in chunks]
                if g.updates_per_batch > 1
                else None
            )
        kl_sum = ent_sum = clip_sum = loss_sum = 0.0
        for it in range(g.updates_per_batch):
            for j, s in enumerate(chunks):
                logp, ent = token_logprobs(
                    engine, sub(s), temperature=g.temperature, with_entropy=it == 0
                )
                old = old_lp[j] if old_lp is not None else logp.detach()
                loss, st = grpo_loss(logp, old, ref_lp[j], adv[s], mask[s], g.clip, g.kl_coef)
                engine.backward(loss)
                engine.step()
                if it == 0:
                    m = mask[s]
                    kl_sum += st["kl"] * float(m.sum())
                    ent_sum += float((ent * m).sum())
                    clip_sum += st["clip_fraction"] * float(m.sum())
                    loss_sum += float(loss.detach()) * (s.stop - s.start)
        t_upd = time.time() - t1

        n_tok = float(mask.sum())
        r = rewards.view(-1, g.group_size)
        sums = _all_sum(
            [
                float(rewards.sum()),
                float((rewards**2).sum()),
                float((r.std(1) == 0).sum()),
                kl_sum,
                ent_sum,
                clip_sum,
                loss_sum,
                n_tok,
                float(local_seqs),
            ]
        )
        tot_r, tot_r2, zero_std, kl, ent, clipf, loss_tot, tokens, n = sums
        mean_r = tot_r / n
        gen_s, upd_s = _all_max(t_gen), _all_max(t_upd)
        metrics = {
            "step": step,
            "reward_mean": mean_r,
            "reward_std": math.sqrt(max(tot_r2 / n - mean_r**2, 0.0)),
            "groups_without_signal": zero_std / (n / g.group_size),
            "kl": kl / tokens,
            "entropy": ent / tokens,
            "clip_fraction": clipf / tokens,
            "loss": loss_tot / n,
            "completion_tokens": tokens / n,
            "generation_s": gen_s,
            "update_s": upd_s,
            "step_s": time.time() - t0,
            "rollout_tokens_per_s": tokens / max(gen_s, 1e-9),
        }
        out_of_time = bool(g.max_minutes) and (time.time() - t_start) / 60 >= g.max_minutes
        out_of_time = _all_max(float(out_of_time)) > 0  # every rank stops at the same step
        final = step == g.steps or out_of_time
        if final or (g.eval_every and step % g.eval_every == 0):
            metrics.update(heldout())
        history.append(metrics)
        if rank == 0:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
            print(f"[grpo] {task_name} step {step}/{g.steps} {shown}")
        report(step, metrics, final)
        if final:
            break
    else:
        # Resumed after the last step had already been checkpointed: publish the model again.
        report(step, history[-1] if history else {"step": step}, True)


# ---------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------


def _ray_storage(output_dir: str) -> str:
    """Ray Train storage for this model's checkpoints: a hidden sibling of the model dir."""
    if io.is_uri(output_dir):
        return output_dir.rstrip("/") + "-ray"
    p = Path(output_dir).absolute()
    return str(p.with_name(f".{p.name}-ray"))


def train_grpo(cfg: Config, task_name: str, init_model_path: str, output_dir: str) -> dict:
    """Train GRPO from ``init_model_path`` and publish the model to ``output_dir`` atomically.

    Returns the final step's metrics (the full per-step history is written next
    to the model as metrics.json and metrics.parquet). Ray must be initialised.
    """
    import pyarrow as pa
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from selfcorrect.models import ModelPathError

    check_batch_shape(cfg)
    if not io.exists(io.join(init_model_path, "config.json")):
        raise ModelPathError(
            f"GRPO starts from the FT model, but {init_model_path!r} holds none; train it first "
            "(python -m rayjobs.train) or point grpo at another model directory"
        )
    data_dir = io.join(os.path.dirname(os.path.dirname(str(output_dir).rstrip("/"))), "data")
    train_tab = io.read_parquet(io.join(data_dir, "train.parquet"), required=["prompt"])
    test_tab = io.read_parquet(io.join(data_dir, "test.parquet"), required=["prompt"])
    eval_prompts = test_tab.column("prompt").to_pylist()[: cfg.grpo.eval_problems]
    world = _world_size(cfg)
    resources = {"CPU": cfg.train.cpus_per_worker}
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "task": task_name,
            "init_model_path": str(init_model_path),
            "train_prompts": train_tab.column("prompt").to_pylist(),
            "eval_prompts": eval_prompts,
        },
        scaling_config=ScalingConfig(
            num_workers=world, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=f"grpo-{task_name}-{grpo_hash(cfg, task_name)}",
            storage_path=_ray_storage(output_dir),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"GRPO for {task_name} finished without a final checkpoint")
    with result.checkpoint.as_directory() as d:
        state = json.loads(Path(d, STATE_FILE).read_text())
        history = state["history"]
        local_out = not io.is_uri(output_dir)
        stage = io.staging_dir(output_dir) if local_out else tempfile.mkdtemp(prefix="grpo-")
        shutil.rmtree(stage)
        shutil.copytree(Path(d, "model"), stage)
    Path(stage, "metrics.json").write_text(json.dumps(history, indent=2))
    cols = sorted({k for h in history for k in h})
    table = pa.table({c: [h.get(c) for h in history] for c in cols})
    import pyarrow.parquet as pq

    pq.write_table(table, str(Path(stage, "metrics.parquet")))
    if local_out:
        io.replace_dir(stage, output_dir)
    else:
        io.upload_dir(stage, output_dir)
        shutil.rmtree(stage, ignore_errors=True)
    # The published model supersedes the run's checkpoints.
    if not io.is_uri(output_dir):
        shutil.rmtree(_ray_storage(output_dir), ignore_errors=True)
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
            print(f"[grpo] {name}: {ctx.path(rel)} (last step {m})")

        run_stage(ctx, f"{name}/grpo", grpo_hash(cfg, name), build)


def main(argv: list[str] | None = None) -> None:
    ctx = parse_args(__doc__, argv)
    save_resolved_config(ctx)
    run(ctx)
    print(f"GRPO models written under {ctx.output_dir}/<task>/models/grpo/")


if __name__ == "__main__":
    main()
