"""Security: no credentials in the repo, Ray token auth left on, weights never unpickled.

Model weights are safetensors only and torch checkpoints load with ``weights_only=True``:
a pickle can run arbitrary code on load, so a tampered checkpoint must be refused.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIS = os.path.relpath(os.path.abspath(__file__), REPO)

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(r"aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{40}"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "private key": re.compile(r"-----BEGIN (RSA |EC |OPENSSH |DSA )?PRIVATE KEY-----"),
    "password": re.compile(r"(?i)\bpassword\s*[:=]\s*['\"]?[^\s'\"`{}$<>]{4,}"),
    "Ray auth token": re.compile(r"RAY_AUTH_TOKEN\s*[:=]\s*['\"]?[A-Za-z0-9_\-]{16,}"),
}


def tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return [f for f in out.splitlines() if f != THIS and os.path.isfile(os.path.join(REPO, f))]


def _text(rel: str) -> str:
    with open(os.path.join(REPO, rel), "rb") as f:
        return f.read().decode("utf-8", errors="ignore")


@pytest.mark.parametrize("name", sorted(SECRET_PATTERNS))
def test_secret_patterns_catch_a_planted_example(name):
    """Each pattern must be able to fail: it matches a fake credential of its kind."""
    fake = {
        "AWS access key id": "aws_access_key_id = AKIAABCDEFGHIJKLMNOP",
        "AWS secret key": "aws_secret_access_key: " + "a1B2" * 10,
        "Hugging Face token": "HF_TOKEN=hf_" + "aB3" * 12,
        "GitHub token": "ghp_" + "x" * 36,
        "private key": "-----BEGIN OPENSSH PRIVATE KEY-----",
        "password": "password: hunter22",
        "Ray auth token": "RAY_AUTH_TOKEN=0123456789abcdef0123",
    }[name]
    assert SECRET_PATTERNS[name].search(fake)


def test_no_credentials_in_tracked_files_or_cluster_yaml():
    files = tracked_files()
    assert "cluster.yaml" in files and len(files) > 50
    hits = [
        f"{rel}: {name}: {m.group(0)[:24]}..."
        for rel in files
        for name, pat in SECRET_PATTERNS.items()
        for m in pat.finditer(_text(rel))
    ]
    assert not hits, "credentials in the repo (pass them at submit time instead):\n" + "\n".join(
        hits
    )


def test_ray_token_auth_is_never_disabled():
    off = re.compile(r"RAY_AUTH_MODE\s*=\s*['\"]?(disabled|none|off)\b", re.IGNORECASE)
    hits = [rel for rel in tracked_files() if off.search(_text(rel))]
    assert not hits, f"these files turn Ray token authentication off: {hits}"
    cluster = _text("cluster.yaml")
    assert cluster.count("RAY_AUTH_MODE=token ray start") == 2  # head and workers


def test_readme_says_how_to_pass_the_ray_token():
    readme = _text("README.md")
    for needed in (
        "ray get-auth-token",
        "~/.ray/auth_token",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_MODE=token",
    ):
        assert needed in readme, needed
    assert "HF_TOKEN" in readme and "never written into `cluster.yaml`" in readme


def _code_files() -> list[str]:
    return [
        f
        for f in tracked_files()
        if f.endswith(".py")
        and f.split("/")[0] in ("selfcorrect", "rayjobs", "benchmarks", "tests")
    ]


def _call_text(text: str, start: int) -> str:
    """The argument text of a call whose opening parenthesis ends at ``start``."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return text[start:]


def test_no_unrestricted_unpickling_in_the_code():
    """Every torch.load passes weights_only=True; no pickle.load / pickle.loads anywhere."""
    bad = []
    for rel in _code_files():
        text = _text(rel)
        for m in re.finditer(r"torch\.load\(", text):
            call = _call_text(text, m.end())
            if "weights_only=True" not in call:
                bad.append(f"{rel}: {call}")
        bad += [f"{rel}: pickle load" for _ in re.finditer(r"\bpickle\.loads?\(", text)]
        bad += [
            f"{rel}: use_safetensors=False" for _ in re.finditer(r"use_safetensors=False", text)
        ]
    assert not bad, "unrestricted unpickling can run code from a checkpoint:\n" + "\n".join(bad)


class _Payload:
    """Unpickling this calls ``os.mkdir(marker)``: stands in for any code a pickle can run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    """The training engine's loader refuses a tampered checkpoint; the payload never runs."""
    from selfcorrect.config import load_config
    from selfcorrect.models import build_model
    from selfcorrect.training import TORCH_STATE, Engine, UnsafeCheckpointError, load_torch_state

    marker = str(tmp_path / "pwned")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": {}, "evil": _Payload(marker)}, ckpt / TORCH_STATE)
    cfg = load_config(os.path.join(REPO, "configs/smoke.yaml"))
    model, _ = build_model("nano", 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = Engine(cfg, model, world=1, n_micro=1, use_ray=False)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load checkpoint .*delete"):
        engine.load(str(ckpt))
    assert not os.path.exists(marker)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the same loader reads an honest checkpoint
    engine.save(str(ckpt), rank=0)
    assert set(load_torch_state(str(ckpt / TORCH_STATE))) == {"model", "optimizer", "scheduler"}


def test_model_dir_with_pickled_weights_is_refused(tmp_path):
    """A model directory with pytorch_model.bin (a pickle) instead of safetensors never loads."""
    from selfcorrect.models import ModelPathError, build_model, load_model, save_model

    marker = str(tmp_path / "pwned")
    model, tok = build_model("nano", 64)
    save_model(model, tok, str(tmp_path / "m"))
    os.remove(tmp_path / "m" / "model.safetensors")
    torch.save({"w": _Payload(marker)}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ModelPathError, match="pytorch_model.bin: pickle-based weights are never"):
        load_model(str(tmp_path / "m"))
    assert not os.path.exists(marker)
