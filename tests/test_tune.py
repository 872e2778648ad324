"""Unit tests of the sweep's pure parts: search space from config, trial naming, resources,
validation loss, results table and plots (no Ray cluster)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.variant_generator import generate_variants

from selfcorrect.config import ConfigError, load_config
from selfcorrect.tune import (
    RESULT_COLUMNS,
    TrialParams,
    check_space,
    max_concurrent,
    num_samples,
    param_space,
    plot_metric,
    results_table,
    scheduler,
    search_alg,
    summary_metrics,
    sweep_hash,
    trial_config,
    trial_hash,
    trial_params,
    validation_examples,
    validation_loss,
)


def cfg_with(*overrides: str):
    return load_config(None, list(overrides))


def variants(space: dict, n: int = 1, seed: int | None = None) -> list[dict]:
    """Resolve a param space the way Tune's BasicVariantGenerator does."""
    import numpy as np

    rs = np.random.RandomState(seed) if seed is not None else None
    out = []
    for _ in range(n):
        out += [cfg for _, cfg in generate_variants(space, random_state=rs)]
    return out


def test_default_grid_is_the_injection_rates():
    cfg = cfg_with()
    space = param_space(cfg)
    assert space["injection_rate"] == tune.grid_search([0.05, 0.1, 0.2, 0.35, 0.5])
    assert set(space) == {"injection_rate", "replicate"}
    assert num_samples(cfg) == 1 and search_alg(cfg) is None
    rates = sorted(v["injection_rate"] for v in variants(space))
    assert rates == [0.05, 0.1, 0.2, 0.35, 0.5]


def test_optional_grids_multiply():
    cfg = cfg_with(
        "tune.injection_rates=[0.1,0.3]", "tune.max_errors=[1,4]", "tune.w_recognition=[0.5,1,2]"
    )
    vs = variants(param_space(cfg))
    assert len(vs) == 2 * 2 * 3
    combos = {(v["injection_rate"], v["max_errors"], v["w_recognition"]) for v in vs}
    assert len(combos) == 12
    assert "w_correction" not in param_space(cfg)  # not listed -> not swept


def test_grid_repeats_are_replicates_with_distinct_names():
    cfg = cfg_with("tune.injection_rates=[0.2]", "tune.num_samples=3")
    vs = variants(param_space(cfg))
    assert sorted(v["replicate"] for v in vs) == [0, 1, 2]
    names = {trial_params(cfg, v).name for v in vs}
    assert len(names) == 3


def test_single_value_lists_are_constants_not_grids():
    cfg = cfg_with("tune.injection_rates=[0.3]", "tune.max_errors=[2]")
    space = param_space(cfg)
    assert space["injection_rate"] == 0.3 and space["max_errors"] == 2


def test_random_search_samples_the_rate_range_reproducibly():
    cfg = cfg_with(
        "tune.search=random",
        "tune.num_samples=20",
        "tune.injection_rates=[0.05,0.5]",
        "tune.max_errors=[1,2,4]",
    )
    space = param_space(cfg)
    assert num_samples(cfg) == 20
    assert isinstance(search_alg(cfg), BasicVariantGenerator)
    a = variants(space, 20, seed=0)
    b = variants(space, 20, seed=0)
    assert [v["injection_rate"] for v in a] == [v["injection_rate"] for v in b]
    rates = [v["injection_rate"] for v in a]
    assert all(0.05 <= r <= 0.5 for r in rates) and len(set(rates)) == 20
    assert {v["max_errors"] for v in a} <= {1, 2, 4}


def test_random_search_with_one_sample_is_refused():
    cfg = cfg_with("tune.search=random", "tune.num_samples=1")
    with pytest.raises(ConfigError, match="num_samples"):
        check_space(cfg)


@pytest.mark.parametrize(
    "override, key",
    [
        ("tune.injection_rates=[1.5]", "tune.injection_rates"),
        ("tune.injection_rates=[]", "tune.injection_rates"),
        ("tune.max_errors=[0]", "tune.max_errors"),
        ("tune.search=bayes", "tune.search"),
        ("tune.init=best", "tune.init"),
        ("tune.max_concurrent=-1", "tune.max_concurrent"),
    ],
)
def test_bad_tune_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg_with(override)


def test_asha_only_when_asked():
    assert scheduler(cfg_with()) is None
    s = scheduler(cfg_with("tune.asha=true", "tune.asha_grace_period=2"))
    assert s is not None and s.metric == "val_loss" and s._mode == "min"


def test_trial_params_fill_unswept_values_from_train():
    cfg = cfg_with("train.max_errors=3", "train.w_correction=0.5")
    p = trial_params(cfg, {"injection_rate": 0.35, "replicate": 0})
    assert p == TrialParams(0.35, 3, 1.0, 0.5, 0)
    assert p.name == "rate=0.35-errs=3-wrec=1-wcor=0.5-rep=0"
    with pytest.raises(ValueError, match="unknown tune parameters"):
        trial_params(cfg, {"lr": 0.1})


def test_trial_config_is_eift_with_the_trial_hyperparameters():
    cfg = cfg_with("tune.max_steps=7", "train.checkpoint_every=200")
    t = trial_config(cfg, TrialParams(0.05, 2, 0.5, 2.0))
    assert t.train.methods == ["eift"]
    assert (t.train.injection_rate, t.train.max_errors) == (0.05, 2)
    assert (t.train.w_recognition, t.train.w_correction) == (0.5, 2.0)
    assert t.train.max_steps == 7 and t.train.checkpoint_every == 7
    assert t.seed == cfg.seed and t.eval == cfg.eval  # same eval items for every trial


def test_hashes_ignore_concurrency_but_not_settings():
    base = cfg_with()
    assert sweep_hash(base, "sudoku") == sweep_hash(cfg_with("tune.max_concurrent=3"), "sudoku")
    # How trials get their process changes no result: a sweep resumes across it.
    assert sweep_hash(base, "sudoku") == sweep_hash(cfg_with("tune.reuse_actors=false"), "sudoku")
    assert sweep_hash(base, "sudoku") != sweep_hash(cfg_with("tune.max_steps=5"), "sudoku")
    assert sweep_hash(base, "sudoku") != sweep_hash(base, "multiplication")
    p = TrialParams(0.1, 4, 1.0, 1.0)
    assert trial_hash(base, "sudoku", p) != trial_hash(
        base, "sudoku", TrialParams(0.2, 4, 1.0, 1.0)
    )


def test_max_concurrent_from_resources():
    cfg = cfg_with("train.cpus_per_worker=1")
    assert max_concurrent(cfg, {"CPU": 2.0}) == 2
    assert max_concurrent(cfg, {"CPU": 5.0}) == 5
    assert max_concurrent(cfg_with("train.cpus_per_worker=2"), {"CPU": 2.0}) == 1
    assert max_concurrent(cfg_with("train.cpus_per_worker=4"), {"CPU": 2.0}) == 1  # never 0
    gpu = cfg_with("train.use_gpu=true", "train.num_workers=2", "train.batch_size=128")
    assert max_concurrent(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4
    assert max_concurrent(cfg_with("tune.max_concurrent=3"), {"CPU": 64.0}) == 3


def test_a_trial_trains_in_its_own_process_only_where_a_trainer_adds_nothing_but_start_up():
    from selfcorrect.config import ConfigError
    from selfcorrect.tune import trains_in_trial, trial_function_resources

    one = cfg_with("train.num_workers=1", "train.cpus_per_worker=1")
    assert trains_in_trial(one, "runs/x")
    assert trial_function_resources(one, "runs/x")["cpu"] == 1.0  # it holds the worker's core
    assert not trains_in_trial(one, "s3://bucket/run")  # checkpoints must reach other nodes
    two = cfg_with("train.num_workers=2", "train.micro_batch_size=8")
    assert not trains_in_trial(two, "runs/x")
    assert "cpu" not in trial_function_resources(two, "runs/x")  # a driver: memory only
    assert not trains_in_trial(cfg_with("train.num_workers=1", "train.zero_stage=2"), "runs/x")
    assert not trains_in_trial(cfg_with("train.num_workers=1", "train.use_gpu=true"), "runs/x")
    assert not trains_in_trial(cfg_with("train.num_workers=1", "tune.trainer=ray_train"), "r")
    # the trainer is how, not what: the same sweep either way
    assert sweep_hash(one, "sudoku") == sweep_hash(
        cfg_with("train.num_workers=1", "train.cpus_per_worker=1", "tune.trainer=ray_train"),
        "sudoku",
    )
    with pytest.raises(ConfigError, match="tune.trainer.*num_workers=1"):
        cfg_with("train.num_workers=2", "train.micro_batch_size=8", "tune.trainer=in_trial")
    with pytest.raises(ConfigError, match="tune.trainer.*choose auto"):
        cfg_with("tune.trainer=inline")


def test_validation_loss_matches_the_training_loss_normalisation():
    import torch

    from selfcorrect.data import load_problems, make_splits
    from selfcorrect.loss import LossWeights, collate, encode_example, weighted_lm_loss
    from selfcorrect.models import build_model
    from selfcorrect.tasks import get_task

    cfg = cfg_with("tune.val_examples=6", "multiplication.digits_a=2", "multiplication.digits_b=2")
    task = get_task("multiplication", **cfg.task_options("multiplication"))
    problems = load_problems(task, make_splits(task, 5, 8, 0)["test"])
    p = TrialParams(0.5, 2, 1.0, 1.0)
    ex = validation_examples(cfg, task, problems, p)
    assert len(ex) == 6
    assert ex == validation_examples(cfg, task, problems, p)  # seeded: the same set every time
    assert all(e.source == "clean" for e in validation_examples(cfg, task, problems, p, clean=True))
    assert any(
        e.source == "synthetic"
        for e in validation_examples(cfg, task, problems, TrialParams(1.0, 2, 1.0, 1.0))
    )
    model, tok = build_model("nano", 160, seed=0)
    got = validation_loss(model, tok, ex, p, 160, batch_size=4)  # batched in 2
    # Reference: one batch, the training loss with the global weight as normaliser.
    enc = [encode_example(tok, e, LossWeights(), 160) for e in ex]
    b = collate(enc, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    ref, _ = weighted_lm_loss(logits, b, normalizer=b["loss_weight"][:, 1:].sum())
    assert got == pytest.approx(float(ref), rel=1e-5)
    assert math.log(len(tok)) * 0.5 < got < math.log(len(tok)) * 2  # random init ~ log(vocab)


def _summary(rows):
    base = {"task": "sudoku", "model": "m", "temperature": 0.0, "error_type": "all"}
    return [{**base, **r} for r in rows]


def test_summary_metrics_flatten_the_aggregate_rows():
    s = _summary(
        [
            {
                "condition": "clean",
                "n": 10,
                "accuracy": 0.6,
                "recognition_rate": 0.0,
                "correction_rate": 0.0,
            },
            {
                "condition": "synthetic",
                "n": 10,
                "accuracy": 0.5,
                "recognition_rate": 0.4,
                "correction_rate": 0.3,
            },
            {
                "condition": "synthetic",
                "error_type": "invalid",
                "n": 4,
                "accuracy": 1.0,
                "recognition_rate": 1.0,
                "correction_rate": 1.0,
            },
        ]
    )
    m = summary_metrics(s)
    assert m["synthetic_recognition_rate"] == 0.4 and m["synthetic_correction_rate"] == 0.3
    assert m["synthetic_n"] == 10 and m["clean_accuracy"] == 0.6
    # No own errors at all: NaN rates, n = 0 (not a crash, not a fake zero).
    assert math.isnan(m["own_errors_recognition_rate"]) and m["own_errors_n"] == 0


def test_results_table_one_row_per_trial_sorted():
    recs = [
        {
            "config": {"injection_rate": 0.5, "replicate": 0},
            "trial_id": "b",
            "metrics": {
                "trial": "t5",
                "injection_rate": 0.5,
                "max_errors": 4,
                "val_loss": 1.0,
                "synthetic_accuracy": 0.2,
                "synthetic_n": 8,
            },
        },
        {
            "config": {"injection_rate": 0.1, "replicate": 0},
            "trial_id": "a",
            "metrics": {
                "trial": "t1",
                "injection_rate": 0.1,
                "max_errors": 4,
                "val_loss": 2.0,
                "synthetic_accuracy": 0.4,
                "synthetic_n": 8,
            },
        },
        {
            "config": {"injection_rate": 0.3, "replicate": 0},
            "trial_id": "c",
            "metrics": {},
            "error": RuntimeError("boom"),
        },
    ]
    df = results_table("sudoku", recs)
    assert list(df.columns) == RESULT_COLUMNS
    assert df["injection_rate"].tolist() == [0.1, 0.3, 0.5]
    assert df["trial_id"].tolist() == ["a", "c", "b"]
    assert df["status"].tolist() == ["done", "error", "done"]
    assert df.loc[1, "error"] == "boom" and math.isnan(df.loc[1, "val_loss"])
    assert (df["task"] == "sudoku").all()
    # Parquet-ready: stable dtypes survive a round trip.
    import pyarrow as pa

    t = pa.Table.from_pandas(df, preserve_index=False)
    assert t.schema.field("synthetic_n").type == pa.int64()
    assert t.schema.field("val_loss").type == pa.float64()


def test_plot_lines_per_other_swept_parameter():
    df = pd.DataFrame(
        {
            "injection_rate": [0.1, 0.5, 0.1, 0.5],
            "max_errors": [1, 1, 4, 4],
            "w_recognition": [1.0] * 4,
            "w_correction": [1.0] * 4,
            "val_loss": [1.0, 0.9, 1.1, 0.8],
            "synthetic_accuracy": [math.nan] * 4,
        }
    )
    fig = plot_metric(df, "val_loss", "sudoku")
    ax = fig.axes[0]
    assert len(ax.lines) == 2  # one per max_errors value
    assert ax.get_xlabel() == "injection rate"
    assert plot_metric(df, "synthetic_accuracy", "sudoku") is None  # nothing to plot


def test_segments_are_asha_rungs_ending_at_max_steps():
    from selfcorrect.tune import segment_ends

    assert segment_ends(cfg_with("tune.max_steps=100")) == [100]  # no ASHA: one report
    assert segment_ends(cfg_with("tune.max_steps=100", "tune.asha=true")) == [25, 50, 75, 100]
    assert segment_ends(cfg_with("tune.max_steps=10", "tune.report_every=4")) == [4, 8, 10]
    assert segment_ends(cfg_with("tune.max_steps=2", "tune.asha=true")) == [1, 2]
