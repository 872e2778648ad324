"""The paper presets' model path on the local stand-ins: BPE tokenizers with chat templates,
InSeC's tokens added to a hub vocabulary, LoRA. No hub, no Ray."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfcorrect.config import load_config
from selfcorrect.generation import generate_rollouts
from selfcorrect.loss import LossWeights, encode_example, frame_example
from selfcorrect.models import (
    adapt_tokenizer,
    fit_embeddings,
    insec_token_ids,
    load_model,
    load_tokenizer,
)
from selfcorrect.standin import make_standin
from selfcorrect.tasks import INSEC_CLOSE, Multiplication, Sudoku
from selfcorrect.tokenizer import frame_text
from selfcorrect.traces import Span, eift_example, insec_example
from selfcorrect.training import build_training_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def standin(request, tmp_path_factory):
    return make_standin(str(tmp_path_factory.mktemp("standin") / request.param), request.param)


def _trained_text(tok, enc) -> str:
    """The characters training puts weight on (the model's own output)."""
    return tok.decode(enc["input_ids"][enc["loss_weight"] > 0].tolist())


def test_standin_is_a_hub_style_model_directory(standin):
    """Loads through plain transformers (AutoTokenizer picks the class the hub names), the
    BPE round-trips task text, and numbers split as the real tokenizer splits them."""
    model = AutoModelForCausalLM.from_pretrained(standin)
    tok = AutoTokenizer.from_pretrained(standin)
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 5_000_000
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert tok.chat_template and tok.eos_token_id is not None
    rng = np.random.default_rng(0)
    for task in (Multiplication(4, 4), Sudoku()):
        text = eift_example(task, task.sample_problem(rng), rng).text
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert len(ids) < len(text)  # merges, not characters
    pieces = tok.convert_ids_to_tokens(tok("12345", add_special_tokens=False)["input_ids"])
    assert max(len(p) for p in pieces) == (1 if "qwen2" in standin else 3)


def test_chat_template_frames_the_prompt_and_trains_the_same_characters(standin):
    task = Multiplication(4, 4)
    rng = np.random.default_rng(1)
    ex = eift_example(task, task.sample_problem(rng), rng)
    tok = load_tokenizer(standin)
    adapt_tokenizer(tok, chat_template=True)
    framed = frame_example(tok, ex)
    prompt = ex.text.split("\n", 1)[0]
    assert framed.text.startswith(
        tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    )
    assert framed.text.endswith(ex.text[len(prompt) + 1 :])
    assert framed.char_labels()[: len(framed.text) - len(ex.text) + len(prompt) + 1].max() == 0
    with_template = encode_example(tok, ex, LossWeights())

    plain = load_tokenizer(standin)
    adapt_tokenizer(plain, chat_template=False)
    assert frame_example(plain, ex) is ex
    without = encode_example(plain, ex, LossWeights())
    assert len(with_template["input_ids"]) > len(without["input_ids"])
    # The template is prompt: the trained characters and decision sites do not move.
    assert _trained_text(tok, with_template) == _trained_text(plain, without)
    for enc in (with_template, without):
        assert (enc["span_kind"] == Span.DECISION).sum() == len(ex.error_steps)


def test_generation_prompts_as_training_does(standin):
    """A generation prefix is framed exactly as the training text's prompt was."""
    model, tok = load_model(standin)
    adapt_tokenizer(tok, chat_template=True)
    prefix = "12*34\n12*4=48\n"
    (r,) = generate_rollouts(model, tok, [prefix], max_new_tokens=2)
    assert list(r.prompt_ids) == tok(frame_text(tok, prefix), add_special_tokens=False)["input_ids"]
    head = tok.apply_chat_template(
        [{"role": "user", "content": "12*34"}], tokenize=False, add_generation_prompt=True
    )
    assert frame_text(tok, prefix) == head + "12*4=48\n"


def test_insec_tokens_join_a_bpe_vocabulary_as_single_tokens(standin):
    model, tok = load_model(standin)
    n = len(tok)
    rows = model.get_input_embeddings().weight.detach().clone()
    adapt_tokenizer(tok, chat_template=True)
    fit_embeddings(model, tok)
    assert len(tok) == n + 2
    ids = tok(f"12\n{INSEC_CLOSE}\n", add_special_tokens=False)["input_ids"]
    assert insec_token_ids(tok)[1] in ids
    emb = model.get_input_embeddings().weight.detach()
    assert emb.shape[0] == n + 2 and torch.equal(emb[:n], rows)
    assert torch.allclose(emb[n:], rows.mean(0).expand(2, -1))  # no RNG: equal on every rank
    adapt_tokenizer(tok, chat_template=True)  # idempotent
    assert len(tok) == n + 2
    task = Sudoku()
    rng = np.random.default_rng(2)
    ex = insec_example(task, task.sample_problem(rng), rng, p_mistake=1.0)
    enc = encode_example(tok, ex, LossWeights())
    decision = enc["input_ids"][enc["span_kind"] == Span.DECISION]
    assert set(decision.tolist()) == {insec_token_ids(tok)[1]}  # the decision is one token


def test_lora_trains_adapters_and_insec_rows_only(standin, tmp_path):
    cfg = load_config(
        os.path.join(REPO, "configs", "paper-multiplication.yaml"),
        [f"model.path={standin}", "model.lora=true", "model.lora_r=4"],
    )
    model, tok = build_training_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    assert any("trainable_tokens" in n for n in trainable)
    off = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, chat_template=False))
    _, tok_off = build_training_model(off)
    assert tok.chat_template and not tok_off.chat_template
