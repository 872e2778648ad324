"""The decision to flag an error: its spans, its training metrics, and InSeC's trained signal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfcorrect.loss import (
    LossWeights,
    collate,
    decision_stats,
    encode_example,
    weighted_lm_loss,
)
from selfcorrect.tasks import INSEC_CLOSE, RECOGNITION_LINE, get_task
from selfcorrect.tokenizer import build_char_tokenizer
from selfcorrect.traces import (
    Span,
    decision_length,
    eift_example,
    insec_example,
)

TASKS = [get_task("multiplication", digits_a=2, digits_b=2), get_task("sudoku")]


def test_decision_characters_are_where_the_signal_departs_from_the_answer_line():
    assert decision_length(RECOGNITION_LINE) == 2  # "A" could still be "ANSWER", "AH" cannot
    assert decision_length(INSEC_CLOSE) == 1


def _encoded(task, seed: int, method: str = "eift"):
    tok = build_char_tokenizer()
    rng = np.random.default_rng(seed)
    p = task.sample_problem(rng)
    ex = (
        eift_example(task, p, rng)
        if method == "eift"
        else insec_example(task, p, rng, p_mistake=0.5)
    )
    return tok, ex, encode_example(tok, ex, LossWeights())


def _stats_for_logits(batch, logits):
    return weighted_lm_loss(logits, batch, torch.tensor(1.0))[1]


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_decision_metrics_on_a_hand_built_batch(task):
    tok, ex, enc = _encoded(task, seed=3)
    batch = collate([enc], tok.pad_token_id)
    ids = batch["input_ids"][0]
    T, V = ids.shape[0], len(tok)
    n_errors = len(ex.error_types)
    assert n_errors >= 1
    # A perfect model: the logit row t puts all mass on token t+1.
    logits = torch.full((1, T, V), -30.0)
    logits[0, torch.arange(T - 1), ids[1:]] = 30.0
    n, nll, right, sites, alarms = decision_stats(_stats_for_logits(batch, logits))
    assert n == n_errors and right == n_errors and nll == pytest.approx(0.0, abs=1e-6)
    assert sites > 0 and alarms == 0
    # Break the first decision's second token ("H" -> "N"): that decision is wrong, one only.
    kind = batch["span_kind"][0]
    dec_pos = (kind == Span.DECISION).nonzero().flatten().tolist()
    second = dec_pos[1]
    bad = logits.clone()
    bad[0, second - 1, ids[second]] = -30.0
    bad[0, second - 1, tok.convert_tokens_to_ids("N")] = 30.0
    n, nll, right, _, _ = decision_stats(_stats_for_logits(batch, bad))
    assert n == n_errors and right == n_errors - 1 and nll == pytest.approx(60.0, rel=1e-3)
    # Make the model start the recognition line after the first correct step: one alarm.
    fa = batch["fa_target"][0]
    site = int((fa >= 0).nonzero()[0])
    alarm = logits.clone()
    alarm[0, site - 1, ids[site]] = -30.0
    alarm[0, site - 1, fa[site]] = 30.0
    *_, sites2, alarms2 = decision_stats(_stats_for_logits(batch, alarm))
    assert sites2 == sites and alarms2 == 1


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_false_alarm_sites_follow_correct_steps_only(task):
    for seed in range(20):
        tok, ex, enc = _encoded(task, seed)
        labels = ex.char_labels()
        offsets = tok(ex.text, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        for i in np.nonzero(enc["fa_target"] >= 0)[0]:
            s = offsets[i][0]
            line_start = ex.text.rfind("\n", 0, s) + 1
            assert labels[line_start] == Span.GOLDEN  # a correct line the model wrote
            prev_start = ex.text.rfind("\n", 0, line_start - 1) + 1
            assert labels[prev_start] in (Span.GOLDEN, Span.CORRECTION)
            # the site is where the line departs from the recognition line
            k = s - line_start
            assert ex.text[line_start:s] == RECOGNITION_LINE[:k]
            assert tok.decode([int(enc["fa_target"][i])]) == RECOGNITION_LINE[k]


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_insec_signal_is_trained_and_no_untrained_marker_opens_a_mistake(task):
    for seed in range(20):
        tok, ex, enc = _encoded(task, seed, "insec")
        assert "<mistake>" not in ex.text
        dec = enc["span_kind"] == Span.DECISION
        assert dec.sum() == len(ex.error_types)
        assert all(tok.decode([int(i)]) == INSEC_CLOSE for i in enc["input_ids"][dec])
        assert (enc["loss_weight"][dec] > 0).all()


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_unlikelihood_only_where_the_mistake_departs_from_every_correct_step(task):
    """Issue 20.2: never on the left-hand side or digits shared with a correct step."""
    tok = build_char_tokenizer()
    w = LossWeights(mistake_loss="unlikelihood")
    n_mistakes = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        p = task.sample_problem(rng)
        ex = insec_example(task, p, rng, p_mistake=0.5)
        enc = encode_example(tok, ex, w)
        offsets = tok(ex.text, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        ul = [offsets[i][0] for i in np.nonzero(enc["ul_weight"] > 0)[0]]  # characters
        assert len(ul) == len(ex.error_types)
        n_mistakes += len(ul)
        state = task.initial_state(p)
        lines = ex.text.split("\n")[1:]
        pos = len(ex.text.split("\n")[0]) + 1
        j = 0
        for li, line in enumerate(lines[:-1]):
            if li + 1 < len(lines) and lines[li + 1] == INSEC_CLOSE:
                d = ul[j] - pos  # offset of the unlikelihood character in the wrong line
                j += 1
                correct = [c + "\n" for c in task.correct_steps(state)]
                wrong = line + "\n"
                assert any(c[:d] == wrong[:d] for c in correct)  # shared up to there
                # ... and departs there: no correct step shares one more character
                assert not any(c[: d + 1] == wrong[: d + 1] for c in correct)
            elif line != INSEC_CLOSE and not line.startswith("ANSWER"):
                if task.check_step(state, line):
                    state = task.apply_step(state, line)
            pos += len(line) + 1
        assert j == len(ex.error_types)
    assert n_mistakes > 20


def _weights_strategy(task):
    return st.dictionaries(
        st.sampled_from(list(task.error_types)),
        st.floats(min_value=0.0, max_value=3.0),
        min_size=1,
    )


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=st.integers(0, 10_000))
def test_restrictive_error_weights_never_crash_trace_building(task, data, seed):
    """Issue 20.6: carry-only weights on 11*11 used to raise; the builders now skip steps where
    no allowed type applies, as the eval's item builder does."""
    weights = data.draw(_weights_strategy(task))
    rng = np.random.default_rng(seed)
    p = task.sample_problem(rng)
    for ex in (
        eift_example(task, p, rng, type_weights=weights),
        insec_example(task, p, rng, p_mistake=0.7, type_weights=weights),
    ):
        assert all(weights.get(t, 0) > 0 for t in ex.error_types)


def test_carry_only_weights_on_a_problem_without_carries():
    task = get_task("multiplication", digits_a=2, digits_b=2)
    p = task.parse_prompt("11*11")
    rng = np.random.default_rng(0)
    ex = eift_example(task, p, rng, type_weights={"carry": 1.0})
    assert ex.error_types == [] or set(ex.error_types) == {"carry"}
    insec_example(task, p, rng, p_mistake=1.0, type_weights={"carry": 1.0})


def test_training_logs_decision_metrics_and_learning_curve_probes(tmp_path):
    """EIFT logs the decision (loss, accuracy, false alarms) at every log step and greedy
    recognition probes at every probe step; the decision loss falls as it trains."""
    import os

    from selfcorrect.config import load_config
    from selfcorrect.data import make_splits
    from selfcorrect.probes import probe_items
    from selfcorrect.training import train_local

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(
        os.path.join(repo, "configs", "smoke.yaml"),
        [
            "train.log_every=1",
            "train.cpus_per_worker=1",
            "train.checkpoint_every=0",
            "train.injection_rate=1.0",
            "train.w_decision=5",
            "train.probe_every=10",
            "train.probe_items=6",
        ],
    )
    task = get_task("multiplication", digits_a=2, digits_b=2)
    splits = make_splits(task, 64, 8, 0)
    prompts = splits["train"].column("prompt").to_pylist()
    items = probe_items(task, splits["test"].to_pylist(), None, 0, 6)
    assert {it["condition"] for it in items} == {"synthetic"} and len(items) == 6
    last, session = train_local(
        cfg,
        "multiplication",
        "eift",
        prompts,
        max_steps=20,
        checkpoint_root=str(tmp_path),
        probe_items=items,
    )
    hist = session.reports
    for h in hist:
        assert {"decision_loss", "decision_accuracy", "decision_false_alarm_rate"} <= set(h)
        assert 0 <= h["decision_accuracy"] <= 1 and 0 <= h["decision_false_alarm_rate"] <= 1
    probed = [h["step"] for h in hist if "probe_synthetic_recognition" in h]
    assert probed == [10, 20]
    early = sum(h["decision_loss"] for h in hist[:3]) / 3
    late = sum(h["decision_loss"] for h in hist[-3:]) / 3
    assert late < early
