"""Shared fixtures. Integration tests share ONE local Ray instance for the whole session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _release_run_locks():
    """A job run in-process keeps its output dir's run lock for the life of the process (the
    pytest process here): give it back after each test, as a driver's exit would."""
    yield
    from selfcorrect import runlock

    runlock.release_all()


@pytest.fixture(autouse=True)
def _reset_console():
    """A test that parses a job's command line gets that job's quiet console: undo it."""
    yield
    from selfcorrect import console

    console.reset()


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray instance (2 CPUs), started once and shared by every integration test."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=int(os.environ.get("SELFCORRECT_TEST_CPUS", "2")),
            include_dashboard=False,
            runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "PYTHONPATH": REPO}},
            log_to_driver=True,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smoke_cfg():
    from selfcorrect.config import load_config

    return load_config(os.path.join(REPO, "configs", "smoke.yaml"))


@pytest.fixture(scope="session")
def standin_models(tmp_path_factory):
    """Local stand-ins for the paper's hub models (selfcorrect.standin): arch -> model dir.

    A Qwen2- and a Llama-architecture causal LM (~2M parameters) with byte-level BPE
    tokenizers trained here and chat templates, saved with ``save_pretrained``.
    """
    from selfcorrect.standin import make_standin

    root = tmp_path_factory.mktemp("standin")
    return {arch: make_standin(str(root / arch), arch) for arch in ("qwen2", "llama")}
