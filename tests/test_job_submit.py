"""`ray job submit` end to end: a real Ray head on loopback, the smoke pipeline as a job.

The head is this test's own: separate --temp-dir, free ports, its own process group,
stopped by signalling that group (never a blanket `ray stop`, which would take down every
other Ray instance on the machine). Ray 2.60 token authentication is on: RAY_AUTH_MODE=token
and a fresh RAY_AUTH_TOKEN in the environment of both `ray start` and `ray job submit` (the
CLI sends it as a bearer token; the job's driver inherits it from the head's processes).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from pipeline_checks import check_paper_models, paper_overrides

from rayjobs import pipeline
from selfcorrect import io
from selfcorrect.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
RAY = os.path.join(BIN, "ray")

# A researcher's first job on a cluster: a paper preset, here paper-sudoku at toy size with
# model.path at the local Llama-architecture stand-in, full fine-tuning, FT and InSeC (whose
# tokens join the BPE vocabulary). Every stage and method of a paper preset runs in
# test_paper_pipeline.py (paper-multiplication on the Qwen2 stand-in with LoRA), and of both
# tasks in test_pipeline_smoke.py; GRPO and the sweep are left out here to keep the suite's
# time (they added three and a half minutes and nothing that is the job submission's).
PRESET = "configs/paper-sudoku.yaml"
PIPELINE = ["python", "-m", "rayjobs.pipeline", "--config", PRESET]
NARROW = ["train.methods=[insec]", "grpo.enabled=false", "tune.enabled=false"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        PATH=BIN + os.pathsep + env.get("PATH", ""),  # the job's `python` is this venv's
        DS_ACCELERATOR="cpu",
        RAY_TRAIN_V2_ENABLED="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        RAY_USAGE_STATS_ENABLED="0",
        # `ray start` gives its dashboard 60 s by default, then exits: too short for a head
        # started beside other work on 2 cores (the suite's own Ray instance, a `tiny` run).
        RAY_DASHBOARD_STARTUP_TIMEOUT_S="300",
    )
    return env


@contextmanager
def local_head(num_cpus: int = 2) -> Iterator[tuple[str, dict[str, str]]]:
    """Start `ray start --head --block` in its own process group; yield (dashboard URL, env)."""
    token = secrets.token_hex(32)
    env = _env(token)
    gcs, dash, client, agent, agent_grpc, metrics, rte = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="rsc-", dir="/tmp")  # short: Unix socket path limit
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rte}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log = open(os.path.join(temp_dir, "ray-start.log"), "w")
    proc = subprocess.Popen(
        cmd, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 300  # a loaded machine (CI beside other work) starts slowly
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {open(log.name).read()[-3000:]}")
            try:
                req = urllib.request.Request(
                    f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}
                )
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"dashboard not up in 300 s: {open(log.name).read()[-3000:]}")
            time.sleep(1)
        yield url, env
    finally:
        # Stop exactly this cluster: SIGTERM to our process group (the blocking `ray start`
        # drains and kills the processes it started), then SIGKILL whatever is left.
        pgid = proc.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        time.sleep(1)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.integration
def test_ray_job_submit_runs_a_paper_preset(tmp_path, standin_models):
    """paper-sudoku as a job on a token-authenticated head, the model from the Llama stand-in:
    every stage it runs is done, FT and InSeC are evaluated, the report is written, and the
    saved models are plain Hugging Face models with the paper tokenizer."""
    out = str(tmp_path / "run")
    overrides = [*paper_overrides(standin_models["llama"]), *NARROW]
    sid = f"selfcorrect-test-{secrets.token_hex(4)}"
    with local_head() as (url, env):
        # Token auth is really on: a request without the bearer token is refused.
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}/api/jobs/", timeout=5)
        assert e.value.code in (401, 403)
        t0 = time.time()
        cmd = [RAY, "job", "submit", "--address", url, "--submission-id", sid]
        cmd += ["--working-dir", ".", "--", *PIPELINE, "--output-dir", out, *overrides]
        while True:
            submit = subprocess.run(
                cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500
            )
            logs = submit.stdout + submit.stderr
            # The head answers before its dashboard agent has registered (slow on a loaded
            # machine); Ray's own answer is "please try again later": nothing was submitted.
            if "No available agent to submit job" not in logs or time.time() - t0 > 300:
                break
            time.sleep(5)
        assert submit.returncode == 0, logs[-5000:]
        status = subprocess.run(
            [RAY, "job", "status", "--address", url, sid],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "succeeded" in (status.stdout + status.stderr).lower(), status.stdout + status.stderr
        print(f"job wall time {time.time() - t0:.0f}s")

    assert "report: " in logs  # the pipeline's closing summary
    cfg = load_config(os.path.join(REPO, PRESET), overrides)
    stages = json.loads(open(os.path.join(out, "manifest.json")).read())["stages"]
    assert {k: v["status"] for k, v in stages.items() if v["status"] != "done"} == {}
    for key in ("data", "ft", "insec", "harvest/ft-test", "coverage/ft", "eval/ft", "eval/insec"):
        assert f"sudoku/{key}" in stages, key
    assert pipeline.produced_models(cfg) == ["ft", "insec"]
    summary = io.read_parquet(os.path.join(out, "eval_summary.parquet")).to_pandas()
    assert set(summary["model"]) == {"ft", "insec"} and set(summary["task"]) == {"sudoku"}
    assert "## " in open(os.path.join(out, "report.md")).read()
    check_paper_models(out, cfg)
    assert not os.path.exists(os.path.join(out, "multiplication"))
