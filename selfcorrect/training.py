"""The supervised training loop (FT, EIFT, hybrid, InSeC), one copy per data-parallel worker.

``train_loop_per_worker`` is what Ray Train's ``TorchTrainer`` runs on every
worker; ``run_training`` is the same loop with the Ray Train session swapped
for a ``LocalSession``, so it runs in a plain Python process (tests,
benchmarks, notebooks) without a cluster.

Data. Examples are built on the fly from problems with
``traces.build_example`` and encoded with ``loss.encode_example``. Example
``j`` of global step ``s`` takes problem ``order[(s * B + j) % N]`` (``order``
a seeded permutation per epoch) and its own RNG stream ``(seed, task, method,
s, j)``: the data depends only on (seed, step), not on the number of workers,
and resuming at step ``s`` replays exactly what an uninterrupted run sees.
Rank ``r`` of ``W`` takes examples ``[r*B/W, (r+1)*B/W)`` of each step.

Loss. ``loss.weighted_lm_loss`` normalised by ``loss.global_weight_sum`` of the
step's whole global batch (all micro-batches on all workers), so a step's
gradient is the weighted token sum over the global batch divided by its total
weight, whatever the worker count and micro-batch size.

Engines. ``train.zero_stage`` 1/2/3 wraps the model in a DeepSpeed engine
(ZeRO optimizer-state / gradient / parameter sharding; gloo on CPU with
``DS_ACCELERATOR=cpu``, NCCL on GPU). ``zero_stage: 0`` is plain PyTorch DDP via
Ray's ``prepare_model`` (no DDP wrapper for one worker): the cheapest path for
small CPU models. ``train.bf16`` is bf16 autocast with fp32 master weights on
either device (one code path for CPU and GPU).

Checkpoints hold the model, optimizer, LR scheduler, step (= data position),
metric history and every rank's torch RNG state; a restarted run (worker
crash under ``FailureConfig``, or the same run started again) resumes there.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from selfcorrect import console
from selfcorrect.config import Config, config_from_dict
from selfcorrect.data import stream_rng
from selfcorrect.loss import (
    LossWeights,
    collate,
    decision_stats,
    encode_example,
    global_weight_sum,
    weighted_lm_loss,
)
from selfcorrect.models import resolve_attention, resolve_bf16
from selfcorrect.traces import Example, Span, build_example

STATE_FILE = "trainer_state.json"
TORCH_STATE = "torch_state.pt"  # zero_stage 0: model + optimizer + scheduler
DS_TAG = "ds"  # zero_stage >= 1: DeepSpeed checkpoint tag
MODEL_DIR = "model"  # final checkpoint only: the save_pretrained model + tokenizer
METHODS = ("ft", "eift", "hybrid", "insec")


# ---------------------------------------------------------------------------
# Data: deterministic per (seed, step, example index)
# ---------------------------------------------------------------------------


def loss_weights(cfg: Config) -> LossWeights:
    t = cfg.train
    return LossWeights(
        w_recognition=t.w_recognition,
        w_correction=t.w_correction,
        mistake_loss=t.mistake_loss,
        w_unlikelihood=t.w_unlikelihood,
        w_decision=t.w_decision,
    )


def step_problem_indices(
    n_problems: int, step: int, batch_size: int, seed: int, task: str, method: str
) -> np.ndarray:
    """Problem indices of the global batch of ``step`` (0-based): epoch-wise seeded shuffles."""
    pos = step * batch_size + np.arange(batch_size)
    epochs, within = pos // n_problems, pos % n_problems
    out = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epochs):
        order = stream_rng(seed, task, method, "order", int(e)).permutation(n_problems)
        sel = epochs == e
        out[sel] = order[within[sel]]
    return out


class ExampleStream:
    """Builds and encodes the examples a worker trains on at each step."""

    def __init__(
        self,
        cfg: Config,
        task_name: str,
        method: str,
        prompts: list[str],
        tokenizer: Any,
        onpolicy: list[dict[str, Any]] | None = None,
    ) -> None:
        from selfcorrect.tasks import get_task

        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        if not prompts:
            raise ValueError(f"no training problems for {task_name}; run the data stage first")
        if method == "hybrid" and not onpolicy:
            raise ValueError(
                "hybrid needs on-policy errors (harvest of the FT model on the train split)"
            )
        self.cfg, self.method, self.task_name = cfg, method, task_name
        self.task = get_task(task_name, **cfg.task_options(task_name))
        self.prompts = prompts
        self.problems: dict[int, Any] = {}  # parsed lazily: big datasets start fast
        self.tok = tokenizer
        self.onpolicy = onpolicy
        self.weights = loss_weights(cfg)
        self.type_weights = cfg.train_error_weights(task_name)

    def problem(self, i: int) -> Any:
        p = self.problems.get(i)
        if p is None:
            p = self.problems[i] = self.task.parse_prompt(self.prompts[i])
        return p

    def trace(self, step: int, j: int, problem_index: int) -> Example:
        """Example ``j`` of global step ``step``: a function of (seed, task, method, step, j)."""
        t = self.cfg.train
        rng = stream_rng(self.cfg.seed, self.task_name, self.method, "example", step, j)
        return build_example(
            self.method,
            self.task,
            self.problem(problem_index),
            rng,
            injection_rate=t.injection_rate,
            max_errors=t.max_errors,
            type_weights=self.type_weights,
            p_mistake=t.p_mistake,
            onpolicy=self.onpolicy,
            onpolicy_fraction=t.onpolicy_fraction,
            error_placement=t.error_placement,
            last_step_rate=t.last_step_rate,
        )

    def example(self, step: int, j: int, problem_index: int) -> dict[str, np.ndarray]:
        ex = self.trace(step, j, problem_index)
        return encode_example(self.tok, ex, self.weights, self.cfg.model.max_length)

    def local_batch(self, step: int, rank: int, world: int) -> list[dict[str, np.ndarray]]:
        """This rank's share of global step ``step`` (0-based), in global example order."""
        B = self.cfg.train.batch_size
        idx = step_problem_indices(
            len(self.prompts), step, B, self.cfg.seed, self.task_name, self.method
        )
        per = B // world
        return [self.example(step, j, int(idx[j])) for j in range(rank * per, (rank + 1) * per)]


def length_grouped(
    examples: list[dict[str, np.ndarray]], micro_batch_size: int
) -> list[list[dict[str, np.ndarray]]]:
    """Cut micro-batches from the length-sorted local batch.

    The loss is normalised by the global batch's weight, so which examples share a
    micro-batch does not change the update; sorting only cuts padding. An EIFT batch with
    a few long injected traces pads every row to the longest one: sorted micro-batches of 8
    pad ~2x fewer tokens there (0.33 vs 0.63 s/step on tiny multiplication, one core).
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # stable
    ranked = [examples[i] for i in order]
    return [ranked[i : i + micro_batch_size] for i in range(0, len(ranked), micro_batch_size)]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine decay to 10% at ``total`` (``step`` counts from 0)."""
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


# ---------------------------------------------------------------------------
# Sessions: Ray Train on a cluster, or a plain process
# ---------------------------------------------------------------------------


class LocalSession:
    """Ray Train's session API for one process: reports kept in memory, checkpoints on disk.

    ``resume``: start from the newest checkpoint already under ``checkpoint_root`` (a
    restarted Tune trial that trains in its own process, ``rayjobs.tune``), and keep only
    the newest ``keep`` there (0 = all). A checkpoint appears whole or not at all.
    """

    def __init__(
        self, checkpoint_root: str | None = None, *, resume: bool = False, keep: int = 0
    ) -> None:
        self.reports: list[dict[str, Any]] = []
        self.root = checkpoint_root or tempfile.mkdtemp(prefix="selfcorrect-train-")
        self.keep = keep
        found = self._checkpoints() if resume else []
        self.latest: str | None = found[-1] if found else None

    rank, world = 0, 1

    def _checkpoints(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        names = sorted(n for n in os.listdir(self.root) if n.startswith("checkpoint_"))
        return [os.path.join(self.root, n) for n in names if "." not in n]

    def get_checkpoint_dir(self) -> str | None:
        return self.latest

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        import shutil

        self.reports.append(metrics)
        if checkpoint_dir is None:
            return
        # Numbered after the newest on disk, so a resumed session's names keep their order.
        on_disk = self._checkpoints()
        n = int(on_disk[-1].rsplit("_", 1)[1]) + 1 if on_disk else 1
        dst = os.path.join(self.root, f"checkpoint_{n:06d}")
        shutil.rmtree(dst + ".tmp", ignore_errors=True)  # one a killed process left half-copied
        shutil.copytree(checkpoint_dir, dst + ".tmp")
        os.replace(dst + ".tmp", dst)
        self.latest = dst
        if self.keep:
            for old in self._checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)


class RaySession:
    """The Ray Train worker session (``ray.train.report`` / ``get_checkpoint``)."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self._ckpt = ray.train.get_checkpoint()
        self._dir_cm: Any = None

    def get_checkpoint_dir(self) -> str | None:
        if self._ckpt is None:
            return None
        self._dir_cm = self._ckpt.as_directory()
        return self._dir_cm.__enter__()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)


# ---------------------------------------------------------------------------
# Model and engine
# ---------------------------------------------------------------------------


def build_training_model(
    cfg: Config, init_model_path: str | None = None, attention: str = "sdpa"
) -> tuple[torch.nn.Module, Any]:
    """Random-init preset (seeded), ``model.path``, or ``init_model_path``; LoRA if configured.

    ``attention`` is the kernel the model trains with (``models.resolve_attention``); it is
    not saved with the model, which loads with sdpa for generation.

    LoRA adapters go on the attention projections, and the embedding rows of InSeC's two
    tokens train too (peft's ``trainable_token_indices``): they may be new to a hub
    vocabulary, and a frozen mean-initialised row could never become InSeC's signal.
    """
    from selfcorrect.models import (
        adapt_tokenizer,
        build_model,
        fit_embeddings,
        insec_token_ids,
        load_model,
    )

    path = init_model_path or cfg.model.path
    if path:
        model, tok = load_model(path)
        adapt_tokenizer(tok, cfg.model.chat_template)
        fit_embeddings(model, tok)
    else:
        model, tok = build_model(cfg.model.preset, cfg.model.max_length, cfg.seed)
    model.set_attn_implementation(attention)
    if cfg.model.lora:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=cfg.model.lora_r,
            lora_alpha=cfg.model.lora_alpha,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            trainable_token_indices=insec_token_ids(tok),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)
    model.train()
    return model, tok


def deepspeed_config(cfg: Config, micro: int, n_micro: int, world: int) -> dict[str, Any]:
    """ZeRO stage from ``train.zero_stage``; precision is handled by autocast, not DeepSpeed."""
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": n_micro,
        "train_batch_size": micro * n_micro * world,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class Engine:
    """One interface over a DeepSpeed engine (ZeRO 1-3) and plain torch / DDP (stage 0)."""

    def __init__(
        self, cfg: Config, model: torch.nn.Module, world: int, n_micro: int, use_ray: bool
    ) -> None:
        t = cfg.train
        self.cfg, self.stage = cfg, t.zero_stage
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.98)
        )
        total = t.max_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, t.warmup_steps, total)
        )
        self.module = model
        if self.stage > 0:
            import deepspeed

            self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model,
                optimizer=self.optimizer,
                lr_scheduler=self.scheduler,
                config=deepspeed_config(cfg, t.micro_batch_size, n_micro, world),
            )
            self.wrapped = self.ds
            self.module = self.ds.module
        else:
            self.ds = None
            if use_ray and world > 1:
                import ray.train.torch

                self.wrapped = ray.train.torch.prepare_model(model, move_to_device=False)
            else:
                self.wrapped = model
        self._n_micro = n_micro
        if t.compile:
            from torch import _dynamo

            # One graph per padded micro-batch shape: allow every shape max_length can give.
            shapes = -(-cfg.model.max_length // t.compile_pad_to) + 1
            _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, shapes)
            self.wrapped = torch.compile(self.wrapped, dynamic=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.wrapped(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP: all-reduce gradients only on the step's last micro-batch."""
        if self.ds is None and not last and hasattr(self.wrapped, "no_sync"):
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.ds is not None:
            # Our loss is already normalised over the global batch: no 1/grad_accum scaling.
            self.ds.backward(loss, scale_wrt_gas=False)
        else:
            loss.backward()

    def step(self) -> float:
        """Optimizer + scheduler step after the step's micro-batches; returns the grad norm."""
        if self.ds is not None:
            self.ds.step()  # steps once per gradient_accumulation_steps micro-batches
            gn = self.ds.get_global_grad_norm()
            return float(gn) if gn is not None else float("nan")
        gn = torch.nn.utils.clip_grad_norm_(
            [p for p in self.module.parameters() if p.requires_grad], 1.0
        )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(gn)

    def micro_step(self) -> None:
        """DeepSpeed counts micro-batches itself: every one but the last calls step()."""
        if self.ds is not None:
            self.ds.step()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def gathered(self) -> contextlib.AbstractContextManager:
        """ZeRO-3 shards parameters: gather them to save or generate."""
        if self.ds is not None and self.stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.module.parameters()))
        return contextlib.nullcontext()

    def save(self, d: str, rank: int) -> None:
        if self.ds is not None:
            self.ds.save_checkpoint(d, tag=DS_TAG)  # every rank writes its own shards
        elif rank == 0:
            torch.save(
                {
                    "model": self.module.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                },
                os.path.join(d, TORCH_STATE),
            )

    def load(self, d: str) -> None:
        if self.ds is not None:
            self.ds.load_checkpoint(d, tag=DS_TAG)
        else:
            st = load_torch_state(os.path.join(d, TORCH_STATE))
            self.module.load_state_dict(st["model"])
            self.optimizer.load_state_dict(st["optimizer"])
            self.scheduler.load_state_dict(st["scheduler"])


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that holds more than tensors and plain containers."""


def load_torch_state(path: str) -> Any:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``).

    A checkpoint is a pickle: loading it unrestricted runs whatever code it names. The
    project only ever writes tensors, numbers and dicts, so anything else is refused.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint {path}: it holds Python objects other than tensors "
            f"({str(e).splitlines()[0]}); it was not written by selfcorrect or was tampered "
            "with: delete the checkpoint directory and rerun the stage"
        ) from e


def _all_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


def _all_max(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def save_final_model(module: torch.nn.Module, tokenizer: Any, out_dir: str, lora: bool) -> None:
    """save_pretrained (safetensors) + tokenizer; LoRA adapters are merged first so every later
    stage loads a plain causal LM."""
    from selfcorrect.models import save_model

    model = module
    if lora:
        model = module.merge_and_unload()
    save_model(model, tokenizer, out_dir)


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _maybe_crash(crash: dict[str, Any] | None, step: int, rank: int) -> None:
    """Test hook: the chosen rank fails once at the chosen step (a marker file records it).

    ``mode`` "exit" (default): the worker dies hard. "hang": it stops making progress (the
    marker names its Ray node id, so a multi-node fault test can take that node away).
    """
    if not crash or rank != crash["rank"] or step != crash["step"]:
        return
    marker = Path(crash["marker"])
    if marker.exists():
        return
    node = ""
    with contextlib.suppress(Exception):
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    # Written whole then renamed: a watcher never reads a half-written marker.
    tmp = marker.with_name(f".{marker.name}.tmp")
    tmp.write_text(json.dumps({"step": step, "rank": rank, "node_id": node}))
    os.replace(tmp, marker)
    if crash.get("mode", "exit") == "hang":
        while True:  # until the test removes this worker's node
            time.sleep(1.0)
    # Ray Train's controller registers a reported checkpoint when it next polls the workers;
    # give it time to do so (on a loaded machine) so the crash tests recovery, not that race.
    time.sleep(float(crash.get("wait_s", 10.0)))
    os._exit(1)


def run_training(config: dict[str, Any], session: LocalSession | RaySession) -> dict[str, Any]:
    """The training loop. ``config`` is ``train_loop_config`` (see ``rayjobs.train``):

    cfg (Config.to_dict()), task, method, prompts (training problems), onpolicy
    (hybrid records or None), init_model_path (or None), crash (test hook or None).
    Returns the last metrics (every rank).
    """
    cfg = config_from_dict(config["cfg"])
    t = cfg.train
    task_name, method = config["task"], config["method"]
    label = config.get("label") or method  # the model's name: "base" trains like "ft"
    rank, world = session.rank, session.world
    use_ray = isinstance(session, RaySession)
    if t.batch_size % (t.micro_batch_size * world):
        raise ValueError(
            f"train.batch_size={t.batch_size} must be a multiple of micro_batch_size * workers "
            f"({t.micro_batch_size} * {world})"
        )
    n_micro = t.batch_size // (t.micro_batch_size * world)
    torch.set_num_threads(max(1, t.cpus_per_worker))
    if t.use_gpu and use_ray:
        import ray.train.torch

        device = ray.train.torch.get_device()
    elif t.use_gpu:  # train_local on a GPU box (notebooks, probes): this process's GPU
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
    torch.manual_seed(cfg.seed + rank)

    bf16 = resolve_bf16(t.bf16, device)
    attention = resolve_attention(t.attention, device, bf16)
    model, tok = build_training_model(cfg, config.get("init_model_path"), attention)
    model.to(device)
    engine = Engine(cfg, model, world, n_micro, use_ray)
    stream = ExampleStream(cfg, task_name, method, config["prompts"], tok, config.get("onpolicy"))

    start, history, resumes = resume_from_checkpoint(
        session, engine, rank, f"[train] {task_name}/{label}"
    )

    max_steps = int(config.get("max_steps") or t.max_steps)
    ckpt_every = t.checkpoint_every
    progress = console.Progress(config.get("console") if rank == 0 else None)
    offset = int(config.get("progress_offset") or 0)  # earlier models of a chain
    progress.total(int(config.get("progress_total") or max_steps))
    progress.done(offset + start)
    probe = config.get("probe_items") or []
    probe_every = t.probe_every if probe and t.zero_stage < 3 else 0
    late = config.get("probe_ft_later")  # FT errors not harvested yet: probe them once they are
    late_ft = None
    if probe_every and late and rank == 0:
        from selfcorrect.probes import LateFTProbes

        late_ft = LateFTProbes(late["task_dir"], late["ft_hash"], late["seed"], late["n"])

    def checkpoint(step: int, metrics: dict[str, Any], final: bool) -> None:
        report_checkpoint(engine, tok, cfg, session, rank, step, metrics, history, final, resumes)

    kinds = [k for k in Span]
    acc = _Accumulator(kinds)
    t_start = time.time()
    t_window = time.time()
    last: dict[str, Any] = history[-1] if history else {}
    step = start
    for step in range(start, max_steps):
        _maybe_crash(config.get("crash"), step, rank)
        examples = stream.local_batch(step, rank, world)
        pad_to = t.compile_pad_to if t.compile else 1
        micro = [
            collate(mb, tok.pad_token_id, pad_to)
            for mb in length_grouped(examples, t.micro_batch_size)
        ]
        local_w = sum(float(b["loss_weight"][:, 1:].sum()) for b in micro)
        norm = global_weight_sum(torch.tensor(local_w, device=device))
        for i, b in enumerate(micro):
            b = {k: v.to(device) for k, v in b.items()}
            last_micro = i == len(micro) - 1
            with engine.no_sync(last_micro):
                with _autocast(device, bf16):
                    logits = engine.forward(b)  # [mb, T, V]
                loss, stats = weighted_lm_loss(logits, b, norm, world)
                engine.backward(loss)
            if not last_micro:
                engine.micro_step()
            acc.add(float(loss.detach()), stats, b)
        lr = engine.lr()
        grad_norm = engine.step()
        acc.steps += 1
        done = step + 1
        progress.done(offset + done)
        out_of_time = bool(t.max_minutes) and (time.time() - t_start) / 60 >= t.max_minutes
        out_of_time = _all_max(float(out_of_time)) > 0  # every rank stops at the same step
        final = done == max_steps or out_of_time
        due_ckpt = final or (ckpt_every and done % ckpt_every == 0)
        due_probe = bool(probe_every) and (final or done % probe_every == 0)
        if final or due_ckpt or due_probe or done % max(1, t.log_every) == 0:
            last = acc.metrics(done, lr, grad_norm, time.time() - t_window, world)
            last["bf16"] = bf16
            if due_probe and rank == 0:
                from selfcorrect.probes import probe_recognition
                from selfcorrect.tasks import get_task

                task = get_task(task_name, **cfg.task_options(task_name))
                last.update(probe_recognition(engine.module, tok, task, probe))
                if late_ft is not None:
                    late_ft.probe(engine.module, tok, task, last)
            acc = _Accumulator(kinds)
            t_window = time.time()
            history.append(last)
            if rank == 0:
                shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()}
                print(f"[train] {task_name}/{label} step {done}/{max_steps} {shown}", flush=True)
            if due_ckpt:
                checkpoint(done, last, final)
            else:
                session.report(last)
        if final:
            break
    else:
        # Resumed after the final checkpoint had been written: publish the model again.
        checkpoint(step, last or {"step": step}, True)
    return last


class _Accumulator:
    """Global metrics over a logging window: objective, per-span NLL, decisions, tokens/s."""

    def __init__(self, kinds: list[Span]) -> None:
        self.kinds = kinds
        self.objective = 0.0  # sum of micro-batch losses (each already globally normalised)
        self.nll = np.zeros(len(kinds))
        self.cnt = np.zeros(len(kinds))
        self.tokens = 0.0
        self.steps = 0
        self.decision = np.zeros(5)  # decisions, their NLL, right, false-alarm sites, alarms

    def add(
        self, loss: float, stats: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> None:
        self.objective += loss
        weighted = stats["weight"] > 0
        for i, k in enumerate(self.kinds):
            sel = (stats["kind"] == int(k)) & weighted
            self.nll[i] += float(stats["nll"][sel].sum())
            self.cnt[i] += float(sel.sum())
        self.decision += np.array(decision_stats(stats))
        self.tokens += float(batch["attention_mask"].sum())

    def metrics(
        self, step: int, lr: float, grad_norm: float, seconds: float, world: int
    ) -> dict[str, Any]:
        k = len(self.kinds)
        vals = _all_sum([self.objective, self.tokens, *self.nll, *self.cnt, *self.decision])
        nll, cnt = vals[2 : 2 + k], vals[2 + k : 2 + 2 * k]
        n_dec, dec_nll, dec_right, fa_sites, fa_hits = vals[2 + 2 * k :]
        steps = max(1, self.steps)
        out: dict[str, Any] = {
            "step": step,
            # Micro-batch losses carry a factor ``world`` (DDP averages gradients), so the
            # per-step objective is their sum over ranks / world.
            "objective": vals[0] / world / steps,
            "loss": sum(nll) / max(sum(cnt), 1.0),  # mean NLL over trained (weighted) tokens
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": vals[1] / max(seconds, 1e-9),
            "step_s": seconds / steps,
        }
        for i, kind in enumerate(self.kinds):
            if cnt[i] > 0:
                out[f"loss_{kind.name.lower()}"] = nll[i] / cnt[i]
        if n_dec > 0:
            # The decision to flag an error after a wrong step: -log p(flag) and argmax accuracy.
            out["decision_loss"] = dec_nll / n_dec
            out["decision_accuracy"] = dec_right / n_dec
            out["decision_n"] = n_dec
        if n_dec > 0 and fa_sites > 0:
            # How often the argmax after a correct step would start the recognition line.
            out["decision_false_alarm_rate"] = fa_hits / fa_sites
        return out


def resume_from_checkpoint(
    session: Any, engine: Any, rank: int, label: str
) -> tuple[int, list[dict[str, Any]], list[int]]:
    """Restore engine state and this rank's RNG from the session's latest checkpoint, if any.

    Returns (start step, metric history, steps the run was restarted at). The counterpart of
    ``report_checkpoint``; shared by supervised training and GRPO.
    """
    ckpt_dir = session.get_checkpoint_dir()
    if not ckpt_dir:
        return 0, [], []
    state = json.loads(Path(ckpt_dir, STATE_FILE).read_text())
    start, history = int(state["step"]), list(state["history"])
    resumes = [*state.get("resumes", []), start]
    engine.load(ckpt_dir)
    rng_file = Path(ckpt_dir, f"rng_rank{rank}.pt")
    if rng_file.exists():
        torch.set_rng_state(load_torch_state(str(rng_file)))
    if rank == 0:
        print(f"{label}: resumed from checkpoint at step {start}", flush=True)
    return start, history, resumes


def report_checkpoint(
    engine: Any,
    tok: Any,
    cfg: Config,
    session: Any,
    rank: int,
    step: int,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    final: bool,
    resumes: list[int],
) -> None:
    """Write one checkpoint (engine state, RNG, trainer state; the HF model when ``final``)
    and report it with ``metrics``. Shared by supervised training and GRPO so both resume
    and publish (``rayjobs.train.publish_final``) the same way."""
    with tempfile.TemporaryDirectory() as d:
        engine.save(d, rank)
        torch.save(torch.get_rng_state(), os.path.join(d, f"rng_rank{rank}.pt"))
        if final:
            with engine.gathered():
                if rank == 0:
                    save_final_model(engine.module, tok, os.path.join(d, MODEL_DIR), cfg.model.lora)
        if rank == 0:
            Path(d, STATE_FILE).write_text(
                json.dumps({"step": step, "history": history, "final": final, "resumes": resumes})
            )
        session.report(metrics, d)


# ---------------------------------------------------------------------------
# Chains: several models, one after another, in one Ray Train run
# ---------------------------------------------------------------------------


def write_metrics(d: str, history: list[dict[str, Any]]) -> None:
    """The metric history as ``metrics.json`` and ``metrics.parquet`` (one row per report)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    Path(d, "metrics.json").write_text(json.dumps(history, indent=2))
    cols = sorted({k for h in history for k in h})
    pq.write_table(
        pa.table({c: [h.get(c) for h in history] for c in cols}), str(Path(d, "metrics.parquet"))
    )


def publish_checkpoint(
    ckpt_dir: str, out_dir: str, state_name: str, extra: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Publish a final checkpoint's model to ``out_dir`` atomically, with metrics.json/parquet
    and ``state_name`` (steps, resumes, ``extra``); returns the metric history."""
    import shutil

    from selfcorrect import io

    state = json.loads(Path(ckpt_dir, STATE_FILE).read_text())
    local_out = not io.is_uri(out_dir)
    stage = io.staging_dir(out_dir) if local_out else tempfile.mkdtemp(prefix="publish-")
    shutil.rmtree(stage)
    shutil.copytree(Path(ckpt_dir, MODEL_DIR), stage)
    history = state["history"]
    write_metrics(stage, history)
    published = {"steps": state["step"], "resumed_at": state.get("resumes", []), **(extra or {})}
    Path(stage, state_name).write_text(json.dumps(published, indent=2))
    if local_out:
        io.replace_dir(stage, out_dir)
    else:
        io.upload_dir(stage, out_dir)
        shutil.rmtree(stage, ignore_errors=True)
    return history


PUBLISHED_STATE = "train_state.json"  # in a published model dir: steps, resumes, model_hash
CHAIN_FILE = "chain.json"  # in a chain's checkpoints: which model of the chain it holds


def published_state(out_dir: str, model_hash: str) -> dict[str, Any] | None:
    """The published model's state if ``out_dir`` holds this very model (same hash), else None."""
    from selfcorrect import io

    p = io.join(out_dir, PUBLISHED_STATE)
    if not io.exists(p):
        return None
    state = io.read_json(p)
    return state if state.get("model_hash") == model_hash else None


class ChainSession:
    """The session of one model of a chain (``run_chain``) inside the run's Ray Train session.

    Its checkpoints name the model's place in the chain, and rank 0 publishes the final one to
    the model's directory *before* reporting it: so a restarted run skips every published
    model, resumes the one it was on from its own checkpoint, and the next model can start
    from this one's directory.
    """

    def __init__(self, session: Any, index: int, resume_dir: str | None, job: dict) -> None:
        self.session, self.index, self.job = session, index, job
        self.rank, self.world = session.rank, session.world
        self._resume = resume_dir
        self.started = time.time()

    def get_checkpoint_dir(self) -> str | None:
        return self._resume

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        if checkpoint_dir is not None and self.rank == 0:
            Path(checkpoint_dir, CHAIN_FILE).write_text(json.dumps({"index": self.index}))
            state = json.loads(Path(checkpoint_dir, STATE_FILE).read_text())
            if state["final"]:
                extra = {
                    "model_hash": self.job["model_hash"],
                    "started": self.started,
                    "finished": time.time(),
                    # wall time of this model (load, steps, probes, checkpoints) ...
                    "train_s": round(time.time() - self.started, 2),
                    # ... and of its optimizer steps alone
                    "compute_s": round(step_seconds(state["history"]), 2),
                }
                publish_checkpoint(checkpoint_dir, self.job["out_dir"], PUBLISHED_STATE, extra)
        self.session.report(metrics, checkpoint_dir)


def step_seconds(history: list[dict[str, Any]]) -> float:
    """Seconds spent in training steps: each logged window's steps x its seconds per step."""
    total, prev = 0.0, 0
    for h in history:
        if "step_s" in h:
            total += (int(h["step"]) - prev) * float(h["step_s"])
        prev = int(h["step"])
    return total


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def run_chain(config: dict[str, Any], session: Any) -> dict[str, Any]:
    """Train ``config["chain"]``'s models one after another in this worker group.

    Each entry is a ``run_training`` config of its own (cfg, method, init_model_path,
    max_steps, onpolicy, probe_items, probe_ft_later) plus ``out_dir`` and ``model_hash``;
    the rest of ``config`` (task, prompts, console, crash) is shared. One Ray Train start-up for the
    chain instead of one per model; each model keeps its own schedule, seed, data stream and
    checkpoints, so it comes out as it would from a run of its own. Returns the last model's
    final metrics.
    """
    jobs = config["chain"]
    shared = {k: v for k, v in config.items() if k != "chain"}
    resume = session.get_checkpoint_dir()
    at = 0
    if resume and Path(resume, CHAIN_FILE).exists():
        at = int(json.loads(Path(resume, CHAIN_FILE).read_text())["index"])
    steps = [int(j.get("max_steps") or j["cfg"]["train"]["max_steps"]) for j in jobs]
    last: dict[str, Any] = {}
    for k, job in enumerate(jobs):
        # Every rank decides alike (rank 0 may see its own publish first on a shared disk).
        done = published_state(job["out_dir"], job["model_hash"]) is not None
        if _all_max(float(done)) > 0:
            continue
        sub = ChainSession(session, k, resume if k == at else None, job)
        progress = {"progress_offset": sum(steps[:k]), "progress_total": sum(steps)}
        last = run_training({**shared, **job, **progress}, sub)
        gc.collect()  # this model's engine and optimizer before the next one's
        _barrier()  # the next model may start from this one's published directory
    return last


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker, ...)``): one model, or a
    chain of models (``config["chain"]``) trained one after another by the same workers."""
    console.attach_worker(config.get("console"))  # quiet mode: output to the stage's log
    if "chain" in config:
        run_chain(config, RaySession())
    else:
        run_training(config, RaySession())


def train_local(
    cfg: Config,
    task_name: str,
    method: str,
    prompts: list[str],
    *,
    onpolicy: list[dict[str, Any]] | None = None,
    init_model_path: str | None = None,
    max_steps: int | None = None,
    checkpoint_root: str | None = None,
    probe_items: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], LocalSession]:
    """Run the loop in this process (one worker, no Ray): tests, benchmarks and notebooks.

    The final model is in ``<session.latest>/model``.
    """
    session = LocalSession(checkpoint_root)
    config = {
        "cfg": cfg.to_dict(),
        "task": task_name,
        "method": method,
        "prompts": list(prompts),
        "onpolicy": onpolicy,
        "init_model_path": init_model_path,
        "max_steps": max_steps,
        "probe_items": probe_items,
    }
    return run_training(config, session), session
