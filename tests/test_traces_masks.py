"""Traces and loss masks: the right characters are trained, under any tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from selfcorrect.loss import (
    LossWeights,
    collate,
    encode_example,
    token_weights,
    token_weights_reference,
    weighted_lm_loss,
)
from selfcorrect.tasks import (
    INSEC_CLOSE,
    RECOGNITION_LINE,
    Multiplication,
    Sudoku,
    possible_types,
    split_lines,
    walk_trace,
)
from selfcorrect.tokenizer import build_char_tokenizer
from selfcorrect.traces import (
    Span,
    build_example,
    clean_example,
    eift_example,
    insec_example,
    onpolicy_trace_probability,
)

TASKS = [Multiplication(4, 4), Sudoku()]
prop = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _all_examples(task, seed):
    rng = np.random.default_rng(seed)
    p = task.sample_problem(rng)
    return p, [
        clean_example(task, p),
        eift_example(task, p, rng),
        insec_example(task, p, rng, p_mistake=0.5),
    ]


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A real BPE tokenizer trained here, so merges cross span boundaries (e.g. '2\\n5')."""
    texts = []
    for task in TASKS:
        for s in range(300):
            texts += [ex.text for ex in _all_examples(task, s)[1]]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>", "<unk>", "<mistake>", "</mistake>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<mistake>", "</mistake>"],
    )


def test_spans_cover_text_exactly():
    for task in TASKS:
        for s in range(20):
            for ex in _all_examples(task, s)[1]:
                labels = ex.char_labels()
                assert (labels >= 0).all()
                assert ex.spans[0][0] == 0 and ex.spans[-1][1] == len(ex.text)


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
@prop
@given(seed=st.integers(0, 2**31))
def test_eift_trace_structure(task, seed):
    rng = np.random.default_rng(seed)
    p = task.sample_problem(rng)
    ex = eift_example(task, p, rng)
    n_steps = len(task.golden_steps(p))
    assert 1 <= len(ex.error_types) <= min(4, n_steps)
    assert len(set(ex.error_steps)) == len(ex.error_steps)
    lines = split_lines(ex.text)[1:]
    events = walk_trace(task, p, lines)
    kinds = [e.kind for e in events]
    # every wrong step is followed by the recognition line and then a correct step
    for i, k in enumerate(kinds):
        if k == "step_wrong":
            assert kinds[i + 1] == "recognition" and kinds[i + 2] == "step_ok"
            assert lines[i + 1] == RECOGNITION_LINE
            assert task.check_step(events[i].state_before, lines[i + 2])
    assert kinds.count("step_wrong") == len(ex.error_types)
    assert kinds[-1] == "answer" and task.check_answer(p, lines[-1])
    # each wrong step was produced by a type that the classifier admits
    wrong = [e for e in events if e.kind == "step_wrong"]
    for ev, etype in zip(wrong, ex.error_types, strict=True):
        assert etype in possible_types(task, ev.state_before, ev.line)
    # the wrong lines carry the WRONG label, recognition / correction theirs
    labels = ex.char_labels()
    for ev in wrong:
        start = ex.text.index(ev.line + "\n" + RECOGNITION_LINE)
        assert (labels[start : start + len(ev.line)] == Span.WRONG).all()


def test_insec_trace_structure():
    task = Multiplication(4, 4)
    rng = np.random.default_rng(0)
    p = task.sample_problem(rng)
    ex = insec_example(task, p, rng, p_mistake=1.0)
    assert len(ex.error_types) == len(task.golden_steps(p))
    # No opening marker: the wrong step is unmarked, as the model's own errors are; the
    # trained closing marker is the signal (issue 20.1).
    assert "<mistake>" not in ex.text
    assert ex.text.count(INSEC_CLOSE) == len(ex.error_types)
    labels = ex.char_labels()
    # exactly one departure character per mistake, no marker characters at all
    assert (labels == Span.MISTAKE).sum() == len(ex.error_types)
    assert (labels == Span.MARKER).sum() == 0
    kinds = [e.kind for e in walk_trace(task, p, split_lines(ex.text)[1:])]
    assert kinds.count("recognition") == kinds.count("step_wrong") == len(ex.error_types)


def _expected_token_weight(labels, s, e, w: LossWeights):
    return min(w.of(k) for k in labels[s:e])


@pytest.mark.parametrize("which", ["char", "bpe"])
@pytest.mark.parametrize("mistake_loss", ["mask", "unlikelihood"])
def test_masks_land_on_exactly_the_intended_characters(which, mistake_loss, bpe_tokenizer):
    tok = build_char_tokenizer() if which == "char" else bpe_tokenizer
    w = LossWeights(w_recognition=0.5, w_correction=2.0, mistake_loss=mistake_loss)
    crossing = 0
    for task in TASKS:
        for seed in range(40):
            for ex in _all_examples(task, seed)[1]:
                enc = tok(ex.text, add_special_tokens=False, return_offsets_mapping=True)
                labels = ex.char_labels()
                weights, ul, kind = token_weights(enc["offset_mapping"], labels, w)
                covered = np.zeros(len(ex.text), dtype=bool)
                for (s, e), tw, tu in zip(enc["offset_mapping"], weights, ul, strict=True):
                    covered[s:e] = True
                    kinds = set(labels[s:e].tolist())
                    crossing += len(kinds) > 1
                    # a token is weighted by the least-weighted character it touches
                    assert tw == pytest.approx(_expected_token_weight(labels, s, e, w))
                    # no trained token contains a character of a wrong step, the prompt or a marker
                    if tw > 0:
                        assert not kinds & {Span.WRONG, Span.PROMPT, Span.MARKER, Span.MISTAKE}
                    # unlikelihood only ever on a token holding an InSeC departure character
                    if tu > 0:
                        assert Span.MISTAKE in kinds and mistake_loss == "unlikelihood"
                        assert kinds <= {Span.MISTAKE, Span.WRONG}
                    if len(kinds) == 1:  # tokens inside one span get that span's weight
                        assert tw == w.of(kinds.pop())
                assert covered.all()
                if which == "char":  # one token per character (markers are one token each)
                    for (s, e), tw in zip(enc["offset_mapping"], weights, strict=True):
                        assert e - s == 1 or ex.text[s:e] in ("<mistake>", "</mistake>")
                        assert tw == w.of(labels[s])
    if which == "bpe":
        assert crossing > 0, "the BPE test must exercise tokens that straddle span boundaries"


def test_encode_appends_trained_eos_and_rejects_too_long():
    tok = build_char_tokenizer()
    task = Multiplication(4, 4)
    ex = clean_example(task, task.sample_problem(np.random.default_rng(0)))
    enc = encode_example(tok, ex, LossWeights())
    assert enc["input_ids"][-1] == tok.eos_token_id and enc["loss_weight"][-1] == 1.0
    assert (
        enc["loss_weight"][: len(task.prompt(task.parse_prompt(ex.text.split(chr(10))[0]))) + 1]
        == 0
    ).all()
    with pytest.raises(ValueError, match="max_length"):
        encode_example(tok, ex, LossWeights(), max_length=10)


def test_injection_rate_and_hybrid_onpolicy_fraction():
    task = Multiplication(3, 3)
    rng = np.random.default_rng(0)
    problems = [task.sample_problem(rng) for _ in range(50)]
    # on-policy records: a harvested-looking wrong step after an empty prefix
    recs = []
    for p in problems[:10]:
        s = task.initial_state(p)
        wrong = (
            task.golden_steps(p)[0][:-1] + "0"
            if not task.golden_steps(p)[0].endswith("0")
            else task.golden_steps(p)[0][:-1] + "1"
        )
        recs.append(
            {
                "prompt": task.prompt(p),
                "prefix_steps": [],
                "wrong_step": wrong,
                "error_type": "digit",
            }
        )
        assert not task.check_step(s, wrong)
    n = 4000
    src = {"clean": 0, "synthetic": 0, "onpolicy": 0}
    errors = {"synthetic": 0, "onpolicy": 0}
    for i in range(n):
        ex = build_example("hybrid", task, problems[i % 50], rng, injection_rate=0.3, onpolicy=recs)
        src[ex.source] += 1
        if ex.source != "clean":
            errors[ex.source] += len(ex.error_types)
    injected = src["synthetic"] + src["onpolicy"]
    assert abs(injected / n - 0.3) < 0.03
    frac = errors["onpolicy"] / (errors["onpolicy"] + errors["synthetic"])
    assert abs(frac - 0.2) < 0.03, frac
    assert 0 < onpolicy_trace_probability(0.2, 2.5) < 1
    with pytest.raises(ValueError, match="harvest"):
        build_example("hybrid", task, problems[0], np.random.default_rng(0), injection_rate=1.0)
    # error_placement=step: still 20% of errors on-policy, each step wrong at the rate
    errors = {"synthetic": 0, "onpolicy": 0}
    for i in range(n):
        ex = build_example(
            "hybrid",
            task,
            problems[i % 50],
            rng,
            injection_rate=0.2,
            onpolicy=recs,
            error_placement="step",
        )
        if ex.source != "clean":
            errors[ex.source] += len(ex.error_types)
    frac = errors["onpolicy"] / (errors["onpolicy"] + errors["synthetic"])
    assert abs(frac - 0.2) < 0.03, frac


def test_step_placement_makes_each_step_an_independent_error():
    """error_placement=step: every step is wrong with the rate, whatever the other steps are
    (no trace-level prior for a model to learn instead of checking the step)."""
    task = Multiplication(2, 2)
    rng = np.random.default_rng(0)
    p = task.parse_prompt("56*78")  # 3 steps, every type applies at every step
    n, rate = 6000, 0.3
    wrong = np.zeros((n, 3), dtype=bool)
    for i in range(n):
        ex = build_example("eift", task, p, rng, injection_rate=rate, error_placement="step")
        wrong[i, ex.error_steps] = True
    assert np.allclose(wrong.mean(0), rate, atol=0.03)
    # independence: P(step 2 wrong | steps 0, 1 clean) == P(step 2 wrong | step 0 wrong)
    clean_prefix = wrong[~wrong[:, 0] & ~wrong[:, 1], 2].mean()
    after_error = wrong[wrong[:, 0], 2].mean()
    assert abs(clean_prefix - after_error) < 0.05
    # ... while whole-trace placement ties them together (the prior the step mode removes)
    wrong[:] = False
    for i in range(n):
        ex = build_example("eift", task, p, rng, injection_rate=rate, error_placement="trace")
        wrong[i, ex.error_steps] = True
    assert wrong[wrong[:, 0], 2].mean() - wrong[~wrong[:, 0] & ~wrong[:, 1], 2].mean() > 0.3


def test_last_step_rate_sets_the_last_steps_rate_alone():
    """last_step_rate moves the last step's error rate and no other step's; unset, the
    stream is the one injection_rate alone gives (same seed, same injected errors)."""
    task = Multiplication(2, 2)
    p = task.parse_prompt("56*78")  # 3 steps; the last is the sum
    n = 2000  # the rates' standard errors are at most 0.011: atol 0.03 is ~3 sigma
    for last_rate in (0.0, 0.7, 1.0):
        rng = np.random.default_rng(1)
        wrong = np.zeros((n, 3), dtype=bool)
        for i in range(n):
            ex = build_example(
                "eift",
                task,
                p,
                rng,
                injection_rate=0.2,
                error_placement="step",
                last_step_rate=last_rate,
            )
            wrong[i, ex.error_steps] = True
        assert np.allclose(wrong.mean(0), [0.2, 0.2, last_rate], atol=0.03), wrong.mean(0)
    kw = dict(injection_rate=0.3, error_placement="step")
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(50):
        x = build_example("eift", task, p, a, **kw)
        y = build_example("eift", task, p, b, last_step_rate=None, **kw)
        assert x.text == y.text and x.spans == y.spans


def test_loss_normalised_by_global_weight_not_per_microbatch():
    """Two micro-batches accumulated == one batch: the normaliser is the total weight."""
    torch.manual_seed(0)
    tok = build_char_tokenizer()
    task = Sudoku()
    rng = np.random.default_rng(0)
    exs = [
        encode_example(tok, eift_example(task, task.sample_problem(rng), rng), LossWeights())
        for _ in range(4)
    ]
    V = len(tok)
    full = collate(exs, tok.pad_token_id)
    T = full["input_ids"].shape[1]
    logits = torch.randn(4, T, V, requires_grad=True)
    norm = full["loss_weight"][:, 1:].sum()
    loss_full, _ = weighted_lm_loss(logits, full, norm)
    (g_full,) = torch.autograd.grad(loss_full, logits)
    acc = torch.zeros_like(logits)
    for idx in ([0, 1], [2, 3]):
        mb = {k: v[idx] for k, v in full.items()}
        lg = logits.detach()[idx].clone().requires_grad_(True)
        loss, _ = weighted_lm_loss(lg, mb, norm)
        (g,) = torch.autograd.grad(loss, lg)
        acc[idx] = g
    assert torch.allclose(acc, g_full, atol=1e-6)


def test_wrong_step_tokens_give_exactly_zero_gradient():
    tok = build_char_tokenizer()
    task = Multiplication(4, 4)
    rng = np.random.default_rng(0)
    enc = encode_example(
        tok, eift_example(task, task.sample_problem(rng), rng, max_errors=4), LossWeights()
    )
    batch = collate([enc], tok.pad_token_id)
    wrong = torch.as_tensor(enc["span_kind"] == Span.WRONG)[None]
    assert wrong.any()
    logits = torch.randn(1, batch["input_ids"].shape[1], len(tok), requires_grad=True)
    batch["loss_weight"] = torch.where(
        wrong, torch.ones_like(batch["loss_weight"]), batch["loss_weight"]
    )
    # the tokens kept are exactly the wrong ones: restore the real mask -> they carry 0
    real = collate([enc], tok.pad_token_id)
    only_wrong = {**real, "loss_weight": real["loss_weight"] * wrong}
    loss, _ = weighted_lm_loss(logits, only_wrong, torch.tensor(1.0))
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("mistake_loss", ["mask", "unlikelihood"])
def test_token_weights_match_the_per_token_rule(mistake_loss, bpe_tokenizer):
    w = LossWeights(w_recognition=0.5, w_correction=2.0, w_decision=3.0, mistake_loss=mistake_loss)
    for task in TASKS:
        for seed in range(10):
            for ex in _all_examples(task, seed)[1]:
                labels = ex.char_labels()
                enc = bpe_tokenizer(ex.text, add_special_tokens=False, return_offsets_mapping=True)
                # a special token with no characters in front, as a chat template adds
                offsets = [(0, 0), *enc["offset_mapping"]]
                got = token_weights(offsets, labels, w)
                want = token_weights_reference(offsets, labels, w)
                for g, x in zip(got, want, strict=True):
                    np.testing.assert_array_equal(g, x)
    # hand-built: the last token ends at the text's end; a token straddling WRONG/MISTAKE
    labels = np.array([Span.GOLDEN, Span.WRONG, Span.MISTAKE, Span.WRONG, Span.RECOGNITION])
    offsets = [(0, 1), (1, 3), (3, 4), (4, 5)]
    tw, ul, kind = token_weights(offsets, labels, w)
    assert tw.tolist() == [1.0, 0.0, 0.0, 0.5]
    assert kind.tolist() == [Span.GOLDEN, Span.WRONG, Span.WRONG, Span.RECOGNITION]
    assert ul.tolist() == (
        [0.0, w.w_unlikelihood, 0.0, 0.0] if mistake_loss == "unlikelihood" else [0.0] * 4
    )
    # tokens that share characters (byte pieces of one character) follow the same rule
    shared = [(0, 2), (1, 3), (1, 3), (3, 5)]
    for g, x in zip(
        token_weights(shared, labels, w), token_weights_reference(shared, labels, w), strict=True
    ):
        np.testing.assert_array_equal(g, x)
