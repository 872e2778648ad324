"""GRPO without Ray: verifier rewards on hand-written completions, advantages, and the update."""

from __future__ import annotations

import pytest
import torch

from selfcorrect.grpo import (
    completion_batch,
    get_reward,
    group_advantages,
    grpo_loss,
    reward_answer,
    reward_steps,
    self_correction_counts,
    token_logprobs,
)
from selfcorrect.models import build_model
from selfcorrect.tasks import RECOGNITION_LINE, get_task

MUL = get_task("multiplication", digits_a=2, digits_b=2)
PROB = MUL.parse_prompt("86*67")  # golden: 86*7=602, 86*60=5160, 602+5160=5762
GOLD = "86*7=602\n86*60=5160\n602+5160=5762\nANSWER 5762\n"
R = RECOGNITION_LINE


def test_answer_reward_uses_first_answer_line():
    assert reward_answer(MUL, PROB, GOLD) == 1.0
    assert reward_answer(MUL, PROB, "86*7=602\nANSWER 5762\n") == 1.0  # answer only is enough
    assert reward_answer(MUL, PROB, "ANSWER 5763\nANSWER 5762\n") == 0.0
    assert reward_answer(MUL, PROB, "86*7=602\n86*60=5160\n") == 0.0  # truncated, no answer


def test_steps_reward_is_fraction_of_verified_steps():
    assert reward_steps(MUL, PROB, GOLD) == pytest.approx(1.0)
    # one correct step and a stop: 1 of the 3 golden steps
    assert reward_steps(MUL, PROB, "86*7=602\n") == pytest.approx(1 / 3)
    # wrong partial product, then the sum of what was written (right given the wrong value)
    assert reward_steps(MUL, PROB, "86*7=602\n86*60=5170\n602+5170=5772\nANSWER 5772\n") == (
        pytest.approx(2 / 3)
    )
    # junk lines count against the reward
    assert reward_steps(MUL, PROB, GOLD.replace("ANSWER", "xx\nyy\nzz\nANSWER")) == pytest.approx(
        3 / 6
    )
    assert reward_steps(MUL, PROB, "") == 0.0


def test_self_correction_counts_and_reward():
    fixed = f"86*7=602\n86*60=5170\n{R}\n86*60=5160\n602+5160=5762\nANSWER 5762\n"
    parrot = f"86*7=602\n86*60=5170\n{R}\n86*60=5170\n602+5170=5772\nANSWER 5772\n"
    false_alarm = f"86*7=602\n{R}\n86*7=602\n86*60=5160\n602+5160=5762\nANSWER 5762\n"
    assert self_correction_counts(MUL, PROB, fixed).corrections == 1
    assert self_correction_counts(MUL, PROB, parrot).corrections == 0
    assert self_correction_counts(MUL, PROB, false_alarm).false_alarms == 1
    assert self_correction_counts(MUL, PROB, GOLD) == self_correction_counts(MUL, PROB, GOLD)
    assert self_correction_counts(MUL, PROB, GOLD).corrections == 0

    rew = get_reward("self_correction", bonus=0.5, false_alarm_penalty=0.25)
    assert rew(MUL, PROB, GOLD) == pytest.approx(1.0)
    assert rew(MUL, PROB, fixed) == pytest.approx(1.5)
    assert rew(MUL, PROB, parrot) == pytest.approx(0.0)
    assert rew(MUL, PROB, false_alarm) == pytest.approx(0.75)
    # the bonus is paid once, so making and fixing mistakes on purpose does not pay twice
    twice = f"86*7=603\n{R}\n86*7=602\n86*60=5170\n{R}\n86*60=5160\n602+5160=5762\nANSWER 5762\n"
    assert self_correction_counts(MUL, PROB, twice).corrections == 2
    assert rew(MUL, PROB, twice) == pytest.approx(1.5)


def test_rewards_on_sudoku():
    sud = get_task("sudoku", min_empty=4, max_empty=6)
    prob = sud.parse_prompt("41.3 .3.1 3.14 1..2")
    gold = "\n".join(sud.golden_steps(prob)) + "\n" + sud.answer_line(prob) + "\n"
    assert reward_answer(sud, prob, gold) == 1.0
    assert reward_steps(sud, prob, gold) == pytest.approx(1.0)
    bad = gold.replace("r1c3=2", "r1c3=4")  # conflicts with its row: invalid
    assert reward_steps(sud, prob, bad) < 1.0
    assert reward_answer(sud, prob, bad) == 1.0  # the answer line alone decides this reward
    assert reward_answer(sud, prob, gold.replace("ANSWER 4123", "ANSWER 4423")) == 0.0


def test_unknown_reward_is_a_clear_error():
    with pytest.raises(ValueError, match="grpo.reward"):
        get_reward("accuracy")


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    a = group_advantages(r, 4)
    assert a.shape == (8,)
    assert a[0] > 0 and torch.all(a[1:4] < 0)
    assert torch.allclose(a[:4].sum(), torch.tensor(0.0), atol=1e-5)
    assert torch.all(a[4:] == 0)  # a group with one reward teaches nothing
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_loss_clips_ratio_and_kl_is_zero_at_reference():
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.ones(2, 3)
    adv = torch.tensor([1.0, -1.0])
    loss, stats = grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, clip=0.2, kl_coef=0.1)
    assert stats["kl"] == pytest.approx(0.0)
    loss.backward()
    assert torch.all(logp.grad[0] < 0) and torch.all(logp.grad[1] > 0)  # descend: up for A>0
    # ratio far above 1 + clip with a positive advantage: the clipped term has no gradient
    logp2 = torch.full((1, 3), 1.0, requires_grad=True)
    loss2, stats2 = grpo_loss(
        logp2, torch.zeros(1, 3), logp2.detach(), torch.tensor([1.0]), torch.ones(1, 3), 0.2, 0.0
    )
    loss2.backward()
    assert stats2["clip_fraction"] == 1.0
    assert torch.all(logp2.grad == 0)


def _seq_logp(model, batch):
    logp, _ = token_logprobs(model, batch)
    return (logp * batch["completion_mask"][:, 1:]).sum(1)  # [B]


def test_update_moves_probability_toward_higher_reward_samples():
    torch.manual_seed(0)
    model, tok = build_model("nano", max_length=64, seed=0)
    prefix = MUL.prompt(PROB) + "\n"
    completions = [GOLD, "86*7=612\nANSWER 612\n", "ANSWER 1\n", "86*60=5160\nANSWER 5160\n"]
    rewards = torch.tensor([reward_answer(MUL, PROB, c) for c in completions])
    assert rewards.tolist() == [1.0, 0.0, 0.0, 0.0]
    batch = completion_batch(tok, [prefix] * 4, completions, max_new_tokens=64)
    adv = group_advantages(rewards, 4)
    mask = batch["completion_mask"][:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    with torch.no_grad():
        before = _seq_logp(model, batch)
        ref, _ = token_logprobs(model, batch)
    for _ in range(3):
        logp, ent = token_logprobs(model, batch, with_entropy=True)
        loss, _ = grpo_loss(logp, logp.detach(), ref, adv, mask, clip=0.2, kl_coef=0.04)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = _seq_logp(model, batch)
    delta = after - before
    assert delta[0] > 0, delta  # the rewarded sample became more likely
    assert torch.all(delta[1:] < delta[0])
    assert delta[1:].mean() < 0  # the unrewarded ones less likely on average
    assert ent is not None and torch.all(ent >= 0)


def test_completion_batch_masks_only_completion_and_appends_eos():
    _, tok = build_model("nano", max_length=64)
    b = completion_batch(tok, ["12*34\n", "1*2\n"], ["ab", "abcdef"], max_new_tokens=6)
    # first: 6 prefix tokens + 2 completion + EOS; second: 4 prefix + 6 completion (cap, no EOS)
    assert b["completion_mask"][0].tolist() == [0] * 6 + [1] * 3 + [0]
    assert b["input_ids"][0, 8].item() == tok.eos_token_id
    assert b["completion_mask"][1].tolist() == [0] * 4 + [1] * 6
    assert b["attention_mask"].sum(1).tolist() == [9, 10]
