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


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    from selfcorrect.standin import make_standin

    root = tmp_path_factory.mktemp("standin")
    return {arch: make_standin(str(root / arch), arch) for arch in ("qwen2", "llama")}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("preset", ["paper-multiplication", "paper-sudoku"])
def test_paper_preset_max_length_fits_four_errors_under_a_bpe_tokenizer(standins, preset, arch):
    """model.max_length of a paper preset holds the longest trace with 4 injected errors, as
    training encodes it (the chat template around the prompt, InSeC's tokens, EOS) under a
    byte-level BPE tokenizer that splits numbers as Qwen2 / Llama 3 do."""
    import numpy as np

    from selfcorrect.loss import LossWeights, encode_example
    from selfcorrect.models import adapt_tokenizer, load_tokenizer
    from selfcorrect.tasks import get_task
    from selfcorrect.traces import eift_example

    cfg = load_config(
        os.path.join(REPO, "configs", f"{preset}.yaml"), [f"model.path={standins[arch]}"]
    )
    tok = load_tokenizer(cfg.model.path)
    adapt_tokenizer(tok, cfg.model.chat_template)
    assert tok.chat_template, "the stand-in is an instruct model: its template is used"
    (task_name,) = cfg.tasks
    task = get_task(task_name, **cfg.task_options(task_name))
    rng = np.random.default_rng(0)
    longest = 0
    for _ in range(100):
        problem = task.sample_problem(rng)
        ex = eift_example(task, problem, rng, cfg.train.max_errors)
        while len(ex.error_steps) < 4:
            ex = eift_example(task, problem, rng, cfg.train.max_errors)
        n = len(encode_example(tok, ex, LossWeights())["input_ids"])
        longest = max(longest, n)
    assert cfg.train.max_errors == 4
    assert longest <= cfg.model.max_length, (preset, arch, longest)
    print(f"{preset} / {arch}: longest trace with 4 errors {longest} of {cfg.model.max_length}")
