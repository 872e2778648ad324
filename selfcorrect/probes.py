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
    return [_probe_fields(it) for it in items]


def _probe_fields(item: dict[str, Any]) -> dict[str, Any]:
    return {k: item[k] for k in ("condition", "prompt", "prefix", "prefix_steps", "wrong_step")}


def current_ft_harvest(task_dir: str, ft_hash: str) -> str | None:
    """``<task>/harvest/ft-test.parquet`` if it holds the errors of the FT model this config
    trains (``ft_hash``), per the run's manifest.json: FT done with that hash and the harvest
    done after it. None before, and while FT is retrained over an older harvest in a reused
    run directory (a method trained beside FT must not probe the old FT's errors)."""
    from selfcorrect import io

    manifest = io.join(task_dir.rstrip("/").rsplit("/", 1)[0], "manifest.json")
    if not io.exists(manifest):
        return None
    task = task_dir.rstrip("/").rsplit("/", 1)[1]
    stages = io.read_json(manifest).get("stages", {})
    ft, harvest = stages.get(f"{task}/ft", {}), stages.get(f"{task}/harvest/ft-test", {})
    ready = (
        ft.get("status") == "done"
        and ft.get("config_hash") == ft_hash
        and harvest.get("status") == "done"
        and (harvest.get("started") or 0) >= (ft.get("finished") or 0)
    )
    path = io.join(task_dir, "harvest", "ft-test.parquet")
    return path if ready and io.exists(path) else None


class LateFTProbes:
    """FT-error probes for a method that trains before FT's test errors are harvested.

    The pipeline trains EIFT / InSeC beside FT when no method reads FT's harvest, so the
    FT errors do not exist at the first probes. At each probe this keeps a copy of the
    trainable weights; once ``harvest_path`` exists (a later probe, or the last), every kept
    copy is probed on the same FT-error items and its row filled in. The values equal those a
    probe at that step would have given (the same weights, greedy); only a model trained
    past FT's harvest, or resumed (the copies are in memory), leaves earlier rows without
    ``probe_ft_errors_recognition``. Each waiting probe holds one CPU copy of the trainable
    weights (a LoRA model's adapters, a full fine-tune's every weight).
    """

    def __init__(self, task_dir: str, ft_hash: str, seed: int, n: int) -> None:
        self.task_dir, self.ft_hash, self.seed, self.n = task_dir, ft_hash, seed, n
        self.items: list[dict[str, Any]] | None = None
        self.pending: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []

    def _load(self, task: Task) -> list[dict[str, Any]] | None:
        from selfcorrect import io

        if self.items is None and (path := current_ft_harvest(self.task_dir, self.ft_hash)):
            rows = io.read_parquet(path).to_pylist()
            self.items = [_probe_fields(it) for it in ft_error_items(task, rows, self.seed, self.n)]
        return self.items

    def probe(
        self, model: torch.nn.Module, tokenizer: Any, task: Task, row: dict[str, Any]
    ) -> None:
        """Probe (now, or once the harvest exists) this step's model; fill ``row``."""
        items = self._load(task)
        if items is None:
            self.pending.append((row, _trainable_copy(model)))
            return
        if not items:  # FT made no test errors: nothing to probe, now or later
            self.pending.clear()
            return
        if self.pending:
            now = _trainable_copy(model)
            for earlier, weights in self.pending:
                _load_trainable(model, weights)
                earlier.update(probe_recognition(model, tokenizer, task, items))
            _load_trainable(model, now)
            self.pending.clear()
        row.update(probe_recognition(model, tokenizer, task, items))


def _trainable_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Trainable parameters only: a LoRA model keeps its adapters, a full fine-tune every weight.
    return {
        n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad
    }


@torch.no_grad()
def _load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        if n in weights:
            p.copy_(weights[n])


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
