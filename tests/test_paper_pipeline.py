"""A paper preset end to end, submitted the way a researcher's first cluster job is: `ray job
submit --working-dir .` to a real, token-authenticated Ray head (tests/ray_head.py).

paper-multiplication as it is, with ``model.path`` at a local stand-in (selfcorrect.standin:
a Qwen2-architecture model with a byte-level BPE tokenizer and a chat template), LoRA, and
only its sizes scaled down by overrides, on CPU workers. Every stage runs; the outputs are
checked as the smoke run's are. (The Llama stand-in with full fine-tuning trains under
ZeRO-3 in test_train_integration.py; both tasks' every stage run in test_pipeline_smoke.py.)
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

import pytest
from pipeline_checks import (
    check_layout,
    check_mlflow,
    check_notebook,
    check_paper_models,
    check_report,
    paper_overrides,
)
from ray_head import local_head, submit

from rayjobs import pipeline
from selfcorrect.config import load_config

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = "configs/paper-multiplication.yaml"


@pytest.fixture(scope="module")
def paper_job(standin_models, tmp_path_factory):
    """The preset as a job on its own head; returns (out, cfg, timings, CLI output, the HTTP
    status of a request sent without the token)."""
    overrides = paper_overrides(standin_models["qwen2"], lora=True)
    cfg = load_config(os.path.join(REPO, PRESET), overrides)
    out = str(tmp_path_factory.mktemp("paper") / "run")
    t0 = time.time()
    with local_head() as (url, env):
        try:
            urllib.request.urlopen(f"{url}/api/jobs/", timeout=5)
            refused = 200
        except urllib.error.HTTPError as e:
            refused = e.code
        entry = ["python", "-m", "rayjobs.pipeline", "--config", PRESET, "--output-dir", out]
        logs = submit(url, env, [*entry, *overrides], cwd=REPO)
    steps = json.loads(open(os.path.join(out, "manifest.json")).read())["pipeline"]["steps"]
    timings = {k: steps[k] for k in pipeline.STEP_NAMES if k in steps}
    print(f"{PRESET} as a job (qwen2 stand-in, LoRA): {time.time() - t0:.0f}s {timings}")
    return out, cfg, timings, logs, refused


def test_ray_job_submit_with_token_auth(paper_job):
    """Token auth is really on (a request without the bearer token is refused), the job
    succeeded, and its output ends with the pipeline's summary."""
    out, cfg, _, logs, refused = paper_job
    assert refused in (401, 403)
    assert f"report: {os.path.join(out, 'report.md')}" in logs
    assert not os.path.exists(os.path.join(out, "sudoku"))  # the preset's one task only
    assert pipeline.produced_models(cfg) == ["ft", "eift", "hybrid", "insec", "grpo"]


def test_paper_preset_runs_every_stage_on_the_standin(paper_job):
    out, cfg, timings, _, _ = paper_job
    check_layout(out, cfg, timings)
    check_report(out, cfg)
    check_mlflow(out, cfg)
    check_notebook(out, task=cfg.tasks[0])


def test_trained_models_are_plain_hf_models_with_the_paper_tokenizer(paper_job):
    out, cfg, *_ = paper_job
    check_paper_models(out, cfg)
