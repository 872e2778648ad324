"""The eval job on the smoke preset, on real Ray Data, with an FT and an EIFT model per task.

The models are nano Qwen2 models trained in-process for a few dozen steps with the
project's own trace builders and loss (FT: clean traces only; EIFT: every trace
injected), then saved with ``save_pretrained``. They are far from competent, but
the EIFT model has seen the recognition line and the FT model never has, which is
exactly what the recognition metric must tell apart.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from rayjobs import data as data_job
from rayjobs import evaluate as eval_job
from rayjobs.common import JobContext, read_manifest, write_manifest
from selfcorrect import io
from selfcorrect.data import load_problems
from selfcorrect.evaluate import ALL_TYPES, CONDITIONS, ITEM_COLUMNS, RATES, own_errors
from selfcorrect.generation import generate, step_scores, step_surprise
from selfcorrect.loss import LossWeights, collate, encode_example, weighted_lm_loss
from selfcorrect.models import build_model, load_model, save_model
from selfcorrect.stats import GAP_COLUMNS
from selfcorrect.tasks import get_task, signal_line, split_lines
from selfcorrect.traces import build_example

pytestmark = pytest.mark.integration

TRAIN_STEPS = 80
MAX_LEN = 256

DESIGN_SUMMARY_COLUMNS = [
    "task",
    "model",
    "condition",
    "temperature",
    "n",
    "accuracy",
    "recognition_rate",
    "correction_rate",
    "parrot_rate",
    "false_alarm_rate",
] + [f"{r}_{b}" for r in RATES[:5] for b in ("lo", "hi")]


def train_quick(method: str, task, problems, seed: int = 0):
    """A few dozen AdamW steps on ``method`` traces (EIFT: every trace has injected errors)."""
    torch.manual_seed(seed)
    model, tok = build_model("nano", MAX_LEN, seed=seed)
    rng = np.random.default_rng(seed)
    pool = [
        encode_example(
            tok,
            build_example(method, task, problems[i % len(problems)], rng, injection_rate=1.0),
            LossWeights(),
            MAX_LEN,
        )
        for i in range(200)
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(TRAIN_STEPS):
        batch = collate([pool[i] for i in rng.integers(len(pool), size=16)], tok.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        norm = batch["loss_weight"][:, 1:].sum().clamp_min(1e-8)
        loss, _ = weighted_lm_loss(logits, batch, norm)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), tok


def write_ft_harvest(out: str, task, model, tok) -> int:
    """harvest/ft-test.parquet from the FT model's own first error on each test problem."""
    test = io.read_parquet(io.join(out, task.name, "data", "test.parquet")).to_pylist()
    texts = generate(model, tok, [r["prompt"] + "\n" for r in test], max_new_tokens=64)
    rows = []
    for r, text in zip(test, texts, strict=True):
        errs = own_errors(task, task.parse_prompt(r["prompt"]), text)
        if errs:
            e = errs[0]
            rows.append(
                {
                    "error_id": f"{r['problem_id']}-e0",
                    "problem_id": r["problem_id"],
                    "task": task.name,
                    "model": "ft",
                    "temperature": 0.0,
                    "step_index": e["step_index"],
                    "prompt": r["prompt"],
                    "prefix": e["prefix"],
                    "prefix_steps": split_lines(e["prefix"])[1:],
                    "wrong_step": e["wrong_step"],
                    "gold_step": e["gold_step"],
                    "error_type": e["error_type"],
                }
            )
    io.write_parquet(io.join(out, task.name, "harvest", "ft-test.parquet"), rows)
    return len(rows)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, smoke_cfg):
    """Smoke data for both tasks, FT and EIFT nano models, and an FT harvest, on disk."""
    torch.set_num_threads(1)
    out = str(tmp_path_factory.mktemp("eval-run"))
    # The smoke preset leaves the surprise pass off (it costs a second actor pool per task); here
    # it runs and its column is checked.
    cfg = dataclasses.replace(
        smoke_cfg,
        eval=dataclasses.replace(smoke_cfg.eval, models=["ft", "eift", "grpo"], surprise=True),
    )
    ctx = JobContext(cfg, out)
    data_job.run(ctx)
    n_harvest = {}
    for name in cfg.tasks:
        task = get_task(name, **cfg.task_options(name))
        train = load_problems(task, io.read_parquet(ctx.path(name, "data", "train.parquet")))
        for method in ("ft", "eift"):
            model, tok = train_quick(method, task, train)
            save_model(model, tok, ctx.path(name, "models", method))
            if method == "ft":
                n_harvest[name] = write_ft_harvest(out, task, model, tok)
    return ctx, n_harvest


def test_eval_job_ft_vs_eift_all_conditions_and_temperatures(ray_session, trained_run):
    ctx, n_harvest = trained_run
    cfg = ctx.cfg
    eval_job.run(ctx)

    summary = io.read_parquet(ctx.path("eval_summary.parquet")).to_pandas()
    assert set(DESIGN_SUMMARY_COLUMNS + ["error_type"]) <= set(summary.columns)
    temps = sorted(cfg.eval.temperatures)
    agg = summary[summary["error_type"] == ALL_TYPES]
    for task in cfg.tasks:
        for model in ("ft", "eift"):
            rows = io.read_parquet(ctx.path(task, "eval", f"{model}.parquet")).to_pandas()
            assert list(rows.columns) == ITEM_COLUMNS
            assert set(rows["condition"]) == set(CONDITIONS)
            per = rows.groupby(["condition", "temperature"]).size()
            for t in temps:
                assert per[("clean", t)] == cfg.eval.max_problems
                assert per[("synthetic", t)] == cfg.eval.max_problems
                assert per[("ft_errors", t)] == min(cfg.eval.max_errors, n_harvest[task])
                # One per FT error, less the states where no synthetic error type applies.
                assert 0 < per[("matched_synthetic", t)] <= per[("ft_errors", t)]
            # matched_synthetic asks about the ft_errors states: same prompt, steps, position.
            ft_items = rows[rows["condition"] == "ft_errors"].set_index(["temperature", "item_id"])
            for _, m in rows[rows["condition"] == "matched_synthetic"].iterrows():
                f = ft_items.loc[(m["temperature"], m["item_id"].removesuffix("-matched"))]
                assert m["step_index"] == f["step_index"] and m["prompt"] == f["prompt"]
                assert m["prefix"] == f["prefix"]
            # Every error row's prefix is the prompt line and the steps before its wrong step,
            # injected or the model's own.
            for _, r in rows[rows["condition"] != "clean"].iterrows():
                prefix_lines = split_lines(r["prefix"])
                assert prefix_lines[0] == r["prompt"] and r["prefix"].endswith("\n")
                assert len(prefix_lines) - 1 == r["step_index"], (r["condition"], r["prefix"])
                if r["condition"] == "own_errors":
                    assert split_lines(r["completion"])[r["step_index"]] == r["wrong_step"]
            # Every error row carries the model's surprise at its wrong step (clean rows none),
            # the value step_surprise gives in this process for the same model.
            err = rows[rows["condition"] != "clean"]
            assert (
                err["wrong_step_surprise"].notna().all() and (err["wrong_step_surprise"] >= 0).all()
            )
            assert rows[rows["condition"] == "clean"]["wrong_step_surprise"].isna().all()
            m, tok = load_model(ctx.path(task, "models", model))
            some = err.drop_duplicates(["prefix", "wrong_step"]).head(6)
            want = step_surprise(m, tok, list(some["prefix"]), list(some["wrong_step"]))
            assert np.allclose(some["wrong_step_surprise"], want, atol=1e-4)
            # ... and the log-probability of its signal after the wrong and the paired step.
            assert err["signal_logp"].notna().all() and (err["signal_logp"] < 0).all()
            paired = err[err["paired_step"].notna()]
            assert len(paired) and paired["paired_signal_logp"].notna().all()
            some = paired.drop_duplicates(["prefix", "wrong_step"]).head(4)
            sig = [signal_line(model)] * len(some)
            for col, steps in (
                ("signal_logp", "wrong_step"),
                ("paired_signal_logp", "paired_step"),
            ):
                _, want = step_scores(m, tok, list(some["prefix"]), list(some[steps]), sig)
                assert np.allclose(some[col], want, atol=1e-4)
            # The same items at every temperature, and for every model.
            syn = rows[rows["condition"] == "synthetic"]
            by_t = [
                set(zip(g["item_id"], g["wrong_step"], strict=True))
                for _, g in syn.groupby("temperature")
            ]
            assert all(s == by_t[0] for s in by_t)
            m = agg[(agg["task"] == task) & (agg["model"] == model)]
            assert set(zip(m["condition"], m["temperature"], strict=True)) == {
                (c, t) for c in CONDITIONS for t in temps
            }
        ft_rows = io.read_parquet(ctx.path(task, "eval", "ft.parquet")).to_pandas()
        eift_rows = io.read_parquet(ctx.path(task, "eval", "eift.parquet")).to_pandas()
        for cond in ("synthetic", "ft_errors", "matched_synthetic"):
            a = ft_rows[ft_rows["condition"] == cond][["temperature", "item_id", "prefix"]]
            b = eift_rows[eift_rows["condition"] == cond][["temperature", "item_id", "prefix"]]
            pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
        # Per error type rows exist for the error conditions, with the aggregate's n split up.
        syn_types = summary[
            (summary["task"] == task)
            & (summary["condition"] == "synthetic")
            & (summary["error_type"] != ALL_TYPES)
        ]
        assert set(syn_types["error_type"]) <= set(get_task(task).error_types)
        assert (
            syn_types.groupby(["model", "temperature"])["n"].sum().eq(cfg.eval.max_problems).all()
        )

    # Every rate sits inside its 95% interval (Wilson, or the bootstrap over problems).
    for r in RATES:
        ok = summary[r].notna()
        assert (summary.loc[ok, f"{r}_lo"] <= summary.loc[ok, r] + 1e-12).all()
        assert (summary.loc[ok, r] <= summary.loc[ok, f"{r}_hi"] + 1e-12).all()
    assert "grpo" not in set(summary["model"])  # listed in eval.models but never trained

    # A model never shown errors (FT) recognizes almost nothing: measured, every task and temp.
    def rate(task, model, cond, t):
        row = agg[
            (agg["task"] == task)
            & (agg["model"] == model)
            & (agg["condition"] == cond)
            & (agg["temperature"] == t)
        ]
        assert len(row) == 1
        return row.iloc[0]

    for task in cfg.tasks:
        for t in temps:
            for cond in ("synthetic", "ft_errors", "matched_synthetic", "own_errors", "clean"):
                ft = rate(task, "ft", cond, t)
                assert ft["n"] > 0
                assert ft["recognition_rate"] <= 0.05, (task, cond, t, ft["recognition_rate"])
        # The EIFT model, trained on recognition lines, emits them after injected errors.
        eift = rate(task, "eift", "synthetic", 0.0)
        ft = rate(task, "ft", "synthetic", 0.0)
        assert eift["recognition_rate"] >= ft["recognition_rate"] + 0.3, (task, eift, ft)
        assert eift["recognition_rate_lo"] > ft["recognition_rate_hi"]

    # The headline gap table next to the summary: every comparison per task x model x temp.
    gaps = io.read_parquet(ctx.path("eval_gaps.parquet")).to_pandas()
    assert list(gaps.columns) == GAP_COLUMNS
    assert len(gaps) == len(cfg.tasks) * 2 * len(temps) * 3
    assert (gaps["diff_lo"] <= gaps["diff"] + 1e-12).all()
    assert (gaps["diff"] <= gaps["diff_hi"] + 1e-12).all()

    # A second run finds every stage done and rebuilds the same summary.
    before = read_manifest(ctx)["stages"]
    eval_job.run(ctx)
    after = read_manifest(ctx)["stages"]
    for task in cfg.tasks:
        for model in ("ft", "eift"):
            key = f"{task}/eval/{model}"
            assert after[key]["finished"] == before[key]["finished"]
    again = io.read_parquet(ctx.path("eval_summary.parquet")).to_pandas()
    pd.testing.assert_frame_equal(summary, again)
    again = io.read_parquet(ctx.path("eval_gaps.parquet")).to_pandas()
    pd.testing.assert_frame_equal(gaps, again)

    # A model the manifest says another config trained stays out of this run's summary (a
    # reused run directory); its earlier results stay on disk.
    manifest = read_manifest(ctx)
    stale = {"status": "done", "config_hash": "another-config", "artifacts": []}
    write_manifest(ctx, manifest | {"stages": manifest["stages"] | {"sudoku/eift": stale}})
    try:
        eval_job.run(ctx)
        now = io.read_parquet(ctx.path("eval_summary.parquet")).to_pandas()
        assert set(now.query("task == 'sudoku'")["model"]) == {"ft"}
        assert set(now.query("task == 'multiplication'")["model"]) == {"ft", "eift"}
        assert io.exists(eval_job.eval_path(ctx.output_dir, "sudoku", "eift"))
    finally:
        write_manifest(ctx, manifest)
        eval_job.run(ctx)


def test_same_seed_same_numbers(ray_session, trained_run):
    ctx, _ = trained_run
    cfg = ctx.cfg
    task = "sudoku"
    model_dir = ctx.path(task, "models", "eift")
    kw = dict(conditions=["clean", "synthetic", "own_errors"], temperatures=[0.0, 1.0])
    a = eval_job.evaluate_model(cfg, task, model_dir, "rerun-a", ctx.output_dir, **kw)
    # The same model again, now in one pass after another model (as the eval stage runs a
    # task's models): the actors switch models mid-pass and must give the lone pass's rows.
    models = {"rerun-ft": ctx.path(task, "models", "ft"), "rerun-b": model_dir}
    b = eval_job.evaluate_models(cfg, task, models, ctx.output_dir, **kw)["rerun-b"]
    ra = io.read_parquet(eval_job.eval_path(ctx.output_dir, task, "rerun-a")).to_pandas()
    rb = io.read_parquet(eval_job.eval_path(ctx.output_dir, task, "rerun-b")).to_pandas()
    pd.testing.assert_frame_equal(ra.drop(columns="model"), rb.drop(columns="model"))
    rft = io.read_parquet(eval_job.eval_path(ctx.output_dir, task, "rerun-ft")).to_pandas()
    assert rft["completion"].tolist() != rb["completion"].tolist(), "one model wrote both"
    sa, sb = pd.DataFrame(a).drop(columns="model"), pd.DataFrame(b).drop(columns="model")
    pd.testing.assert_frame_equal(sa, sb)
    assert set(sa["condition"]) == {"clean", "synthetic", "own_errors"}
    # Sampling really happened at T=1 (else "identical" would be trivial): it differs from greedy.
    syn = ra[ra["condition"] == "synthetic"]
    greedy = syn[syn["temperature"] == 0.0]["completion"].tolist()
    sampled = syn[syn["temperature"] == 1.0]["completion"].tolist()
    assert greedy != sampled
    # The rows' synthetic errors are the eval items of this seed; another seed draws others
    # (the items are built on the driver: no generation needed to see it).
    wrong = ["wrong_step", "step_index"]
    syn_a = ra[ra["condition"] == "synthetic"]
    items = eval_job.build_items(cfg, task, ctx.output_dir, ["synthetic"])
    assert sorted(zip(syn_a["wrong_step"], syn_a["step_index"], strict=True)) == sorted(
        [(it["wrong_step"], it["step_index"]) for it in items] * 2  # two temperatures
    )
    other = dataclasses.replace(cfg, seed=cfg.seed + 1)
    other_items = eval_job.build_items(other, task, ctx.output_dir, ["synthetic"])
    assert [[it[k] for k in wrong] for it in items] != [
        [it[k] for k in wrong] for it in other_items
    ]
