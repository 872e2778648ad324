"""GRPO pieces that do not need Ray: verifier rewards, group-normalised advantages, the loss.

The training loop that uses them (rollouts on Ray Train workers, DeepSpeed
updates, checkpoints) lives in ``rayjobs/grpo.py``; everything here is a plain
function so it can be unit-tested on hand-written completions and a tiny model.

Rewards are computed by the shared task verifier only (``selfcorrect.tasks``),
the same code that scores evaluation, so GRPO optimises exactly what eval
measures and nothing tuned to flatter it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfcorrect.tasks import (
    Problem,
    Task,
    final_answer_correct,
    split_lines,
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
    events = walk_trace(task, problem, split_lines(completion))
    steps = [e for e in events if e.kind in ("step_ok", "step_wrong")]
    n_ok = sum(e.kind == "step_ok" for e in steps)
    denom = max(len(steps), len(task.golden_steps(problem)), 1)
    return n_ok / denom


@dataclass(frozen=True)
class SelfCorrectionCounts:
    """What a completion did around its recognition lines (see ``self_correction_counts``)."""

    corrections: int  # real wrong step -> recognition -> a correct step for the state before it
    false_alarms: int  # recognition after a correct step (or with no step before it)


def self_correction_counts(task: Task, problem: Problem, completion: str) -> SelfCorrectionCounts:
    """Count real corrections and false alarms with the shared verifier's line walk."""
    events = walk_trace(task, problem, split_lines(completion))
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
    return SelfCorrectionCounts(corrections, false_alarms)


def make_reward_self_correction(bonus: float = 0.5, false_alarm_penalty: float = 0.5) -> RewardFn:
    """Answer reward + ``bonus`` if the completion fixed at least one real wrong step,
    minus ``false_alarm_penalty`` per recognition line that followed a correct step.

    The bonus is paid once per completion, not per fix, so the policy cannot farm
    it by making mistakes on purpose and correcting them.
    """

    def reward_self_correction(task: Task, problem: Problem, completion: str) -> float:
        c = self_correction_counts(task, problem, completion)
        r = reward_answer(task, problem, completion)
        return r + (bonus if c.corrections > 0 else 0.0) - false_alarm_penalty * c.false_alarms

    return reward_self_correction


REWARDS = ("answer", "steps", "self_correction")


def get_reward(name: str, *, bonus: float = 0.5, false_alarm_penalty: float = 0.5) -> RewardFn:
    """The reward function named by ``cfg.grpo.reward``."""
    if name == "answer":
        return reward_answer
    if name == "steps":
        return reward_steps
    if name == "self_correction":
        return make_reward_self_correction(bonus, false_alarm_penalty)
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


def completion_batch(
    tokenizer, prefixes: list[str], completions: list[str], max_new_tokens: int
) -> dict[str, torch.Tensor]:
    """Prefix + completion token ids, right-padded, with a mask over the completion tokens.

    An EOS token is appended to completions that stopped before ``max_new_tokens``
    (they ended on EOS), so the policy is also trained on when to stop.
    Returns input_ids / attention_mask / completion_mask, each [B, T].
    """
    eos = tokenizer.eos_token_id
    rows: list[tuple[list[int], list[int]]] = []
    for prefix, comp in zip(prefixes, completions, strict=True):
        p = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        c = tokenizer(comp, add_special_tokens=False)["input_ids"][:max_new_tokens]
        if len(c) < max_new_tokens:
            c = c + [eos]
        rows.append((p, c))
    T = max(len(p) + len(c) for p, c in rows)
    B = len(rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    input_ids = torch.full((B, T), pad, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    comp_mask = torch.zeros((B, T), dtype=torch.float32)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(p + c)
        attention[i, :n] = 1
        comp_mask[i, len(p) : n] = 1.0
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
    ratio = torch.exp(logp - old_logp)  # [B, T]
    adv = advantages.unsqueeze(1)  # [B, 1]
    surr = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    d = ref_logp - logp
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
