"""What every full pipeline run must have written, checked the same way for the smoke preset
and the paper presets on the stand-in models."""

from __future__ import annotations

import json
import os

from rayjobs import pipeline
from selfcorrect import io
from selfcorrect.report import load_run
from selfcorrect.standin import toy_overrides as paper_overrides  # noqa: F401 (re-exported)

SUMMARY_COLUMNS = [
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
    *[
        f"{r}_{s}"
        for r in ("accuracy", "recognition_rate", "correction_rate")
        for s in ("lo", "hi")
    ],
]


def check_layout(out: str, cfg, timings: dict) -> None:
    """Every step ran; every stage is done; the DESIGN 7 files and eval_summary columns."""
    assert list(timings) == pipeline.STEP_NAMES
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    stages = manifest["stages"]
    assert {k: v["status"] for k, v in stages.items() if v["status"] != "done"} == {}
    models = pipeline.produced_models(cfg)
    for task in cfg.tasks:
        for key in (
            f"{task}/data",
            *[f"{task}/{m}" for m in cfg.train.methods],
            f"{task}/harvest/ft-train",
            f"{task}/harvest/ft-test",
            f"{task}/coverage/ft",
            f"{task}/grpo",
            *[f"{task}/eval/{m}" for m in models],
        ):
            assert key in stages, key
        for rel in (
            "data/train.parquet",
            "data/test.parquet",
            "harvest/ft-train.parquet",
            "harvest/ft-test.parquet",
            "coverage/ft.parquet",
            "tune/results.parquet",
            *[f"models/{m}/config.json" for m in models],
            *[f"eval/{m}.parquet" for m in models],
        ):
            assert io.exists(os.path.join(out, task, rel)), f"{task}/{rel}"
    summary = io.read_parquet(os.path.join(out, "eval_summary.parquet"), SUMMARY_COLUMNS)
    s = summary.to_pandas()
    assert set(s["model"]) == set(models) and set(s["task"]) == set(cfg.tasks)
    assert set(s["temperature"]) == set(cfg.eval.temperatures)
    assert manifest["pipeline"]["total_seconds"] > 0


def check_report(out: str, cfg) -> None:
    """report.md links the figures, which exist; the notebook's loader reads the run."""
    text = open(os.path.join(out, "report.md")).read()
    for fig in ("figure6", "accuracy", "temperature", "tune"):
        assert f"figures/{fig}.png" in text, fig
        assert os.path.getsize(os.path.join(out, "figures", f"{fig}.png")) > 1000
    run = load_run(out)
    assert run.tasks == cfg.tasks and run.models == pipeline.produced_models(cfg)
    assert run.notes == []
    # Every model (grpo included) says which numeric path trained it; the header names it.
    assert run.train["bf16"].notna().all() and "ft" in set(run.train["method"])
    # Every error row says where it stands: the position table is there, not skipped.
    assert run.evals[run.evals.condition == "synthetic"]["last_step"].notna().all()
    assert "| at last step |" in text
    path = "fp32" if cfg.train.bf16 is False else "bf16 autocast"
    assert f"- training precision: {path}" in text.split("## ")[0]


def check_notebook(out: str, task: str) -> None:
    from test_report import execute_notebook

    nb = execute_notebook(out, task=task, method="eift")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) >= 4


def check_mlflow(out: str, cfg) -> None:
    """The run read back through the MLflow client (rayjobs.tracking): the parent with the
    config and report, a curve per trained model, eval rates, the Tune trials."""
    import mlflow

    rec = json.loads(open(os.path.join(out, "manifest.json")).read())["tracking"]
    store = os.path.join(out, "mlruns", "mlflow.db")
    assert rec["uri"] == f"sqlite:///{store}" and os.path.exists(store)
    client = mlflow.MlflowClient(tracking_uri=rec["uri"])
    parent = client.get_run(rec["parent_run_id"])
    assert parent.data.params["name"] == cfg.name
    assert parent.data.params["train.max_steps"] == str(cfg.train.max_steps)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "manifest.json", "figures"} <= arts, arts
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert "figures/figure6.png" in figures

    def children(run_id: str) -> dict[str, object]:
        runs = client.search_runs(
            [rec["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
        )
        return {r.data.tags.get("selfcorrect.stage", r.info.run_name): r for r in runs}

    stages = children(parent.info.run_id)
    for task in cfg.tasks:
        for model in pipeline.produced_models(cfg):
            run = stages[f"{task}/{model}"].info.run_id
            curve = "reward_mean" if model == "grpo" else "loss"
            assert len(client.get_metric_history(run, curve)) >= 1, (task, model)
            ev = stages[f"{task}/eval/{model}"].data.metrics
            for t in cfg.eval.temperatures:
                assert f"synthetic/T{t:g}/recognition_rate" in ev, (task, model, t)
        assert len(client.get_metric_history(stages[f"{task}/grpo"].info.run_id, "kl")) >= 1
        trials = children(stages[f"{task}/tune"].info.run_id)
        assert len(trials) == len(cfg.tune.injection_rates), task
        assert all("val_loss" in r.data.metrics for r in trials.values()), task


def check_paper_models(out: str, cfg) -> None:
    """Each saved model: merged (no adapter files), InSeC's tokens in the BPE vocabulary, the
    instruct chat template kept (model.chat_template), loadable by transformers alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (task,) = cfg.tasks
    for model in pipeline.produced_models(cfg):
        d = os.path.join(out, task, "models", model)
        assert not os.path.exists(os.path.join(d, "adapter_config.json")), model
        tok = AutoTokenizer.from_pretrained(d)
        assert tok.chat_template and "</mistake>" in tok.get_vocab(), model
        m = AutoModelForCausalLM.from_pretrained(d)
        assert m.get_input_embeddings().num_embeddings == len(tok), model
