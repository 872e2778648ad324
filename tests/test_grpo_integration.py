"""GRPO on real local Ray: 2 Ray Train workers on CPU, DeepSpeed ZeRO-2 over gloo, nano model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from rayjobs import data as data_job
from rayjobs import grpo as grpo_job
from rayjobs.common import JobContext, read_manifest
from selfcorrect import io
from selfcorrect.config import ConfigError, load_config
from selfcorrect.data import load_problems
from selfcorrect.grpo import check_batch_shape
from selfcorrect.loss import LossWeights, collate, encode_example
from selfcorrect.models import build_model, load_model, save_model
from selfcorrect.tasks import get_task
from selfcorrect.traces import clean_example

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.integration


def _quick_ft(cfg, task_name: str, run_dir: str, steps: int = 200) -> str:
    """A briefly supervised nano model on clean traces: the stand-in FT model GRPO starts from."""
    task = get_task(task_name, **cfg.task_options(task_name))
    table = io.read_parquet(os.path.join(run_dir, task_name, "data", "train.parquet"))
    problems = load_problems(task, table)
    model, tok = build_model("nano", cfg.model.max_length, seed=0)
    enc = [encode_example(tok, clean_example(task, p), LossWeights()) for p in problems]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        batch = collate([enc[i] for i in rng.choice(len(enc), 16)], tok.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        nll = -logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        w = batch["loss_weight"][:, 1:]
        loss = (nll * w).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out_dir = os.path.join(run_dir, task_name, "models", "ft")
    save_model(model, tok, out_dir)
    return out_dir


def test_grpo_two_workers_zero2_changes_policy(ray_session, tmp_path):
    cfg = load_config(
        os.path.join(REPO, "configs", "smoke.yaml"),
        [
            "tasks=[multiplication]",
            # 2-digit x 1-digit: a nano model memorises its 60 problems in seconds and then
            # samples right and wrong answers, so groups carry signal
            "multiplication.digits_b=1",
            "data.n_train=60",
            "data.n_test=16",
            "grpo.num_workers=2",
            "grpo.group_size=8",
            "grpo.steps=3",
            "grpo.checkpoint_every=2",
            "grpo.eval_problems=8",
            "grpo.updates_per_batch=2",
            "grpo.micro_batch_size=8",
            "train.cpus_per_worker=1",
            "train.zero_stage=2",
        ],
    )
    ctx = JobContext(cfg, str(tmp_path))
    data_job.run(ctx)
    ft_dir = _quick_ft(cfg, "multiplication", str(tmp_path))

    grpo_job.run(ctx)

    out = tmp_path / "multiplication" / "models" / "grpo"
    policy, tok = load_model(str(out))
    ft, _ = load_model(ft_dir)
    diffs = [
        (a - b).abs().max().item()
        for a, b in zip(policy.parameters(), ft.parameters(), strict=True)
    ]
    assert max(diffs) > 0, "GRPO left every weight unchanged"
    assert tok.eos_token == "<eos>"

    history = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in history] == [0, 1, 2, 3]
    assert 0.0 <= history[0]["heldout_accuracy"] <= 1.0  # the FT model's, before any update
    assert [h["bf16"] for h in history] == [False] * 4  # every row names its precision path
    for h in history[1:]:
        for key in ("reward_mean", "reward_std", "kl", "entropy", "completion_tokens"):
            assert np.isfinite(h[key]), (key, h)
        assert h["generation_s"] > 0 and h["update_s"] > 0
        assert h["entropy"] > 0 and h["kl"] >= 0
        assert 0 <= h["reward_mean"] <= 1
    assert any(h["groups_without_signal"] < 1 for h in history[1:]), "no group had signal"
    assert history[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first rollout is the FT policy
    assert "heldout_accuracy" in history[-1]
    table = io.read_parquet(str(out / "metrics.parquet"), required=["step", "reward_mean", "kl"])
    assert table.num_rows == 4
    assert not list(tmp_path.glob("multiplication/models/.grpo*")), "staging or run dirs left"
    assert read_manifest(ctx)["stages"]["multiplication/grpo"]["status"] == "done"

    # same config: the stage is skipped and the model is untouched
    mtime = (out / "model.safetensors").stat().st_mtime
    grpo_job.run(ctx)
    assert (out / "model.safetensors").stat().st_mtime == mtime


def test_grpo_without_ft_model_is_a_clear_error(ray_session, tmp_path):
    cfg = load_config(os.path.join(REPO, "configs", "smoke.yaml"), ["tasks=[multiplication]"])
    with pytest.raises(FileNotFoundError, match="rayjobs.train"):
        grpo_job.train_grpo(cfg, "multiplication", str(tmp_path / "nope"), str(tmp_path / "g"))


def test_grpo_batch_that_does_not_split_is_a_clear_error():
    cfg = load_config(
        os.path.join(REPO, "configs", "smoke.yaml"),
        ["grpo.num_workers=3", "grpo.prompts_per_step=4"],
    )
    with pytest.raises(ConfigError, match="multiple of 3"):
        check_batch_shape(cfg)
