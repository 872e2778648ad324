"""The paper presets end to end before anyone pays for GPUs: each ``paper-*`` preset as it is,
with ``model.path`` at a local stand-in (selfcorrect.standin: a Qwen2- and a Llama-architecture
model with a byte-level BPE tokenizer and a chat template) and only its sizes scaled down by
overrides, on CPU workers. Every stage runs; the outputs are checked as the smoke run's are.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from pipeline_checks import (
    check_layout,
    check_mlflow,
    check_notebook,
    check_paper_models,
    check_report,
    paper_overrides,
)

from rayjobs import pipeline
from rayjobs.common import JobContext
from selfcorrect.config import load_config

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def paper_run(ray_session, standin_models, tmp_path_factory):
    """paper-multiplication on the Qwen2 stand-in with LoRA (paper-sudoku on the Llama one,
    full fine-tuning, runs as a `ray job submit` job in test_job_submit.py)."""
    preset, arch, lora = "paper-multiplication", "qwen2", True
    cfg = load_config(
        os.path.join(REPO, "configs", f"{preset}.yaml"), paper_overrides(standin_models[arch], lora)
    )
    out = str(tmp_path_factory.mktemp(preset) / "run")
    t0 = time.time()
    pipeline.run(JobContext(cfg, out))
    steps = json.loads(open(os.path.join(out, "manifest.json")).read())["pipeline"]["steps"]
    timings = {k: steps[k] for k in pipeline.STEP_NAMES if k in steps}
    print(f"{preset} on the {arch} stand-in (lora={lora}): {time.time() - t0:.0f}s {timings}")
    return out, cfg, timings


def test_paper_preset_runs_every_stage_on_the_standin(paper_run):
    out, cfg, timings = paper_run
    check_layout(out, cfg, timings)
    check_report(out, cfg)
    check_mlflow(out, cfg)
    check_notebook(out, task=cfg.tasks[0])


def test_trained_models_are_plain_hf_models_with_the_paper_tokenizer(paper_run):
    out, cfg, _ = paper_run
    check_paper_models(out, cfg)
