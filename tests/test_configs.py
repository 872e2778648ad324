"""Every preset in configs/ loads and validates; the paper presets say what DESIGN 6 asks."""

from __future__ import annotations

import glob
import os

import pytest

from selfcorrect.config import ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
PAPER_MODELS = {
    "Qwen/Qwen2.5-Math-1.5B-Instruct",
    "google/gemma-3-1b-it",
    "meta-llama/Llama-3.2-1B-Instruct",
}


def test_the_presets_are_there():
    names = {os.path.basename(p) for p in PRESETS}
    assert {"smoke.yaml", "paper-multiplication.yaml", "paper-sudoku.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_preset_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.name == os.path.basename(path)[: -len(".yaml")]
    assert cfg.tasks and cfg.train.methods


@pytest.mark.parametrize(
    "preset,task", [("paper-multiplication", "multiplication"), ("paper-sudoku", "sudoku")]
)
def test_paper_presets(preset, task):
    path = os.path.join(REPO, "configs", f"{preset}.yaml")
    cfg = load_config(path)
    assert cfg.tasks == [task]
    if task == "multiplication":
        assert (cfg.multiplication.digits_a, cfg.multiplication.digits_b) == (4, 4)
    assert cfg.model.path in PAPER_MODELS
    assert cfg.train.use_gpu and cfg.train.bf16 and cfg.train.zero_stage in (1, 2, 3)
    assert cfg.eval.use_gpu and cfg.eval.temperatures == [0.0, 0.7, 1.0]
    assert set(cfg.train.methods) == {"ft", "eift", "hybrid", "insec"} and cfg.grpo.enabled
    assert cfg.coverage.n_samples == 10000
    text = open(path).read()
    for model in PAPER_MODELS:  # the comments name every paper model and how weights arrive
        assert model in text
    assert "HF_TOKEN" in text and "cluster.yaml" in text
    # the other paper models are one override away
    other = load_config(path, ["model.path=google/gemma-3-1b-it"])
    assert other.model.path == "google/gemma-3-1b-it"


def test_a_broken_preset_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {max_stpes: 3}\n")
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        load_config(str(bad))
