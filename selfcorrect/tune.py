"""The injection-rate sweep: search space, trial naming, validation loss, results table, plots.

``rayjobs.tune`` runs it with Ray Tune; everything here that does not need a
running Ray cluster is a plain function, so the search space and the results
table are unit-tested on their own.

A trial is one set of hyperparameters (injection rate, and optionally max
errors per trace and the recognition / correction loss weights). It trains an
EIFT model with them (a Ray Train run), then scores it on held-out test
problems: the weighted validation loss on traces of the trial's own mixture,
and accuracy, recognition and correction on ``synthetic`` and ``own_errors``
(greedy decoding), with the metric code of ``selfcorrect.evaluate``.

Trials are named by their parameters (``rate=0.1-errs=4-wrec=1-wcor=1-rep=0``),
not by Tune's random trial id, so a finished trial's directory
``<task>/tune/trials/<name>/`` (model + ``result.json``) is found again after
an interrupted sweep, whether Tune restores the experiment or starts it anew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from selfcorrect import io
from selfcorrect.config import Config, ConfigError

# Hyperparameters a trial can sweep; anything not swept takes its value from ``train.*``.
PARAMS = ("injection_rate", "max_errors", "w_recognition", "w_correction")
# Conditions each trial is evaluated on, and the rates reported per condition.
TRIAL_CONDITIONS = ("synthetic", "own_errors")
TRIAL_RATES = ("accuracy", "recognition_rate", "correction_rate")
VAL_METRIC = "val_loss"  # what ASHA watches (mode min)

# Columns of <task>/tune/results.parquet, in order (more may follow).
RESULT_COLUMNS = [
    "task",
    "trial",
    "trial_id",
    "status",
    *PARAMS,
    "replicate",
    "max_steps",
    "init",
    "val_loss",
    "val_loss_clean",
    "train_loss",
    "clean_accuracy",
    *[f"{c}_{r}" for c in TRIAL_CONDITIONS for r in TRIAL_RATES],
    *[f"{c}_n" for c in TRIAL_CONDITIONS],
    "train_seconds",
    "eval_seconds",
    "started_at",
    "finished_at",
    "model_path",
    "error",
]

# Metrics plotted against the injection rate (one PNG each).
PLOT_METRICS = [
    "val_loss",
    "val_loss_clean",
    "clean_accuracy",
    *[f"{c}_{r}" for c in TRIAL_CONDITIONS for r in TRIAL_RATES],
]


# ---------------------------------------------------------------------------
# Search space
# ---------------------------------------------------------------------------


def swept_lists(cfg: Config) -> dict[str, list[Any]]:
    """Parameter -> the values ``tune.*`` lists for it (injection rate always; others if given)."""
    tc = cfg.tune
    out: dict[str, list[Any]] = {"injection_rate": [float(r) for r in tc.injection_rates]}
    for name in ("max_errors", "w_recognition", "w_correction"):
        values = list(getattr(tc, name))
        if values:
            out[name] = values
    return out


def param_space(cfg: Config) -> dict[str, Any]:
    """The Tune ``param_space``.

    grid:   ``grid_search`` over every listed parameter; ``num_samples > 1``
            repeats each point with another training seed (``replicate``).
    random: the injection rate uniform over [min, max] of ``tune.injection_rates``
            (a single rate stays fixed), other listed parameters drawn from their
            lists; ``tune.num_samples`` trials in all, seeded by ``seed``.
    """
    from ray import tune

    lists = swept_lists(cfg)
    space: dict[str, Any] = {}
    if cfg.tune.search == "grid":
        for name, values in lists.items():
            space[name] = tune.grid_search(values) if len(values) > 1 else values[0]
        n = cfg.tune.num_samples
        space["replicate"] = tune.grid_search(list(range(n))) if n > 1 else 0
        return space
    rates = lists.pop("injection_rate")
    lo, hi = min(rates), max(rates)
    space["injection_rate"] = tune.uniform(lo, hi) if hi > lo else lo
    for name, values in lists.items():
        space[name] = tune.choice(values) if len(values) > 1 else values[0]
    space["replicate"] = 0
    return space


def num_samples(cfg: Config) -> int:
    """Tune's ``num_samples``: 1 for grid (repeats are a grid axis), the trial count for random."""
    return 1 if cfg.tune.search == "grid" else cfg.tune.num_samples


def search_alg(cfg: Config) -> Any:
    """Random search seeded from the config (same seed, same sampled trials); grid needs none."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if cfg.tune.search == "grid":
        return None
    return BasicVariantGenerator(random_state=int(cfg.seed))


def scheduler(cfg: Config) -> Any:
    """ASHA on the validation loss when ``tune.asha``; otherwise FIFO (every trial runs to the end)."""
    if not cfg.tune.asha:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        metric=VAL_METRIC,
        mode="min",
        grace_period=cfg.tune.asha_grace_period,
        reduction_factor=cfg.tune.asha_reduction_factor,
        max_t=10**9,  # trials end by tune.max_steps, not by ASHA's budget
    )


def trial_resources(cfg: Config) -> dict[str, float]:
    """Resources one trial holds while training: its Ray Train workers' (the trial's own
    driver function only reserves memory, see ``DRIVER_RESOURCES``)."""
    t = cfg.train
    if t.use_gpu:
        return {"CPU": float(t.num_workers * t.cpus_per_worker), "GPU": float(t.num_workers)}
    return {"CPU": float(t.num_workers * t.cpus_per_worker)}


# The Tune function is only the driver of a Ray Train run (Ray's documented Tune-over-Train
# pattern): it reserves a little memory and no CPU, so on a 2-core machine two trials' workers
# can both get their core. Concurrency is bounded by ``max_concurrent_trials`` instead.
DRIVER_RESOURCES = {"memory": 256 * 1024**2}


def trains_in_trial(cfg: Config, output_dir: str) -> bool:
    """Whether a trial runs the training loop in its own process (``tune.trainer``).

    ``auto`` picks it for one CPU worker without ZeRO writing to a local output dir: there a
    ``TorchTrainer`` adds only its start-up (a controller and a worker process, ~20 s a trial
    on 2 cores) to the same loop on the same core. Its checkpoints stay on the trial's disk.
    """
    mode, t = cfg.tune.trainer, cfg.train
    if mode != "auto":
        return mode == "in_trial"
    local = not io.is_uri(output_dir)
    return local and t.num_workers == 1 and t.zero_stage == 0 and not t.use_gpu


def trial_function_resources(cfg: Config, output_dir: str) -> dict[str, float]:
    """What the Tune function reserves: a driver's memory, or (training in the trial) the
    worker's cores and GPU as well."""
    if not trains_in_trial(cfg, output_dir):
        return dict(DRIVER_RESOURCES)
    need = trial_resources(cfg)
    return {**DRIVER_RESOURCES, "cpu": need["CPU"], "gpu": need.get("GPU", 0.0)}


def max_concurrent(cfg: Config, cluster: Mapping[str, float]) -> int:
    """``tune.max_concurrent``, or (0) as many trials as the cluster's CPUs/GPUs can train at once.

    Each trial's evaluation runs after its training on at most the same resources,
    so training resources decide. At least 1, even on a cluster that is still
    scaling up (Ray Train then waits for its workers).
    """
    if cfg.tune.max_concurrent > 0:
        return cfg.tune.max_concurrent
    need = trial_resources(cfg)
    fits = min(math.floor(float(cluster.get(k, 0.0)) / v) for k, v in need.items() if v > 0)
    return max(1, fits)


def eval_resources(cfg: Config) -> dict[str, float]:
    """Resources of a trial's evaluation task (after its training released the workers')."""
    if cfg.eval.use_gpu or cfg.train.use_gpu:
        return {"num_cpus": 1, "num_gpus": 1}
    return {"num_cpus": min(cfg.eval.cpus_per_actor, cfg.train.cpus_per_worker)}


# ---------------------------------------------------------------------------
# One trial's parameters
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrialParams:
    injection_rate: float
    max_errors: int
    w_recognition: float
    w_correction: float
    replicate: int = 0

    @property
    def name(self) -> str:
        """Readable and unique per parameter set: the trial's directory name."""
        return (
            f"rate={_num(self.injection_rate)}-errs={self.max_errors}-"
            f"wrec={_num(self.w_recognition)}-wcor={_num(self.w_correction)}-rep={self.replicate}"
        )


def _num(x: float) -> str:
    return f"{float(x):.4g}"


def trial_params(cfg: Config, config: Mapping[str, Any]) -> TrialParams:
    """A Tune trial config -> full parameters (unswept ones from ``train.*``)."""
    unknown = set(config) - set(PARAMS) - {"replicate"}
    if unknown:
        raise ValueError(f"unknown tune parameters {sorted(unknown)}; sweepable: {PARAMS}")
    t = cfg.train
    return TrialParams(
        injection_rate=round(float(config.get("injection_rate", t.injection_rate)), 6),
        max_errors=int(config.get("max_errors", t.max_errors)),
        w_recognition=float(config.get("w_recognition", t.w_recognition)),
        w_correction=float(config.get("w_correction", t.w_correction)),
        replicate=int(config.get("replicate", 0)),
    )


def trial_config(cfg: Config, params: TrialParams) -> Config:
    """The run config of one trial: EIFT with the trial's hyperparameters and ``tune.max_steps``.

    Replicate ``r`` trains with seed ``cfg.seed + r``; data, eval items and eval
    sampling seeds stay those of ``cfg.seed`` (every trial is scored on the same
    items). The LR schedule spans ``tune.max_steps`` even when the trial trains
    in segments (``segment_ends``), so segments replay one uninterrupted run.
    """
    train = dataclasses.replace(
        cfg.train,
        methods=["eift"],
        injection_rate=params.injection_rate,
        max_errors=params.max_errors,
        w_recognition=params.w_recognition,
        w_correction=params.w_correction,
        max_steps=cfg.tune.max_steps,
        checkpoint_every=min(cfg.train.checkpoint_every, cfg.tune.max_steps)
        if cfg.train.checkpoint_every
        else 0,
    )
    return dataclasses.replace(cfg, seed=cfg.seed + params.replicate, train=train)


def segment_ends(cfg: Config) -> list[int]:
    """Steps after which a trial reports its validation loss (ASHA's rungs), ending at max_steps.

    ``tune.report_every`` steps apart; 0 = four reports under ASHA, one otherwise.
    """
    total = cfg.tune.max_steps
    every = cfg.tune.report_every or (max(1, total // 4) if cfg.tune.asha else total)
    ends = list(range(every, total, every))
    return ends + [total]


def sweep_hash(cfg: Config, task: str) -> str:
    """What decides a task's sweep results: data, model, training, eval and tune settings.

    Resource-only keys (concurrency, workers' placement, ``tune.trainer``,
    ``tune.reuse_actors``) are left out, so a sweep can be resumed with another
    ``tune.max_concurrent``.
    """
    d = cfg.to_dict()
    skip = ("max_concurrent", "enabled", "trainer", "reuse_actors")
    tune = {k: v for k, v in d["tune"].items() if k not in skip}
    train = {k: v for k, v in d["train"].items() if k not in ("methods", "max_failures")}
    ev = {k: v for k, v in d["eval"].items() if k in ("max_problems", "max_new_tokens")}
    blob = {
        "seed": d["seed"],
        "task": d[task],
        "data": d["data"],
        "model": d["model"],
        "train": train,
        "eval": ev,
        "tune": tune,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def trial_hash(cfg: Config, task: str, params: TrialParams) -> str:
    """Identity of one trial's result: the sweep settings plus its own parameters."""
    blob = {"sweep": sweep_hash(cfg, task), "params": dataclasses.asdict(params)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# Validation loss
# ---------------------------------------------------------------------------


def validation_examples(
    cfg: Config, task: Any, problems: Sequence[Any], params: TrialParams, clean: bool = False
) -> list[Any]:
    """A fixed, seeded set of held-out traces with the trial's mixture (or all clean).

    The random stream is the same for every trial, so two trials differ only by
    their parameters (common random numbers), not by which traces were drawn.
    """
    from selfcorrect.data import stream_rng
    from selfcorrect.traces import build_example

    rng = stream_rng(cfg.seed, task.name, "tune-val")
    out = []
    for problem in list(problems)[: cfg.tune.val_examples]:
        out.append(
            build_example(
                "ft" if clean else "eift",
                task,
                problem,
                rng,
                injection_rate=params.injection_rate,
                max_errors=params.max_errors,
                type_weights=cfg.train_error_weights(task.name),
                error_placement=cfg.train.error_placement,
            )
        )
    return out


def validation_loss(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    params: TrialParams,
    max_length: int,
    batch_size: int = 32,
) -> float:
    """Weighted LM loss per unit of loss weight over ``examples`` (``selfcorrect.loss`` masks).

    The same normalisation as training: summed weighted NLL over the whole set
    divided by its total weight.
    """
    import torch

    from selfcorrect.loss import LossWeights, collate, encode_example, weighted_lm_loss

    weights = LossWeights(w_recognition=params.w_recognition, w_correction=params.w_correction)
    # (w_decision stays 1 here: the validation loss is comparable across trials and presets)
    encoded = [encode_example(tokenizer, ex, weights, max_length) for ex in examples]
    total, weight = 0.0, 0.0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for i in range(0, len(encoded), batch_size):
                batch = collate(encoded[i : i + batch_size], tokenizer.pad_token_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits  # [B, T, V]
                one = torch.ones((), device=device)
                loss, _ = weighted_lm_loss(logits, batch, normalizer=one)  # summed weighted NLL
                total += float(loss)
                weight += float(batch["loss_weight"][:, 1:].sum())
    finally:
        model.train(was_training)
    if weight <= 0:
        raise ValueError("validation traces carry no loss weight; raise tune.val_examples")
    return total / weight


# ---------------------------------------------------------------------------
# Evaluation metrics of one trial
# ---------------------------------------------------------------------------


def summary_metrics(summary: pd.DataFrame | Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Eval summary rows (``selfcorrect.evaluate.summarize``) -> flat trial metrics.

    Uses the aggregate rows (``error_type == "all"``): ``<condition>_<rate>`` for
    synthetic and own_errors, ``<condition>_n``, and ``clean_accuracy`` when the
    free generations behind own_errors were scored too. A condition without any
    item (e.g. a model that made no errors of its own) gives NaN rates and n = 0.
    """
    df = pd.DataFrame(summary)
    out: dict[str, float] = {}
    agg = df[df["error_type"] == "all"] if len(df) else df
    for cond in TRIAL_CONDITIONS:
        row = agg[agg["condition"] == cond] if len(agg) else agg
        for rate in TRIAL_RATES:
            out[f"{cond}_{rate}"] = float(row[rate].iloc[0]) if len(row) else math.nan
        out[f"{cond}_n"] = int(row["n"].iloc[0]) if len(row) else 0
    clean = agg[agg["condition"] == "clean"] if len(agg) else agg
    out["clean_accuracy"] = float(clean["accuracy"].iloc[0]) if len(clean) else math.nan
    return out


# ---------------------------------------------------------------------------
# Results table and plots
# ---------------------------------------------------------------------------


def results_table(task: str, records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per trial, ``RESULT_COLUMNS`` first, sorted by parameters.

    ``records`` are dicts with ``config`` (the Tune trial config), ``metrics``
    (its last reported result), ``trial_id``, ``status`` and ``error``;
    parameters come from the trial's metrics when it reported them (they are
    the resolved values) and from its config otherwise.
    """
    rows = []
    for rec in records:
        metrics = dict(rec.get("metrics") or {})
        config = dict(rec.get("config") or {})
        row: dict[str, Any] = {c: None for c in RESULT_COLUMNS}
        row.update({k: v for k, v in metrics.items() if k in RESULT_COLUMNS})
        for p in (*PARAMS, "replicate"):
            if row.get(p) is None and p in config:
                row[p] = config[p]
        row.update(
            task=task,
            trial_id=rec.get("trial_id"),
            status=rec.get("status") or ("error" if rec.get("error") else "done"),
            error=str(rec["error"]) if rec.get("error") else None,
        )
        if row.get("trial") is None and row.get("injection_rate") is not None:
            row["trial"] = metrics.get("trial") or config.get("trial")
        rows.append(row)
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    for c in ("injection_rate", "w_recognition", "w_correction", *PLOT_METRICS):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in ("max_errors", "replicate", "max_steps", "synthetic_n", "own_errors_n"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    for c in ("train_loss", "train_seconds", "eval_seconds", "started_at", "finished_at"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df.sort_values(
        ["injection_rate", "max_errors", "w_recognition", "w_correction", "replicate"],
        kind="stable",
    ).reset_index(drop=True)


def plot_name(metric: str) -> str:
    return f"{metric.replace('_', '-')}-vs-injection-rate.png"


def plot_metric(df: pd.DataFrame, metric: str, task: str) -> Any:
    """One metric against the injection rate: a line per combination of the other swept
    parameters (mean over replicates, min-max band); None when nothing to plot."""
    from matplotlib.figure import Figure

    d = df[pd.notna(df[metric]) & pd.notna(df["injection_rate"])]
    if d.empty:
        return None
    others = [p for p in PARAMS[1:] if df[p].nunique(dropna=True) > 1]
    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    groups = d.groupby(others, dropna=False) if others else [((), d)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        s = g.groupby("injection_rate")[metric].agg(["mean", "min", "max"]).sort_index()
        xs = s.index.to_numpy(dtype=float)
        label = ", ".join(f"{p}={_num(v)}" for p, v in zip(others, key, strict=True)) or None
        ax.plot(xs, s["mean"].to_numpy(dtype=float), marker="o", label=label)
        if (s["max"] > s["min"]).any():
            ax.fill_between(xs, s["min"].to_numpy(float), s["max"].to_numpy(float), alpha=0.2)
    ax.set_xlabel("injection rate")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(f"{task}: {metric.replace('_', ' ')}")
    if metric != "val_loss" and metric != "val_loss_clean":
        ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if others:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def figure_png(fig: Any) -> bytes:
    import io as _bytesio

    buf = _bytesio.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def check_space(cfg: Config) -> None:
    """Fail early, with the fix, on a sweep that cannot run."""
    if (
        cfg.tune.search == "random"
        and cfg.tune.num_samples < 2
        and len(cfg.tune.injection_rates) > 1
    ):
        raise ConfigError(
            "config key 'tune.num_samples': random search over several injection rates needs "
            "num_samples >= 2 (it is the number of trials); raise it or use tune.search=grid"
        )
    n = int(np.prod([len(v) for v in swept_lists(cfg).values()])) * cfg.tune.num_samples
    if cfg.tune.search == "grid" and n > 500:
        raise ConfigError(
            f"config key 'tune': the grid has {n} trials; shorten the tune.* lists or "
            "use tune.search=random with a tune.num_samples budget"
        )
