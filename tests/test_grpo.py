"""GRPO without Ray: verifier rewards on hand-written completions, advantages, and the update."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfcorrect.generation import Rollout, generate, generate_rollouts
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
from selfcorrect.tasks import RECOGNITION_LINE, get_task, sample_error, walk_trace

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

    c = self_correction_counts(MUL, PROB, parrot)
    assert (c.wrong_steps, c.corrections) == (2, 0)  # the parrot is a second wrong step

    rew = get_reward("self_correction", bonus=0.5, false_alarm_penalty=0.25, fixed_error_cost=0.1)
    assert rew(MUL, PROB, GOLD) == pytest.approx(1.0)
    assert rew(MUL, PROB, fixed) == pytest.approx(1.0 - 0.1)  # never above the clean trace
    assert rew(MUL, PROB, parrot) == pytest.approx(0.0 - 2 * (0.1 + 0.5))
    assert rew(MUL, PROB, false_alarm) == pytest.approx(0.75)
    # every planted-and-fixed mistake costs again: making mistakes on purpose never pays
    twice = f"86*7=603\n{R}\n86*7=602\n86*60=5170\n{R}\n86*60=5160\n602+5160=5762\nANSWER 5762\n"
    assert self_correction_counts(MUL, PROB, twice).corrections == 2
    assert rew(MUL, PROB, twice) == pytest.approx(1.0 - 2 * 0.1)
    with pytest.raises(ValueError, match="fixed_error_cost"):
        get_reward("self_correction", fixed_error_cost=0.0)


def _plant(task, problem, lines, positions, rng):
    """``lines`` with a synthetic wrong step + the recognition line inserted before each step
    at ``positions``: the step that was there follows, as the fix (the DESIGN's injected error)."""
    events = walk_trace(task, problem, lines)
    out = []
    for ev in events:
        if ev.index in positions:
            assert ev.kind in ("step_ok", "step_wrong"), ev
            wrong, _ = sample_error(task, ev.state_before, rng)
            assert not task.check_step(ev.state_before, wrong)  # a real mistake
            out += [wrong, R]
        out.append(ev.line)
    return out


def _text(lines):
    return "".join(line + "\n" for line in lines)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("multiplication", {"digits_a": 2, "digits_b": 2}),
        ("multiplication", {"digits_a": 4, "digits_b": 3}),
        ("sudoku", {"min_empty": 4, "max_empty": 8}),
    ],
)
def test_self_correction_reward_never_pays_for_a_planted_mistake(name, options):
    """Property: a mistake + recognition + fix never raises the reward, whatever the trace.

    Bases: the clean golden trace (the best possible score, 1.0), the same trace with a wrong
    answer, with an uncorrected wrong step, and with a correction already in it. Planting
    one or two more errors (each recognised and fixed) anywhere must lower the reward.
    """
    task = get_task(name, **options)
    rew = get_reward("self_correction")  # the config defaults
    rng = np.random.default_rng(0)
    for _ in range(4):
        prob = task.sample_problem(rng)
        steps = task.golden_steps(prob)
        gold = steps + [task.answer_line(prob)]
        wrong_step, _ = sample_error(task, walk_trace(task, prob, gold)[0].state_before, rng)
        bases = [
            gold,
            steps + ["ANSWER 0"],
            [wrong_step] + gold[1:],  # uncorrected mistake at the first step
            _plant(task, prob, gold, {0}, rng),  # already corrected once
        ]
        assert rew(task, prob, _text(gold)) == pytest.approx(1.0)
        for base in bases:
            r_base = rew(task, prob, _text(base))
            assert r_base <= 1.0 + 1e-9
            step_lines = [
                e.index for e in walk_trace(task, prob, base) if e.kind in ("step_ok", "step_wrong")
            ]
            plants = [{i} for i in step_lines] + [
                set(rng.choice(step_lines, size=min(2, len(step_lines)), replace=False).tolist())
                for _ in range(3)
            ]
            for pos in plants:
                planted = _text(_plant(task, prob, base, pos, rng))
                assert rew(task, prob, planted) < r_base, (base, pos, planted)


def test_self_correction_reward_ranks_clean_above_recovered_above_uncorrected():
    rew = get_reward("self_correction", bonus=0.5, false_alarm_penalty=0.25)
    fix = f"{R}\n86*60=5160\n"
    # (recognised and fixed, left standing): the same slip, the same lines after it
    pairs = [
        ("86*7=602\n86*60=5170\n" + fix + "602+5160=5762\nANSWER 5762\n",
         "86*7=602\n86*60=5170\n602+5160=5762\nANSWER 5762\n"),  # right answer anyway
        ("86*7=602\n86*60=5170\n" + fix + "602+5160=5763\nANSWER 5763\n",
         "86*7=602\n86*60=5170\n602+5160=5763\nANSWER 5763\n"),  # wrong at the end too
    ]  # fmt: skip
    assert rew(MUL, PROB, GOLD) == pytest.approx(1.0)
    for fixed, standing in pairs:
        assert rew(MUL, PROB, GOLD) > rew(MUL, PROB, fixed) > rew(MUL, PROB, standing)


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


def test_loss_is_finite_with_a_huge_gap_at_a_padded_position():
    """exp of a masked position's log-ratio must never be taken: inf * 0 is nan."""
    logp = torch.tensor([[-1.0, -2.0, -80.0], [-1.5, -0.5, -0.7]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # row 0 ends in padding
    old = logp.detach().clone()
    ref = logp.detach().clone()
    old[0, 2] = -1e4  # ratio exp(logp - old) overflows at the padded position
    ref[0, 2] = 1e4  # and so does the KL's exp(ref - logp)
    adv = torch.tensor([1.0, -1.0])
    loss, stats = grpo_loss(logp, old, ref, adv, mask, clip=0.2, kl_coef=0.1)
    loss.backward()
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in stats.values())
    assert torch.all(torch.isfinite(logp.grad))
    assert logp.grad[0, 2] == 0  # the padded position gets no gradient
    # and it changes nothing: the same loss as with a harmless value there
    old[0, 2] = ref[0, 2] = -80.0
    same, _ = grpo_loss(logp.detach(), old, ref, adv, mask, clip=0.2, kl_coef=0.1)
    assert float(loss.detach()) == pytest.approx(float(same))


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
    # as if sampled: each completion's tokens, then an EOS the sampler drew
    batch = completion_batch(
        [_rollout(tok, prefix, _ids(tok, c) + [tok.eos_token_id], "eos") for c in completions],
        tok.pad_token_id,
    )
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


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _rollout(tok, prefix, token_ids, stop):
    """A hand-built rollout: ``token_ids`` stand for what the sampler drew after ``prefix``."""
    text = tok.decode([t for t in token_ids if t != tok.eos_token_id])
    return Rollout(text, tuple(_ids(tok, prefix)), tuple(token_ids), stop)


def _script(model, token_ids):
    """Make ``model`` emit ``token_ids`` in order (then the last one again), whatever it is fed.

    Every decoding step calls the output layer once; its logits are replaced by a one-hot
    preference, so greedy and sampled decoding both follow the script. Returns the hook handle.
    """
    calls = [0]

    def hook(module, args, out):  # out: [b, t, V] logits
        tok = token_ids[min(calls[0], len(token_ids) - 1)]
        calls[0] += 1
        forced = torch.full_like(out, -1e4)
        forced[..., tok] = 0.0
        return forced

    return model.get_output_embeddings().register_forward_hook(hook)


def _sample(model, tok, prefix, script, **kw):
    handle = _script(model, script)
    try:
        return generate_rollouts(model, tok, [prefix], temperature=1.0, seeds=[7], **kw)[0]
    finally:
        handle.remove()


def test_completion_mask_covers_only_sampled_tokens_and_a_sampled_eos():
    """An EOS is trained on only where the sampler drew it: rollouts that stopped once the
    answer stood, at max_new_tokens or at full context get no EOS, and padding no mask."""
    model, tok = build_model("nano", max_length=64, seed=0)
    eos = tok.eos_token_id
    prefix = "86*67\n"
    long_prefix = "1" * 59 + "\n"  # 60 tokens: 4 positions left in the context of 64
    cases = [  # (prefix, script, max_new_tokens, stop, the ids that were sampled)
        (prefix, _ids(tok, "7\n") + [eos], 10, "eos", _ids(tok, "7\n") + [eos]),
        # the answer stands once the next line is complete and no recognition: that line was
        # sampled (it is trained on), the text ends at the answer
        (
            prefix,
            _ids(tok, "ANSWER 5762\n7\n+"),
            30,
            "answer",
            _ids(tok, "ANSWER 5762\n7\n"),
        ),
        (prefix, _ids(tok, "602+5160"), 4, "length", _ids(tok, "602+")),
        (long_prefix, _ids(tok, "99999999"), 30, "context", _ids(tok, "9999")),
    ]
    rollouts = []
    for pre, script, max_new, stop, sampled in cases:
        r = _sample(model, tok, pre, script, max_new_tokens=max_new)
        assert (r.stop, list(r.token_ids)) == (stop, sampled)
        assert r.sampled_eos == (stop == "eos")
        assert list(r.prompt_ids) == _ids(tok, pre)
        rollouts.append(r)
    assert rollouts[0].text == "7\n" and rollouts[1].text == "ANSWER 5762\n"
    handle = _script(model, cases[1][1])  # generate() is the rollouts' text, as before
    try:
        assert generate(model, tok, [prefix], max_new_tokens=30) == ["ANSWER 5762\n"]
    finally:
        handle.remove()

    b = completion_batch(rollouts, tok.pad_token_id)
    assert b["input_ids"].shape[1] == 64  # the full-context rollout got nothing appended
    for i, r in enumerate(rollouts):
        p, n = len(r.prompt_ids), len(r.prompt_ids) + len(r.token_ids)
        expected = [0.0] * p + [1.0] * (n - p) + [0.0] * (64 - n)  # padding after: masked
        assert b["completion_mask"][i].tolist() == expected
        assert b["input_ids"][i, p:n].tolist() == list(r.token_ids)
        assert b["attention_mask"][i].sum() == n
    scored = b["input_ids"][b["completion_mask"] > 0]
    assert int((scored == eos).sum()) == 1  # only the EOS the first rollout sampled


def _bpe_tokenizer():
    """A tiny BPE tokenizer with the merge 1 2 -> 12 (ids below the nano model's vocab)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}  # 2 is also the nano model's EOS
    for piece in list("0123456789*+=\n ANSWER") + ["12"]:
        vocab.setdefault(piece, len(vocab))
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("1", "2")]))
    bpe.decoder = decoders.Fuse()
    bpe.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def test_loss_inputs_are_the_sampled_ids_not_the_retokenised_text():
    """Under BPE, decode -> encode can segment differently ("1" "2" -> "12"): the loss must
    score the tokens the policy sampled, or it is trained off-policy."""
    model, _ = build_model("nano", max_length=64, seed=0)
    tok = _bpe_tokenizer()
    v = tok.get_vocab()
    sampled = [v["1"], v["2"], v["*"], v["3"], v["\n"], v["1"], v["2"], v["\n"], v["<eos>"]]
    r = _sample(model, tok, "12*34\n", sampled, max_new_tokens=20)
    assert list(r.token_ids) == sampled and r.stop == "eos"
    assert r.text == "12*3\n12\n"
    retokenised = _ids(tok, r.text) + [tok.eos_token_id]
    assert retokenised != sampled  # the precondition: this tokenizer merges "1" "2"

    b = completion_batch([r], tok.pad_token_id)
    m = b["completion_mask"][0] > 0
    assert b["input_ids"][0, m].tolist() == sampled
    assert b["input_ids"][0, ~m].tolist() == _ids(tok, "12*34\n")  # the prompt, as sampled from
