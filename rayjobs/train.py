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
import tempfile
from pathlib import Path
from typing import Any

from rayjobs.common import (
    JobContext,
    init_ray,
    job_main,
    parse_args,
    run_stage,
    save_resolved_config,
)
from selfcorrect import io
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
)


def train_hash(cfg: Config, task: str, method: str, onpolicy_digest: str | None = None) -> str:
    """What a model depends on: seed, data, model, training settings, the method (and for
    hybrid the harvest settings and the content of the on-policy error table it reads)."""
    d = cfg.to_dict()
    parts = {
        "seed": d["seed"],
        task: d[task],
        "data": d["data"],
        "model": d["model"],
        "train": {k: v for k, v in d["train"].items() if k not in _NOT_IN_HASH},
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
    """Train ``method`` on ``task_name`` with Ray Train and publish the model to ``out_dir``.

    train_path: the task's ``data/train.parquet``; onpolicy_path: harvest table (hybrid);
    init_model_path: start from this model instead of a random init (tune ``init: ft``);
    max_steps: overrides ``train.max_steps``; callbacks: Ray Train ``UserCallback``s (e.g.
    ``ray.tune.integration.ray_train.TuneReportCallback`` inside a Tune trial); crash: test
    hook ``{"rank", "step", "marker"}``. Ray must be initialised. Returns the last metrics
    (the full history is in ``out_dir/metrics.json`` and ``metrics.parquet``).
    """
    from selfcorrect.training import METHODS

    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    check_shape(cfg)
    if init_model_path is not None and not io.is_uri(init_model_path):
        init_model_path = str(Path(init_model_path).absolute())  # workers have another cwd
    prompts = io.read_parquet(train_path, required=["prompt"]).column("prompt").to_pylist()
    onpolicy = None
    if method == "hybrid":
        if onpolicy_path is None:
            raise ValueError("hybrid needs onpolicy_path (the harvest of the FT model on train)")
        onpolicy = load_onpolicy(onpolicy_path)
    preflight(cfg, task_name, method, prompts, onpolicy, init_model_path)
    probe = probe_items_for(cfg, task_name, method, train_path)
    name = run_name or f"{task_name}-{method}-{train_hash(cfg, task_name, method)}"
    trainer = make_trainer(
        cfg,
        {
            "cfg": cfg.to_dict(),
            "task": task_name,
            "method": method,
            "prompts": prompts,
            "onpolicy": onpolicy,
            "init_model_path": init_model_path,
            "max_steps": max_steps,
            "crash": crash,
            "probe_items": probe,
        },
        name=name,
        storage_path=_ray_storage(out_dir),
        callbacks=callbacks,
    )
    result = trainer.fit()
    history = publish_final(result, out_dir, "train_state.json", f"training {task_name}/{method}")
    return history[-1] if history else {}


def probe_items_for(cfg: Config, task_name: str, method: str, train_path: str) -> list[dict]:
    """Learning-curve probe items (``selfcorrect.probes``) for a method with error traces:
    synthetic items on the test split, plus the FT model's test errors once harvested."""
    if not cfg.train.probe_every or method not in ("eift", "hybrid", "insec"):
        return []
    from selfcorrect.probes import probe_items
    from selfcorrect.tasks import get_task

    task_dir = train_path.rsplit("/data/", 1)[0]  # <output-dir>/<task>
    test = io.read_parquet(io.join(task_dir, "data", "test.parquet")).to_pylist()
    ft_test = io.join(task_dir, "harvest", "ft-test.parquet")
    harvest = io.read_parquet(ft_test).to_pylist() if io.exists(ft_test) else None
    task = get_task(task_name, **cfg.task_options(task_name))
    return probe_items(
        task, test, harvest, cfg.seed, cfg.train.probe_items, cfg.error_weights(task_name)
    )


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
    """Publish the model in a Ray Train result's final checkpoint to ``out_dir`` atomically,
    with metrics.json/parquet and ``state_name`` (steps, resumes); returns the metric history.

    Shared by training and GRPO: both checkpoint ``MODEL_DIR`` + ``STATE_FILE``.
    """
    from selfcorrect.training import MODEL_DIR, STATE_FILE

    if result.checkpoint is None:
        raise RuntimeError(f"{what} finished without a final checkpoint")
    local_out = not io.is_uri(out_dir)
    with result.checkpoint.as_directory() as d:
        state = json.loads(Path(d, STATE_FILE).read_text())
        stage = io.staging_dir(out_dir) if local_out else tempfile.mkdtemp(prefix="publish-")
        shutil.rmtree(stage)
        shutil.copytree(Path(d, MODEL_DIR), stage)
    history = state["history"]
    _write_metrics(stage, history)
    Path(stage, state_name).write_text(
        json.dumps({"steps": state["step"], "resumed_at": state.get("resumes", [])}, indent=2)
    )
    if local_out:
        io.replace_dir(stage, out_dir)
        shutil.rmtree(_ray_storage(out_dir), ignore_errors=True)  # superseded by the model
    else:
        io.upload_dir(stage, out_dir)
        shutil.rmtree(stage, ignore_errors=True)
    return history


def _write_metrics(d: str, history: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    Path(d, "metrics.json").write_text(json.dumps(history, indent=2))
    cols = sorted({k for h in history for k in h})
    pq.write_table(
        pa.table({c: [h.get(c) for h in history] for c in cols}), str(Path(d, "metrics.parquet"))
    )


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


def train_base(ctx: JobContext, name: str) -> str | None:
    """The shared base model of ``name`` (clean traces, ``train.base_steps`` steps), trained once.

    Every method fine-tunes from it for the same ``train.max_steps``, so methods differ only
    in their fine-tuning data, as when they all start from one pretrained LM. Returns its
    directory, or None when ``train.base_steps`` is 0.
    """
    cfg = ctx.cfg
    t = cfg.train
    steps = t.base_steps_by_task.get(name, t.base_steps)
    if steps == 0:
        return None
    rel = f"{name}/models/base"
    base_cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(
            t,
            max_steps=steps,
            base_steps=0,
            base_steps_by_task={},
            lr=t.base_lr or t.lr,
            base_lr=0.0,
        ),
    )

    def build(rec: dict) -> None:
        m = train_one(
            base_cfg,
            name,
            "ft",
            ctx.path(rel),
            train_path=data_path(ctx.output_dir, name),
            run_name=f"{name}-base-{train_hash(base_cfg, name, 'base')}",
        )
        rec["artifacts"].append(rel)
        print(f"[train] {name}/base: {ctx.path(rel)} (loss {m.get('loss', 0):.4f})")

    run_stage(ctx, f"{name}/base", train_hash(base_cfg, name, "base"), build)
    return ctx.path(rel)


def run(ctx: JobContext) -> None:
    """Train every ``train.methods`` model for every task (finished ones are skipped)."""
    cfg = ctx.cfg
    check_shape(cfg)
    init_ray(cfg)
    for name in cfg.tasks:
        base = train_base(ctx, name)
        for method in cfg.train.methods:
            pol = onpolicy_path(ctx.output_dir, name)
            digest = _file_digest(pol) if method == "hybrid" else None

            def build(
                rec: dict, name: str = name, method: str = method, pol: str = pol, base=base
            ) -> None:
                rel = f"{name}/models/{method}"
                m = train_one(
                    cfg,
                    name,
                    method,
                    ctx.path(rel),
                    train_path=data_path(ctx.output_dir, name),
                    onpolicy_path=pol,
                    init_model_path=base,
                )
                rec["artifacts"].append(rel)
                rec["final"] = {k: v for k, v in m.items() if isinstance(v, (int, float))}
                print(f"[train] {name}/{method}: {ctx.path(rel)} (loss {m.get('loss', 0):.4f})")

            run_stage(ctx, f"{name}/{method}", train_hash(cfg, name, method, digest), build)


@job_main
def main(argv: list[str] | None = None) -> None:
    ctx = parse_args(__doc__, argv)
    save_resolved_config(ctx)
    run(ctx)
    print(f"models written under {ctx.output_dir}/<task>/models/<method>/")


if __name__ == "__main__":
    main()
