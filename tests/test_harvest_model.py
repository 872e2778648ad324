"""A briefly trained nano model for generation / harvest tests (no training stage needed).

``train_nano`` fits the model in-process on clean traces for a few dozen steps:
enough to write well-formed steps, far too little to be right, so it makes errors.
"""

from __future__ import annotations

import numpy as np
import torch

from selfcorrect.loss import LossWeights, collate, encode_example, weighted_lm_loss
from selfcorrect.models import build_model, save_model
from selfcorrect.tasks import get_task, split_lines
from selfcorrect.traces import clean_example


def train_nano(task_name: str, task_opts: dict, steps: int = 60, seed: int = 0, batch: int = 32):
    """(model, tokenizer) after ``steps`` AdamW steps of ``batch`` clean traces each."""
    task = get_task(task_name, **task_opts)
    model, tok = build_model("nano", max_length=160, seed=seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(steps):
            exs = [
                encode_example(tok, clean_example(task, task.sample_problem(rng)), LossWeights())
                for _ in range(batch)
            ]
            enc = collate(exs, tok.pad_token_id)
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            loss, _ = weighted_lm_loss(logits, enc, enc["loss_weight"][:, 1:].sum())
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, tok


def save_nano(path: str, task_name: str, task_opts: dict, steps: int = 60, batch: int = 32) -> str:
    model, tok = train_nano(task_name, task_opts, steps, batch=batch)
    save_model(model, tok, path)
    return path


def test_trained_nano_writes_step_shaped_lines():
    """The helper's model must be trained enough that harvest sees real steps, not noise."""
    model, tok = train_nano("multiplication", {"digits_a": 2, "digits_b": 2}, steps=60)
    from selfcorrect.generation import generate

    out = generate(model, tok, ["12*34\n", "56*78\n"], max_new_tokens=60)
    lines = [ln for text in out for ln in split_lines(text)]
    assert lines, out
    assert sum("=" in ln or ln.startswith("ANSWER") for ln in lines) >= len(lines) // 2, out
