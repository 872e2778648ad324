"""GRPO: verifier rewards, group-normalised advantages, the clipped-ratio + KL loss, the loop.

The pieces are plain functions, unit-tested on hand-written completions and a
tiny model. ``run_grpo`` is the per-worker loop: Ray Train's ``TorchTrainer``
runs it through ``train_loop_per_worker`` (``rayjobs/grpo.py`` is the job), and
``grpo_local`` runs the same loop in one plain process (benchmarks, notebooks).
It reuses the supervised trainer's engine (``selfcorrect.training.Engine``:
DeepSpeed ZeRO 1-3 from ``train.zero_stage``, or DDP at stage 0), sessions and
checkpoint layout, so GRPO checkpoints and resumes exactly like training.

Rewards are computed by the shared task verifier only (``selfcorrect.tasks``),
the same code that scores evaluation, so GRPO optimises exactly what eval
measures and nothing tuned to flatter it.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from selfcorrect import console
from selfcorrect.config import Config, ConfigError, config_from_dict
from selfcorrect.generation import Rollout
from selfcorrect.tasks import (
    Problem,
    Task,
    complete_lines,
    final_answer_correct,
    walk_trace,
)

# ---------------------------------------------------------------------------
# Rewards: (task, problem, completion text) -> float. Selected by cfg.grpo.reward.
# ---------------------------------------------------------------------------

RewardFn = Callable[[Task, Problem, str], float]


def reward_answer(task: Task, problem: Problem, completion: str) -> float:
    """1.0 when the first ANSWER line is right, else 0.0 (the metric eval reports)."""
    return 1.0 if final_answer_correct(task, problem, completion) else 0.0


def reward_steps(task: Task, problem: Problem, completion: str) -> float:
    """Fraction of verified steps: correct steps / max(steps written, golden steps).

    The denominator includes the golden length so that stopping after one
    correct step does not earn a full reward, and wrong (or malformed) steps
    count against it so padding a trace with junk does not either.
    """
    events = walk_trace(task, problem, complete_lines(completion))
    steps = [e for e in events if e.kind in ("step_ok", "step_wrong")]
    n_ok = sum(e.kind == "step_ok" for e in steps)
    denom = max(len(steps), len(task.golden_steps(problem)), 1)
    return n_ok / denom


@dataclass(frozen=True)
class SelfCorrectionCounts:
    """What a completion did around its recognition lines (see ``self_correction_counts``)."""

    corrections: int  # real wrong step -> recognition -> a correct step for the state before it
    false_alarms: int  # recognition after a correct step (or with no step before it)
    wrong_steps: int  # every wrong or malformed step line, fixed or not (parrots included)


def self_correction_counts(task: Task, problem: Problem, completion: str) -> SelfCorrectionCounts:
    """Count wrong steps, real corrections and false alarms with the shared verifier's line walk."""
    events = walk_trace(task, problem, complete_lines(completion))
    corrections = false_alarms = 0
    for i, ev in enumerate(events):
        if ev.kind != "recognition":
            continue
        prev = events[i - 1] if i > 0 else None
        if prev is None or prev.kind != "step_wrong":
            false_alarms += 1
            continue
        # walk_trace retracts the wrong step on recognition, so the next line is judged
        # against the state before the mistake: step_ok there is a real fix (a parrot is not).
        nxt = events[i + 1] if i + 1 < len(events) else None
        if nxt is not None and nxt.kind == "step_ok":
            corrections += 1
    wrong_steps = sum(ev.kind == "step_wrong" for ev in events)
    return SelfCorrectionCounts(corrections, false_alarms, wrong_steps)


FIXED_ERROR_COST = 0.1  # what a wrong step still costs after it was recognised and fixed


def make_reward_self_correction(
    bonus: float = 0.5,
    false_alarm_penalty: float = 0.5,
    fixed_error_cost: float = FIXED_ERROR_COST,
) -> RewardFn:
    """Answer reward, minus a cost per wrong step that fixing reduces but never cancels.

        reward = answer (1 or 0)
                 - fixed_error_cost                * (wrong steps that were fixed)
                 - (fixed_error_cost + bonus)      * (wrong steps left standing)
                 - false_alarm_penalty             * (recognitions after a correct step)

    A wrong step is fixed when the recognition line follows it and the next line is a
    correct step for the state before it (``self_correction_counts``); a parrot of the
    wrong step after the recognition is itself another wrong step. The ordering this gives:

    * the clean correct trace scores 1.0, the most any completion can score;
    * the same trace with a mistake recognised and fixed scores 1.0 - ``fixed_error_cost``:
      a correct recovery is never worth more than not erring, so planting mistakes in
      order to fix them always lowers the reward (``fixed_error_cost`` must be > 0);
    * the mistake left standing costs ``bonus`` more again, even when the answer line
      still comes out right, so among completions that erred, recovering pays.

    Each term is counted per step (not once per completion), so nothing can be farmed:
    every extra mistake costs at least ``fixed_error_cost``.
    """
    if fixed_error_cost <= 0:
        raise ValueError(
            f"fixed_error_cost must be > 0 (got {fixed_error_cost}): otherwise a planted, "
            "fixed mistake scores as much as the clean trace"
        )
    if bonus < 0 or false_alarm_penalty < 0:
        raise ValueError("bonus and false_alarm_penalty must be >= 0")

    def reward_self_correction(task: Task, problem: Problem, completion: str) -> float:
        c = self_correction_counts(task, problem, completion)
        left_standing = c.wrong_steps - c.corrections  # >= 0: each fix follows its own wrong step
        return (
            reward_answer(task, problem, completion)
            - fixed_error_cost * c.corrections
            - (fixed_error_cost + bonus) * left_standing
            - false_alarm_penalty * c.false_alarms
        )

    return reward_self_correction


REWARDS = ("answer", "steps", "self_correction")


def get_reward(
    name: str,
    *,
    bonus: float = 0.5,
    false_alarm_penalty: float = 0.5,
    fixed_error_cost: float = FIXED_ERROR_COST,
) -> RewardFn:
    """The reward function named by ``cfg.grpo.reward``."""
    if name == "answer":
        return reward_answer
    if name == "steps":
        return reward_steps
    if name == "self_correction":
        return make_reward_self_correction(bonus, false_alarm_penalty, fixed_error_cost)
    raise ValueError(
        f"unknown GRPO reward {name!r}; set grpo.reward to one of {', '.join(REWARDS)}"
    )


# ---------------------------------------------------------------------------
# Advantages and loss.
# ---------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps) for rewards laid out group after group.

    rewards: [n_groups * group_size] -> advantages of the same shape. A group whose
    samples all scored the same carries no signal and gets advantage 0.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)  # [n_groups, G]
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=True)
    return ((r - mean) / (std + eps)).view(-1)


def completion_batch(rollouts: Sequence[Rollout], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt + sampled token ids, right-padded, with a mask over exactly the sampled tokens.

    The completion is ``Rollout.token_ids``, the ids the sampler drew, never the text
    re-tokenised (a BPE tokenizer can segment decoded text differently, which would train
    on tokens the policy never sampled). Nothing is appended: an EOS is in the completion,
    and so gets the policy gradient and the KL term, only where the sampler drew it
    (``Rollout.sampled_eos``), not after a rollout that stopped at its ANSWER line, at
    ``max_new_tokens`` or at full context.
    Returns input_ids / attention_mask / completion_mask, each [B, T].
    """
    B = len(rollouts)
    T = max(len(r.prompt_ids) + len(r.token_ids) for r in rollouts)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    comp_mask = torch.zeros((B, T), dtype=torch.float32)
    for i, r in enumerate(rollouts):
        p, n = len(r.prompt_ids), len(r.prompt_ids) + len(r.token_ids)
        input_ids[i, :n] = torch.tensor(r.prompt_ids + r.token_ids, dtype=torch.long)
        attention[i, :n] = 1
        comp_mask[i, p:n] = 1.0  # the sampled tokens; padding after them stays 0
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": comp_mask}


def token_logprobs(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of every next token (and optionally the policy entropy there).

    Logits are divided by the rollout ``temperature`` so the ratio and KL are those
    of the distribution the completions were actually sampled from.
    Returns logp [B, T-1] (position t scores token t+1) and entropy [B, T-1] or None.
    """
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).logits  # [B, T, V]
    logits = logits[:, :-1].float() / temperature  # [B, T-1, V]
    logp_all = F.log_softmax(logits, dim=-1)
    target = batch["input_ids"][:, 1:]  # [B, T-1]
    logp = logp_all.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)  # [B, T-1]
    return logp, entropy


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    kl_coef: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped-ratio policy loss with a KL penalty to the reference model (DeepSeekMath GRPO).

    logp / old_logp / ref_logp / mask: [B, T] over next-token positions (mask = 1 on
    completion tokens); advantages: [B]. The KL is the unbiased k3 estimator
    exp(ref - logp) - (ref - logp) - 1 >= 0. Each sequence's token mean is averaged
    over the batch, so long and short completions weigh the same per sample.
    """
    # Mask the log-ratios *before* exponentiating: a position outside the completion (padding)
    # can hold any logit gap, exp of a large one is inf, and inf * 0 is nan in the loss and its
    # gradient. At masked positions ratio = 1 and kl = 0, and torch.where passes no gradient.
    keep = mask > 0  # [B, T] bool
    ratio = torch.exp(torch.where(keep, logp - old_logp, 0.0))  # [B, T]
    adv = advantages.unsqueeze(1)  # [B, 1]
    surr = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    d = torch.where(keep, ref_logp - logp, 0.0)  # [B, T]
    kl = torch.exp(d) - d - 1  # [B, T]
    per_token = -(surr - kl_coef * kl)
    n_tok = mask.sum(1).clamp_min(1.0)  # [B]
    loss = ((per_token * mask).sum(1) / n_tok).mean()
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip).float()
        total = mask.sum().clamp_min(1.0)
        stats = {
            "kl": float((kl * mask).sum() / total),
            "clip_fraction": float((clipped * mask).sum() / total),
        }
    return loss, stats


# ---------------------------------------------------------------------------
# The loop (one copy per data-parallel worker)
# ---------------------------------------------------------------------------


def grpo_world_size(cfg: Config) -> int:
    return cfg.grpo.num_workers or cfg.train.num_workers


def check_batch_shape(cfg: Config, world: int | None = None) -> tuple[int, int, int]:
    """(prompts per worker, sequences per worker, micro batch): clear error if they do not split."""
    g = cfg.grpo
    world = world or grpo_world_size(cfg)
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
            "sequences per worker (prompts_per_step / workers * group_size)"
        )
    return local_prompts, local_seqs, micro


def _engine_cfg(cfg: Config, micro: int) -> Config:
    """The train section the shared Engine reads, with GRPO's optimizer settings.

    Constant learning rate: warmup 0 and a decay horizon far beyond the run (the
    Engine's schedule is cosine to 10% at ``max_steps``).
    """
    g = cfg.grpo
    train = dataclasses.replace(
        cfg.train,
        lr=g.lr,
        weight_decay=g.weight_decay,
        micro_batch_size=micro,
        warmup_steps=0,
        max_steps=10**9,
    )
    return dataclasses.replace(cfg, train=train)


def run_grpo(config: dict[str, Any], session: Any) -> dict[str, Any]:
    """The GRPO loop. ``config``: cfg (Config.to_dict()), task, train_prompts, eval_prompts,
    init_model_path, and optionally max_steps. ``session``: ``selfcorrect.training``'s
    RaySession or LocalSession. Returns the last metrics.

    Per step: the step's prompts and sampling seeds come from (seed, task, step) only,
    so the run does not depend on the number of workers and a resumed run replays
    exactly what an uninterrupted one would. Each worker samples ``group_size``
    completions for its prompts with the KV-cached generator, scores them with the
    verifier, and takes ``updates_per_batch`` optimizer steps on them.
    """
    from selfcorrect.data import stream_rng
    from selfcorrect.generation import generate, generate_rollouts
    from selfcorrect.models import load_model, resolve_attention, resolve_bf16
    from selfcorrect.tasks import get_task
    from selfcorrect.training import (
        Engine,
        _all_max,
        _all_sum,
        _autocast,
        build_training_model,
        report_checkpoint,
        resume_from_checkpoint,
    )

    cfg = config_from_dict(config["cfg"])
    g = cfg.grpo
    rank, world = session.rank, session.world
    use_ray = type(session).__name__ == "RaySession"
    local_prompts, local_seqs, micro = check_batch_shape(cfg, world)
    n_micro = local_seqs // micro
    torch.set_num_threads(max(1, cfg.train.cpus_per_worker))
    if cfg.train.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    bf16 = resolve_bf16(cfg.train.bf16, device)
    attention = resolve_attention(cfg.train.attention, device, bf16)
    torch.manual_seed(cfg.seed + rank)

    task_name = config["task"]
    task = get_task(task_name, **cfg.task_options(task_name))
    reward_fn = get_reward(
        g.reward, bonus=g.correction_bonus, false_alarm_penalty=g.false_alarm_penalty
    )
    train_prompts: list[str] = list(config["train_prompts"])
    eval_prompts: list[str] = list(config.get("eval_prompts") or [])
    train_problems = [task.parse_prompt(p) for p in train_prompts]
    eval_problems = [task.parse_prompt(p) for p in eval_prompts]

    init_dir = _local_model_dir(config["init_model_path"])
    model, tok = build_training_model(cfg, init_dir, attention)  # LoRA adapters if model.lora
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.to(device)
    ref, _ = load_model(init_dir, device=device)
    ref.set_attn_implementation(attention)  # the policy's arithmetic: KL 0 before any update
    ref.requires_grad_(False)
    engine = Engine(_engine_cfg(cfg, micro), model, world, n_micro, use_ray)

    start, history, resumes = resume_from_checkpoint(session, engine, rank, f"[grpo] {task_name}")
    max_steps = int(config.get("max_steps") or g.steps)

    def heldout() -> dict[str, float]:
        """Greedy accuracy and reward on held-out problems (sharded over workers)."""
        if not eval_prompts:
            return {}
        mine = list(range(rank, len(eval_prompts), world))
        with engine.gathered():
            texts = generate(
                engine.module,
                tok,
                [eval_prompts[i] + "\n" for i in mine],
                max_new_tokens=g.max_new_tokens,
                temperature=0.0,
            )
        acc = sum(
            reward_answer(task, eval_problems[i], t) for i, t in zip(mine, texts, strict=True)
        )
        rew = sum(reward_fn(task, eval_problems[i], t) for i, t in zip(mine, texts, strict=True))
        acc, rew = _all_sum([acc, rew])
        return {
            "heldout_accuracy": acc / len(eval_prompts),
            "heldout_reward": rew / len(eval_prompts),
        }

    def checkpoint(step: int, metrics: dict[str, Any], final: bool) -> None:
        report_checkpoint(engine, tok, cfg, session, rank, step, metrics, history, final, resumes)

    if start == 0 and not history:
        first = {"step": 0, **heldout(), "bf16": bf16}  # every row names its precision
        history.append(first)
        if rank == 0:
            print(f"[grpo] {task_name}: before training {first}", flush=True)
    t_start = time.time()
    last: dict[str, Any] = history[-1]
    step = start
    progress = console.Progress(config.get("console") if rank == 0 else None)
    progress.total(max_steps)
    progress.done(start)
    for step in range(start + 1, max_steps + 1):
        t0 = time.time()
        rng = stream_rng(cfg.seed, task_name, "grpo", step)
        idx = rng.choice(
            len(train_prompts),
            size=g.prompts_per_step,
            replace=len(train_prompts) < g.prompts_per_step,
        )
        seeds = rng.integers(0, 2**31 - 1, size=(g.prompts_per_step, g.group_size))
        lo, hi = rank * local_prompts, (rank + 1) * local_prompts
        mine = [int(i) for i in idx[lo:hi]]
        prefixes = [train_prompts[i] + "\n" for i in mine for _ in range(g.group_size)]
        problems = [train_problems[i] for i in mine for _ in range(g.group_size)]
        with engine.gathered():
            rollouts = generate_rollouts(
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
        # Rewards read the text; the loss scores the ids the sampler drew (completion_batch).
        rewards = torch.tensor(
            [reward_fn(task, p, r.text) for p, r in zip(problems, rollouts, strict=True)]
        )  # [local_seqs], group after group
        adv = group_advantages(rewards, g.group_size).to(device)  # [local_seqs]
        batch = completion_batch(rollouts, pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        mask = batch["completion_mask"][:, 1:]  # [B, T-1]: next-token positions in completions
        chunks = [slice(i, i + micro) for i in range(0, local_seqs, micro)]

        def sub(s: slice, batch: dict[str, torch.Tensor] = batch) -> dict[str, torch.Tensor]:
            return {k: v[s] for k, v in batch.items()}

        with torch.no_grad(), _autocast(device, bf16):
            ref_lp = [token_logprobs(ref, sub(s), g.temperature)[0] for s in chunks]
            old_lp = (
                [token_logprobs(engine.wrapped, sub(s), g.temperature)[0] for s in chunks]
                if g.updates_per_batch > 1
                else None
            )
        kl_sum = ent_sum = clip_sum = loss_sum = 0.0
        for it in range(g.updates_per_batch):
            for j, s in enumerate(chunks):
                last_micro = j == len(chunks) - 1
                with engine.no_sync(last_micro):
                    with _autocast(device, bf16):
                        logp, ent = token_logprobs(
                            engine.wrapped, sub(s), g.temperature, with_entropy=it == 0
                        )
                    old = old_lp[j] if old_lp is not None else logp.detach()
                    loss, st = grpo_loss(logp, old, ref_lp[j], adv[s], mask[s], g.clip, g.kl_coef)
                    # each micro-batch's loss is its sequence mean: /n_micro makes the step's
                    # gradient the mean over this worker's sequences (workers are averaged)
                    engine.backward(loss / n_micro)
                if not last_micro:
                    engine.micro_step()
                n_m = float(mask[s].sum())
                if it == 0:  # the rollout policy's KL, entropy and loss
                    kl_sum += st["kl"] * n_m
                    ent_sum += float((ent * mask[s]).sum())
                    loss_sum += float(loss.detach()) * (s.stop - s.start)
                if it == g.updates_per_batch - 1:  # clipping only happens on later updates
                    clip_sum += st["clip_fraction"] * n_m
            grad_norm = engine.step()
        t_upd = time.time() - t1

        r = rewards.view(-1, g.group_size)
        tot_r, tot_r2, no_signal, kl, ent, clipf, loss_tot, tokens, n = _all_sum(
            [
                float(rewards.sum()),
                float((rewards**2).sum()),
                float((r.std(1) == 0).sum()),
                kl_sum,
                ent_sum,
                clip_sum,
                loss_sum,
                float(mask.sum()),
                float(local_seqs),
            ]
        )
        mean_r = tot_r / n
        gen_s, upd_s = _all_max(t_gen), _all_max(t_upd)
        last = {
            "step": step,
            "reward_mean": mean_r,
            "reward_std": math.sqrt(max(tot_r2 / n - mean_r**2, 0.0)),
            "groups_without_signal": no_signal / (n / g.group_size),
            "kl": kl / tokens,
            "entropy": ent / tokens,
            "clip_fraction": clipf / tokens,
            "loss": loss_tot / n,
            "grad_norm": grad_norm,
            "completion_tokens": tokens / n,
            "generation_s": gen_s,
            "update_s": upd_s,
            "step_s": time.time() - t0,
            "rollout_tokens_per_s": tokens / max(gen_s, 1e-9),
            "bf16": bf16,
        }
        out_of_time = bool(g.max_minutes) and (time.time() - t_start) / 60 >= g.max_minutes
        out_of_time = _all_max(float(out_of_time)) > 0  # every rank stops at the same step
        final = step == max_steps or out_of_time
        if final or (g.eval_every and step % g.eval_every == 0):
            last.update(heldout())
        history.append(last)
        progress.done(step)
        if rank == 0:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()}
            print(f"[grpo] {task_name} step {step}/{max_steps} {shown}", flush=True)
        if final or (g.checkpoint_every and step % g.checkpoint_every == 0):
            checkpoint(step, last, final)
        else:
            session.report(last)
        if final:
            break
    else:
        # Resumed after the final checkpoint had been written: publish the model again.
        checkpoint(step, last, True)
    return last


def _local_model_dir(path: str) -> str:
    """A model dir this worker can read: local paths as they are, URIs downloaded to a temp dir."""
    from selfcorrect import io

    if not io.is_uri(path):
        return path
    import pyarrow.fs as pafs

    dst = tempfile.mkdtemp(prefix="grpo-init-")
    fs, p = pafs.FileSystem.from_uri(path)
    pafs.copy_files(p, dst, source_filesystem=fs)
    return dst


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker, ...)``)."""
    from selfcorrect.training import RaySession

    console.attach_worker(config.get("console"))  # quiet mode: output to the stage's log
    run_grpo(config, RaySession())


def grpo_local(
    cfg: Config,
    task_name: str,
    train_prompts: list[str],
    init_model_path: str,
    *,
    eval_prompts: list[str] | None = None,
    max_steps: int | None = None,
    checkpoint_root: str | None = None,
) -> tuple[dict[str, Any], Any]:
    """Run the GRPO loop in this process (one worker, no Ray): benchmarks and notebooks.

    Returns (last metrics, LocalSession); the final model is in ``<session.latest>/model``.
    """
    from selfcorrect.training import LocalSession

    session = LocalSession(checkpoint_root)
    config = {
        "cfg": cfg.to_dict(),
        "task": task_name,
        "train_prompts": list(train_prompts),
        "eval_prompts": list(eval_prompts or []),
        "init_model_path": init_model_path,
        "max_steps": max_steps,
    }
    return run_grpo(config, session), session
