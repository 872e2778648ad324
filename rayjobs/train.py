"""Stage `ft` / `eift` / `hybrid` / `insec`: <task>/data/train.parquet -> <task>/models/<method>/.

python -m rayjobs.train --config configs/tiny.yaml --output-dir runs/tiny [train.methods=[ft]]

Each method is one Ray Train ``TorchTrainer`` run of
``selfcorrect.training.train_loop_per_worker`` on ``train.num_workers`` workers
(DeepSpeed ZeRO ``train.zero_stage`` 1/2/3, or plain DDP at stage 0; CPU via
gloo, GPU via NCCL). Checkpoints go to Ray Train storage (a hidden sibling of
the model dir) every ``train.checkpoint_every`` steps; ``FailureConfig``
restarts crashed workers from the latest one, and rerunning an interrupted job
resumes it too. The final model is published atomically with
``save_pretrained`` (safetensors) + tokenizer + ``metrics.json`` /
``metrics.parquet``. ``hybrid`` reads the FT model's on-policy errors from
``<task>/harvest/ft-train.parquet`` (run the harvest stage first).

Python API (pipeline, tune, notebooks): ``train_one`` trains one model and
``tune_trainable`` runs one training inside a Ray Tune trial.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from rayjobs.common import (
    JobContext,
    init_ray,
    job_main,
    parse_args,
    record_stage,
    save_resolved_config,
    stage_done,
)
from selfcorrect import console, io
from selfcorrect.config import Config, ConfigError, config_from_dict

ONPOLICY_COLUMNS = ["prompt", "prefix_steps", "wrong_step", "error_type"]


# Train keys that do not change the model a method produces.
_NOT_IN_HASH = (
    "methods",
    "max_failures",
    "log_every",
    "checkpoint_every",
    "base_steps",
    "base_steps_by_task",
    "max_steps_by_task",  # resolved into max_steps (task_jobs)
)


# Models that train on clean traces only: no injection setting reaches them.
CLEAN_METHODS = ("base", "ft")
# Injection keys a method with error traces never reads (``traces.build_example``, and the
# unlikelihood weight only ever reaches InSeC's <mistake> tokens): changing one keeps the
# model. InSeC draws its own mistakes (p_mistake); EIFT reads neither p_mistake nor the
# on-policy share; hybrid is EIFT plus the on-policy share.
UNREAD_BY_METHOD: dict[str, tuple[str, ...]] = {
    "eift": ("onpolicy_fraction", "p_mistake", "mistake_loss", "w_unlikelihood"),
    "hybrid": ("p_mistake", "mistake_loss", "w_unlikelihood"),
    "insec": (
        "injection_rate",
        "max_errors",
        "error_placement",
        "last_step_rate",
        "onpolicy_fraction",
    ),
}


def train_hash(cfg: Config, task: str, method: str, onpolicy_digest: str | None = None) -> str:
    """What a model depends on: seed, data, model, training settings, the method (and for
    hybrid the harvest settings and the content of the on-policy error table it reads).
    Models trained on clean traces (base, FT) leave the injection settings out, and each
    method the ones it never reads (``UNREAD_BY_METHOD``)."""
    d = cfg.clean_dict() if method in CLEAN_METHODS else cfg.to_dict()
    skip = set(_NOT_IN_HASH) | set(UNREAD_BY_METHOD.get(method, ()))
    parts = {
        "seed": d["seed"],
        task: d[task],
        "data": d["data"],
        "model": d["model"],
        "train": {k: v for k, v in d["train"].items() if k not in skip},
        # Only this task's base budget matters to this task's models.
        "base_steps": cfg.train.base_steps_by_task.get(task, cfg.train.base_steps),
        "method": method,
    }
    if method == "hybrid":
        parts["harvest"] = d["harvest"]
        parts["onpolicy"] = onpolicy_digest
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def data_path(output_dir: str, task: str) -> str:
    return io.join(output_dir, task, "data", "train.parquet")


def onpolicy_path(output_dir: str, task: str) -> str:
    return io.join(output_dir, task, "harvest", "ft-train.parquet")


def model_dir(output_dir: str, task: str, method: str) -> str:
    return io.join(output_dir, task, "models", method)


def load_onpolicy(path: str) -> list[dict[str, Any]]:
    """Harvested on-policy errors as records for ``traces.build_example(onpolicy=...)``."""
    if not io.exists(path):
        raise FileNotFoundError(
            f"hybrid needs the FT model's on-policy errors at {path}; run the harvest stage on the "
            "train split first (python -m rayjobs.harvest) or drop hybrid from train.methods"
        )
    table = io.read_parquet(path, required=ONPOLICY_COLUMNS)
    recs = table.select(ONPOLICY_COLUMNS).to_pylist()
    if not recs:
        raise ValueError(
            f"{path} holds no on-policy errors; the FT model made none on the harvested train "
            "problems: harvest more problems (harvest.max_problems) or sample at temperature > 0"
        )
    for r in recs:
        r["prefix_steps"] = list(r["prefix_steps"] or [])
    return recs


def check_shape(cfg: Config) -> None:
    t = cfg.train
    if t.batch_size % (t.micro_batch_size * t.num_workers):
        raise ConfigError(
            f"config key 'train.batch_size': {t.batch_size} must be a multiple of "
            f"micro_batch_size * num_workers ({t.micro_batch_size} * {t.num_workers})"
        )


def preflight(
    cfg: Config,
    task_name: str,
    method: str,
    prompts: list[str],
    onpolicy: list[dict[str, Any]] | None,
    init_model_path: str | None,
) -> None:
    """Encode the first global batch on the driver, before any Ray Train worker starts.

    Unparseable prompts or examples longer than ``model.max_length`` then fail once,
    with their own message, instead of inside every worker after its retries. Skipped for
    hub models, whose tokenizer would have to be downloaded here.
    """
    from selfcorrect.models import adapt_tokenizer, load_tokenizer
    from selfcorrect.tokenizer import build_char_tokenizer
    from selfcorrect.training import ExampleStream

    path = init_model_path or cfg.model.path
    if path is None:
        tokenizer = build_char_tokenizer()
    elif not io.is_uri(path) and Path(path, "config.json").exists():
        tokenizer = load_tokenizer(path)
        adapt_tokenizer(tokenizer, cfg.model.chat_template)  # as the workers will have it
    else:
        return
    ExampleStream(cfg, task_name, method, prompts, tokenizer, onpolicy).local_batch(0, 0, 1)


def _ray_storage(out_dir: str) -> str:
    """Ray Train storage for this model's checkpoints: a hidden sibling of the model dir."""
    if io.is_uri(out_dir):
        return out_dir.rstrip("/") + "-ray"
    p = Path(out_dir).absolute()
    return str(p.with_name(f".{p.name}-ray"))


@dataclasses.dataclass
class ModelJob:
    """One model to train: what ``train_chain`` needs to train and publish it."""

    method: str  # ft / eift / hybrid / insec ("base" models train as ft)
    out_dir: str  # where the model is published (save_pretrained + metrics + train_state)
    cfg: Config
    model_hash: str  # what the model depends on; a published model with it is not retrained
    label: str | None = None  # the model's name in logs (default: method)
    init_model_path: str | None = None  # start from this model instead of a random init
    onpolicy_path: str | None = None  # hybrid: the harvest of the FT model on train
    max_steps: int | None = None  # overrides cfg.train.max_steps


def train_chain(
    task_name: str,
    jobs: list[ModelJob],
    *,
    train_path: str,
    run_name: str | None = None,
    callbacks: list[Any] | None = None,
    crash: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train ``jobs`` one after another in ONE Ray Train run and publish each to its out_dir.

    A Ray Train run pays its start-up (controller, placement group, worker processes,
    process group) once, however many models it trains: the base and FT models of a task
    are one chain, its methods another. A later job may start from an earlier one's
    out_dir (FT from the base): rank 0 publishes each model before the next starts.
    Restarts (``FailureConfig``, or the same chain run again) skip published models and
    resume the current one from its checkpoint. Workers and resources come from the first
    job's config. Ray must be initialised. Returns each job's last metrics (the full
    history is in ``out_dir/metrics.json`` and ``metrics.parquet``).
    """
    from selfcorrect.training import METHODS, published_state

    if not jobs:
        return []
    prompts = io.read_parquet(train_path, required=["prompt"]).column("prompt").to_pylist()
    specs = []
    for j in jobs:
        if j.method not in METHODS:
            raise ConfigError(f"unknown method {j.method!r}; choose from {', '.join(METHODS)}")
        check_shape(j.cfg)
        init = j.init_model_path
        if init is not None and not io.is_uri(init):
            init = str(Path(init).absolute())  # workers have another cwd
        onpolicy = None
        if j.method == "hybrid":
            if j.onpolicy_path is None:
                raise ValueError("hybrid needs onpolicy_path (the harvest of the FT model)")
            onpolicy = load_onpolicy(j.onpolicy_path)
        # A model trained earlier in this chain does not exist yet: check with the
        # tokenizer it will have, the configured one's.
        ready = init if init is None or io.exists(io.join(init, "config.json")) else None
        preflight(j.cfg, task_name, j.method, prompts, onpolicy, ready)
        out = j.out_dir if io.is_uri(j.out_dir) else str(Path(j.out_dir).absolute())
        specs.append(
            {
                "cfg": j.cfg.to_dict(),
                "method": j.method,
                "label": j.label or j.method,
                "onpolicy": onpolicy,
                "init_model_path": init,
                "max_steps": j.max_steps,
                "probe_items": probe_items_for(j.cfg, task_name, j.method, train_path),
                "probe_ft_later": probe_ft_later(j.cfg, task_name, j.method, train_path),
                "out_dir": out,
                "model_hash": j.model_hash,
            }
        )
    labels = "+".join(s["label"] for s in specs)
    chain_hash = hashlib.sha256("".join(j.model_hash for j in jobs).encode()).hexdigest()[:16]
    # The chain's checkpoints: a hidden sibling of its first model's directory.
    storage = _ray_storage(str(Path(jobs[0].out_dir).with_name(labels)))
    if io.is_uri(jobs[0].out_dir):
        storage = _ray_storage(jobs[0].out_dir.rstrip("/") + "-" + labels)
    trainer = make_trainer(
        jobs[0].cfg,
        {"task": task_name, "prompts": prompts, "crash": crash, "chain": specs},
        name=run_name or f"{task_name}-{labels}-{chain_hash}",
        storage_path=storage,
        callbacks=callbacks,
    )
    t0 = time.time()
    trainer.fit()
    out = []
    for j, spec in zip(jobs, specs, strict=True):
        state = published_state(spec["out_dir"], j.model_hash)
        if state is None:
            raise RuntimeError(f"training {task_name}/{spec['label']} finished unpublished")
        history = io.read_json(io.join(spec["out_dir"], "metrics.json"))
        out.append({**(history[-1] if history else {}), "_state": state})
    if not io.is_uri(storage):
        shutil.rmtree(storage, ignore_errors=True)  # superseded by the published models
    first = min((o["_state"].get("started", t0) for o in out), default=t0)
    for o in out:  # Ray Train's start-up: from fit() to the first model's first step
        o["_state"]["chain_startup_s"] = round(max(0.0, first - t0), 2)
    return out


def train_one(
    cfg: Config,
    task_name: str,
    method: str,
    out_dir: str,
    *,
    train_path: str,
    onpolicy_path: str | None = None,
    init_model_path: str | None = None,
    max_steps: int | None = None,
    run_name: str | None = None,
    callbacks: list[Any] | None = None,
    crash: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``method`` on ``task_name`` with Ray Train and publish the model to ``out_dir``
    (a chain of one: ``train_chain``).

    train_path: the task's ``data/train.parquet``; onpolicy_path: harvest table (hybrid);
    init_model_path: start from this model instead of a random init (tune ``init: ft``);
    max_steps: overrides ``train.max_steps``; callbacks: Ray Train ``UserCallback``s (e.g.
    ``ray.tune.integration.ray_train.TuneReportCallback`` inside a Tune trial); crash: test
    hook ``{"rank", "step", "marker"}``. Ray must be initialised. Returns the last metrics.
    """
    digest = _file_digest(onpolicy_path) if method == "hybrid" and onpolicy_path else None
    key = json.dumps([train_hash(cfg, task_name, method, digest), init_model_path, max_steps])
    job = ModelJob(
        method,
        out_dir,
        cfg,
        # Called directly, a model is trained afresh: a time stamp keeps an older model with
        # the same settings from being taken as this one.
        hashlib.sha256(f"{key}{time.time_ns()}".encode()).hexdigest()[:16],
        init_model_path=init_model_path,
        onpolicy_path=onpolicy_path,
        max_steps=max_steps,
    )
    name = run_name or f"{task_name}-{method}-{train_hash(cfg, task_name, method)}"
    (last,) = train_chain(
        task_name, [job], train_path=train_path, run_name=name, callbacks=callbacks, crash=crash
    )
    last.pop("_state", None)
    return last


def probe_items_for(cfg: Config, task_name: str, method: str, train_path: str) -> list[dict]:
    """Learning-curve probe items (``selfcorrect.probes``) for a method with error traces:
    synthetic items on the test split, plus the FT model's test errors once harvested."""
    if not cfg.train.probe_every or method not in ("eift", "hybrid", "insec"):
        return []
    from selfcorrect.probes import current_ft_harvest, probe_items
    from selfcorrect.tasks import get_task

    task_dir = train_path.rsplit("/data/", 1)[0]  # <output-dir>/<task>
    test = io.read_parquet(io.join(task_dir, "data", "test.parquet")).to_pylist()
    ft_test = current_ft_harvest(task_dir, train_hash(cfg, task_name, "ft"))
    harvest = io.read_parquet(ft_test).to_pylist() if ft_test else None
    task = get_task(task_name, **cfg.task_options(task_name))
    return probe_items(
        task, test, harvest, cfg.seed, cfg.train.probe_items, cfg.error_weights(task_name)
    )


def probe_ft_later(
    cfg: Config, task_name: str, method: str, train_path: str
) -> dict[str, Any] | None:
    """For a method that starts before FT's test errors are harvested (the pipeline trains
    it beside FT when no method reads the harvest): what ``selfcorrect.probes.LateFTProbes``
    needs to probe them once they are there."""
    if not cfg.train.probe_every or method not in ("eift", "hybrid", "insec"):
        return None
    from selfcorrect.probes import current_ft_harvest

    task_dir = train_path.rsplit("/data/", 1)[0]  # <output-dir>/<task>
    ft_hash = train_hash(cfg, task_name, "ft")
    if current_ft_harvest(task_dir, ft_hash):
        return None  # probe_items_for has them from the first probe on
    if not io.is_uri(task_dir):
        task_dir = str(Path(task_dir).absolute())  # workers have another cwd
    return {"task_dir": task_dir, "ft_hash": ft_hash, "seed": cfg.seed, "n": cfg.train.probe_items}


def make_trainer(
    cfg: Config,
    loop_config: dict[str, Any],
    *,
    name: str,
    storage_path: str,
    keep: int = 2,
    callbacks: list[Any] | None = None,
) -> Any:
    """The ``TorchTrainer`` for one run of ``train_loop_per_worker`` with this config's workers,
    resources and fault tolerance; shared by the training job and tune trials."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from selfcorrect import console
    from selfcorrect.training import train_loop_per_worker

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        # Quiet mode: where the workers log and report progress (None: stream as before).
        train_loop_config={**loop_config, "console": console.worker_spec()},
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep),
            callbacks=callbacks or [],
        ),
    )


def publish_final(result: Any, out_dir: str, state_name: str, what: str) -> list[dict[str, Any]]:
    """Publish the model in a Ray Train result's final checkpoint to ``out_dir`` atomically
    (``training.publish_checkpoint``); returns the metric history. Used by GRPO, whose
    driver publishes (supervised chains publish from rank 0 as each model finishes)."""
    from selfcorrect.training import publish_checkpoint

    if result.checkpoint is None:
        raise RuntimeError(f"{what} finished without a final checkpoint")
    with result.checkpoint.as_directory() as d:
        history = publish_checkpoint(d, out_dir, state_name)
    if not io.is_uri(out_dir):
        shutil.rmtree(_ray_storage(out_dir), ignore_errors=True)  # superseded by the model
    return history


def tune_trainable(config: dict[str, Any]) -> None:
    """A Ray Tune function trainable that launches one ``TorchTrainer`` (Ray's documented
    Tune-over-Train pattern); Train metrics reach Tune via ``TuneReportCallback``.

    config: ``cfg`` (Config.to_dict() with the trial's hyperparameters applied), ``task``,
    ``method``, ``out_dir``, ``train_path`` and optionally ``onpolicy_path``,
    ``init_model_path``, ``max_steps``, ``run_name``. Use ``tune.with_resources`` with few
    resources for this driver; the training workers request their own.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = config_from_dict(config["cfg"])
    train_one(
        cfg,
        config["task"],
        config["method"],
        config["out_dir"],
        train_path=config["train_path"],
        onpolicy_path=config.get("onpolicy_path"),
        init_model_path=config.get("init_model_path"),
        max_steps=config.get("max_steps"),
        run_name=config.get("run_name"),
        callbacks=[TuneReportCallback()],
    )


def _file_digest(path: str) -> str | None:
    return hashlib.sha256(io.read_bytes(path)).hexdigest()[:16] if io.exists(path) else None


def base_config(cfg: Config, name: str) -> Config:
    """The config that trains task ``name``'s base: clean traces for its ``train.base_steps``
    at ``train.base_lr`` (``max_steps`` 0 when the task has no base)."""
    t = cfg.train
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(
            t,
            max_steps=t.base_steps_by_task.get(name, t.base_steps),
            max_steps_by_task={},
            base_steps=0,
            base_steps_by_task={},
            lr=t.base_lr or t.lr,
            base_lr=0.0,
        ),
    )


def base_job(ctx: JobContext, name: str) -> ModelJob | None:
    """The shared base model of task ``name`` (clean traces, ``train.base_steps`` steps).

    Every method fine-tunes from it for the same ``train.max_steps``, so methods differ only
    in their fine-tuning data, as when they all start from one pretrained LM. None when
    ``train.base_steps`` is 0.
    """
    base_cfg = base_config(ctx.cfg, name)
    if base_cfg.train.max_steps == 0:
        return None
    out = ctx.path(f"{name}/models/base")
    return ModelJob("ft", out, base_cfg, train_hash(base_cfg, name, "base"), label="base")


def task_jobs(ctx: JobContext, name: str) -> list[tuple[str, ModelJob]]:
    """(manifest key, job) of every model this config trains for task ``name``, in order:
    the base (if any), then ``train.methods``, each from the base for the task's
    ``train.method_steps``."""
    base = base_job(ctx, name)
    jobs = [(f"{name}/base", base)] if base else []
    return jobs + [(f"{name}/{m}", method_job(ctx, name, m, base)) for m in ctx.cfg.train.methods]


def method_job(ctx: JobContext, name: str, method: str, base: ModelJob | None) -> ModelJob:
    """Task ``name``'s ``method`` model as this config trains it (``train.methods`` or not:
    eval asks for the hash of every model it finds, ``model_hash``)."""
    cfg = method_config(ctx.cfg, name)
    pol = onpolicy_path(ctx.output_dir, name)
    digest = _file_digest(pol) if method == "hybrid" else None
    return ModelJob(
        method,
        model_dir(ctx.output_dir, name, method),
        cfg,
        train_hash(cfg, name, method, digest),
        init_model_path=base.out_dir if base else None,
        onpolicy_path=pol if method == "hybrid" else None,
    )


def method_config(cfg: Config, name: str) -> Config:
    """The config task ``name``'s methods train under: ``max_steps`` is the task's
    ``train.method_steps``."""
    steps = cfg.train.method_steps(name)
    if steps == cfg.train.max_steps:
        return cfg
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, max_steps=steps, max_steps_by_task={})
    )


def model_hash(ctx: JobContext, name: str, method: str) -> str:
    """The manifest hash this config gives task ``name``'s ``method`` model: a saved model
    whose record holds another hash was trained under another config."""
    return method_job(ctx, name, method, None).model_hash  # the base path is not in the hash


def run(ctx: JobContext) -> None:
    """Train every ``train.methods`` model for every task (finished ones are skipped): per
    task, the models still to train are one chain in one Ray Train run (``train_chain``)."""
    cfg = ctx.cfg
    check_shape(cfg)
    init_ray(cfg)
    for name in cfg.tasks:
        pending = []
        for key, job in task_jobs(ctx, name):
            if stage_done(ctx, key, job.model_hash):
                console.note(f"[skip] {key}: outputs exist for this config")
            else:
                pending.append((key, job))
        if pending:
            train_pending(ctx, name, pending)


def train_pending(ctx: JobContext, name: str, pending: list[tuple[str, ModelJob]]) -> None:
    """One chain; each model recorded in the manifest as its own stage (seconds of its own
    training; the chain's Ray Train start-up as ``startup_s`` on the first)."""
    keys = [k for k, _ in pending]
    scope = f"{name}/" + "+".join(k.split("/", 1)[1] for k in keys)
    started = time.time()
    for key, job in pending:
        record_stage(ctx, key, {"status": "running", "config_hash": job.model_hash, "chain": keys})
    try:
        with console.stage_scope(scope):
            results = train_chain(
                name, [j for _, j in pending], train_path=data_path(ctx.output_dir, name)
            )
    except BaseException:
        from selfcorrect.training import published_state

        for key, job in pending:  # a model published before the failure is done
            state = published_state(job.out_dir, job.model_hash)
            status = "done" if state else "failed"
            record_stage(ctx, key, _record(ctx, job, keys, status, state, started))
        raise
    for (key, job), m in zip(pending, results, strict=True):
        state = m.pop("_state")
        rec = _record(ctx, job, keys, "done", state, started)
        if key == keys[0]:
            rec["startup_s"] = state.get("chain_startup_s")
            rec["seconds"] = round(rec["seconds"] + (rec["startup_s"] or 0.0), 2)
        rec["final"] = {k: v for k, v in m.items() if isinstance(v, (int, float))}
        record_stage(ctx, key, rec)
        print(f"[train] {key}: {job.out_dir} (loss {m.get('loss', 0):.4f})")


def _record(
    ctx: JobContext,
    job: ModelJob,
    chain: list[str],
    status: str,
    state: dict[str, Any] | None,
    started: float,
) -> dict[str, Any]:
    rel = job.out_dir[len(ctx.output_dir) :].lstrip("/")
    state = state or {}
    return {
        "status": status,
        "config_hash": job.model_hash,
        "artifacts": [rel] if status == "done" else [],
        "chain": chain,
        "started": state.get("started", started),
        "seconds": float(state.get("train_s", round(time.time() - started, 2))),
        "compute_s": state.get("compute_s"),
        "finished": state.get("finished", time.time()),
    }


@job_main
def main(argv: list[str] | None = None) -> None:
    ctx = parse_args(__doc__, argv)
    save_resolved_config(ctx)
    run(ctx)
    print(f"models written under {ctx.output_dir}/<task>/models/<method>/")


if __name__ == "__main__":
    main()
