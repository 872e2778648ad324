"""Learning-curve probes of FT errors for a method that trains before they are harvested."""

from __future__ import annotations

import json
import os

import torch

from selfcorrect import io, probes
from selfcorrect.data import make_splits
from selfcorrect.evaluate import synthetic_items
from selfcorrect.models import build_model
from selfcorrect.tasks import get_task

TASK = get_task("multiplication", digits_a=2, digits_b=2)


def _write_harvest(task_dir: str) -> None:
    """FT 'errors' in harvest form: synthetic errors at test states will do for a probe."""
    test = make_splits(TASK, 16, 8, 0)["test"].to_pylist()
    rows = [
        {
            "error_id": it["item_id"],
            "problem_id": it["item_id"],
            "prompt": it["prompt"],
            "prefix": it["prefix"],
            "prefix_steps": list(it["prefix_steps"]),
            "wrong_step": it["wrong_step"],
            "gold_step": "",
            "error_type": "digit",
        }
        for it in synthetic_items(TASK, test, 0, 8)
    ]
    io.write_parquet(os.path.join(task_dir, "harvest", "ft-test.parquet"), rows)


def _manifest(run: str, ft_hash: str, ft_finished: float, harvest_started: float) -> None:
    stages = {
        "multiplication/ft": {"status": "done", "config_hash": ft_hash, "finished": ft_finished},
        "multiplication/harvest/ft-test": {"status": "done", "started": harvest_started},
    }
    with open(os.path.join(run, "manifest.json"), "w") as f:
        json.dump({"stages": stages}, f)


def test_only_the_harvest_of_the_current_ft_model_is_probed(tmp_path):
    run = str(tmp_path)
    task_dir = os.path.join(run, "multiplication")
    assert probes.current_ft_harvest(task_dir, "h") is None  # no manifest yet
    _write_harvest(task_dir)
    _manifest(run, "h", ft_finished=10.0, harvest_started=5.0)  # FT retrained after it
    assert probes.current_ft_harvest(task_dir, "h") is None
    _manifest(run, "old", ft_finished=10.0, harvest_started=11.0)  # another FT's
    assert probes.current_ft_harvest(task_dir, "h") is None
    _manifest(run, "h", ft_finished=10.0, harvest_started=11.0)
    assert probes.current_ft_harvest(task_dir, "h").endswith("harvest/ft-test.parquet")


def test_late_ft_probes_score_each_step_on_its_own_weights(tmp_path, monkeypatch):
    """Probes before the harvest keep the weights of their step; the first probe after it
    scores every kept copy and fills its row, and training goes on with its own weights."""
    run = str(tmp_path)
    task_dir = os.path.join(run, "multiplication")
    model, tok = build_model("tiny", 384)
    first = next(model.parameters())

    def fingerprint(m, tokenizer, task, items):  # which weights were probed
        assert {it["condition"] for it in items} == {"ft_errors"} and len(items) == 4
        return {"probe_ft_errors_recognition": float(next(m.parameters()).detach().sum())}

    monkeypatch.setattr(probes, "probe_recognition", fingerprint)
    late = probes.LateFTProbes(task_dir, "h", seed=0, n=4)
    rows, sums = [], []
    for step in range(3):
        with torch.no_grad():
            first.add_(1.0)  # a training step
        sums.append(float(first.detach().sum()))
        rows.append({"step": step})
        if step == 1:  # FT's harvest lands between the second and the third probe
            _write_harvest(task_dir)
            _manifest(run, "h", ft_finished=10.0, harvest_started=11.0)
        elif step == 0:
            _write_harvest(task_dir)  # an older FT's harvest: never probed
            _manifest(run, "h", ft_finished=10.0, harvest_started=5.0)
        late.probe(model, tok, TASK, rows[-1])
        if step == 0:
            assert "probe_ft_errors_recognition" not in rows[0] and len(late.pending) == 1
    assert [r["probe_ft_errors_recognition"] for r in rows] == sums
    assert float(first.detach().sum()) == sums[-1] and late.pending == []
