"""Learning curves: cheap greedy recognition probes on a fixed item set during training.

Where does recognition of synthetic errors emerge, and does recognition of the FT model's
own errors ever follow? The training loop calls ``probe_recognition`` every
``train.probe_every`` steps on the same items (built once by ``probe_items`` from the test
split and, once harvest has run, the FT model's test errors), so the curve is the model
changing, not the items. Only the line after the wrong step is decoded, so a probe costs a
short greedy generation per item.
"""

from __future__ import annotations

from typing import Any

import torch

from selfcorrect.evaluate import ft_error_items, score_after_error, state_after, synthetic_items
from selfcorrect.generation import generate
from selfcorrect.tasks import Task

# The next line after the wrong step (a recognition line or a step) fits in this many tokens.
PROBE_NEW_TOKENS = 32


def probe_items(
    task: Task,
    test_rows: list[dict[str, Any]],
    harvest_rows: list[dict[str, Any]] | None,
    seed: int,
    n: int,
    weights: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """``n`` synthetic items (the eval's, on the first test problems) + ``n`` FT-error items."""
    items = synthetic_items(task, test_rows, seed, n, weights)
    if harvest_rows:
        items += ft_error_items(task, harvest_rows, seed, n)
    return [
        {k: it[k] for k in ("condition", "prompt", "prefix", "prefix_steps", "wrong_step")}
        for it in items
    ]


@torch.no_grad()
def probe_recognition(
    model: torch.nn.Module, tokenizer: Any, task: Task, items: list[dict[str, Any]]
) -> dict[str, float]:
    """``probe_<condition>_recognition``: share of items whose next line flags the error."""
    was_training = model.training
    model.eval()
    try:
        texts = generate(
            model, tokenizer, [it["prefix"] for it in items], max_new_tokens=PROBE_NEW_TOKENS
        )
    finally:
        model.train(was_training)
    hits: dict[str, list[bool]] = {}
    for it, text in zip(items, texts, strict=True):
        problem = task.parse_prompt(it["prompt"])
        state = state_after(task, problem, it["prefix_steps"])
        scored = score_after_error(task, problem, state, it["wrong_step"], text)
        hits.setdefault(it["condition"], []).append(bool(scored["recognized"]))
    return {f"probe_{c}_recognition": sum(h) / len(h) for c, h in hits.items()}
