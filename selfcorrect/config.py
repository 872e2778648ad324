"""Typed experiment config: YAML file + dotted ``key=value`` overrides, validated on load.

Every field has help text (``field(metadata={"help": ...})``). Unknown keys,
wrong types and out-of-range values fail with a message that names the key and
what to change, suggesting the nearest valid key for typos.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem the user can fix; the message says how."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(
            default_factory=lambda d=default: json.loads(json.dumps(d)),
            metadata={"help": help},
            **kw,
        )
    return field(default=default, metadata={"help": help}, **kw)


TRAIN_WEIGHTS_HELP = (
    "error type -> weight for the error traces the methods train on only (empty = "
    "error_weights); eval's synthetic items, coverage and the learning-curve probes keep "
    "error_weights, so a method trained on some types is measured on every type"
)


@dataclass
class MultiplicationConfig:
    digits_a: int = _f(4, "digits of the first operand")
    digits_b: int = _f(4, "digits of the second operand (one partial product per digit)")
    error_weights: dict[str, float] = _f({}, "synthetic error type -> weight (empty = uniform)")
    train_error_weights: dict[str, float] = _f({}, TRAIN_WEIGHTS_HELP)

    def validate(self) -> None:
        _check(1 <= self.digits_a <= 9, "multiplication.digits_a", "must be in 1..9")
        _check(1 <= self.digits_b <= 9, "multiplication.digits_b", "must be in 1..9")
        types = ("carry", "int_10", "int_100", "digit", "digit_close", "two_digits")
        _check_weights(self.error_weights, "multiplication.error_weights", types)
        _check_weights(self.train_error_weights, "multiplication.train_error_weights", types)


@dataclass
class SudokuConfig:
    min_empty: int = _f(6, "fewest empty cells in a puzzle")
    max_empty: int = _f(12, "most empty cells in a puzzle (still solvable by naked singles)")
    error_weights: dict[str, float] = _f({}, "synthetic error type -> weight (empty = uniform)")
    train_error_weights: dict[str, float] = _f({}, TRAIN_WEIGHTS_HELP)
    next_cell_share: float = _f(
        0.0,
        "share of `invalid` errors placed in the cell the golden trace fills next, only the "
        "digit wrong (0 = any empty cell, the paper's injector)",
    )

    def validate(self) -> None:
        _check(
            1 <= self.min_empty <= self.max_empty <= 16,
            "sudoku.min_empty/max_empty",
            "need 1 <= min_empty <= max_empty <= 16",
        )
        _check(0.0 <= self.next_cell_share <= 1.0, "sudoku.next_cell_share", "must be in [0, 1]")
        types = ("invalid", "non_naked_single")
        _check_weights(self.error_weights, "sudoku.error_weights", types)
        _check_weights(self.train_error_weights, "sudoku.train_error_weights", types)


@dataclass
class DataConfig:
    n_train: int = _f(20000, "training problems per task")
    n_test: int = _f(500, "test problems per task (disjoint from train)")

    def validate(self) -> None:
        _check(self.n_train >= 1 and self.n_test >= 1, "data.n_train/n_test", "must be >= 1")


# The names of selfcorrect.models.PRESETS (kept here so loading a config imports no torch).
PRESET_NAMES = ("nano", "mini", "tiny", "tiny-deep", "small", "base", "0.5b")
ATTENTION_KERNELS = ("auto", "sdpa", "eager")


@dataclass
class ModelConfig:
    preset: str = _f(
        "tiny", "random-init size preset: nano | mini | tiny | tiny-deep | small | base | 0.5b"
    )
    path: str | None = _f(None, "local HF model dir or hub id; overrides preset (paper scale)")
    max_length: int = _f(256, "max tokens per training example / generation context")
    lora: bool = _f(False, "train LoRA adapters (peft) instead of all weights")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha")
    chat_template: bool = _f(
        True,
        "put the problem in the tokenizer's chat template (a user turn, then the assistant's "
        "turn holds the trace) when the model's tokenizer has one, as instruct models are "
        "trained to be prompted; false = plain 'prompt\\ntrace' text. No effect on the "
        "character tokenizer (it has no template). The choice is saved with every trained "
        "model: a model trained without it keeps no template",
    )

    def validate(self) -> None:
        _check(
            self.preset in PRESET_NAMES,
            "model.preset",
            f"choose one of {', '.join(PRESET_NAMES)}",
        )
        _check(self.max_length >= 16, "model.max_length", "must be >= 16")
        _check(self.lora_r >= 1 and self.lora_alpha >= 1, "model.lora_r/lora_alpha", "must be >= 1")


@dataclass
class TrainConfig:
    methods: list[str] = _f(["ft", "eift", "hybrid", "insec"], "supervised methods to train")
    max_steps: int = _f(2000, "optimizer steps per method")
    max_steps_by_task: dict[str, int] = _f(
        {},
        "per-task max_steps, e.g. {sudoku: 1000}: every method of that task (FT too, so the "
        "methods keep one budget) trains that many steps (tasks not named use max_steps)",
    )
    base_steps: int = _f(
        0,
        "clean-trace steps of a shared base model per task that every method then fine-tunes "
        "from for max_steps (the small-scale stand-in for a pretrained LM; 0 = methods start "
        "from model.preset / model.path)",
    )
    base_steps_by_task: dict[str, int] = _f(
        {},
        "per-task base_steps, e.g. {sudoku: 1000}: tasks whose steps cost more or learn faster "
        "(tasks not named use base_steps)",
    )
    base_lr: float = _f(
        0.0,
        "peak learning rate of the base stage (0 = train.lr); methods fine-tune at train.lr, "
        "usually lower, as when fine-tuning a pretrained LM",
    )
    max_minutes: float = _f(0.0, "wall-clock budget per method in minutes (0 = none)")
    batch_size: int = _f(64, "global batch size (examples per optimizer step, all workers)")
    micro_batch_size: int = _f(64, "examples per forward pass per worker")
    lr: float = _f(1e-3, "peak learning rate (cosine decay after warmup)")
    warmup_steps: int = _f(50, "linear warmup steps")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    num_workers: int = _f(1, "Ray Train workers (data parallel)")
    use_gpu: bool = _f(False, "one GPU per worker (NCCL); False = CPU via gloo")
    cpus_per_worker: int = _f(2, "CPU cores per worker (sets torch threads)")
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage 0 (plain DDP-style), 1, 2 or 3")
    bf16: bool | str = _f(
        "auto",
        "bf16 autocast with fp32 master weights: true | false | auto (auto = on where the "
        "hardware has a bf16 path: CUDA GPUs with bf16, CPUs with AVX512-BF16 or AMX; each "
        "worker decides for its own device)",
    )
    compile: bool = _f(
        False,
        "torch.compile the model's forward/backward (zero_stage 0). Micro-batches are padded to "
        "multiples of compile_pad_to tokens so shapes repeat; each new shape compiles once per "
        "process. Off by default: on a 2-core CPU a compiled step is ~1.35x eager on the same "
        "batches in bf16 (1.09x in fp32 without a bf16 path), but a shape costs ~60 s to "
        "compile cold (~5 s once Inductor's on-disk cache is warm), which the tiny preset's "
        "short runs do not win back (BENCHMARKS.md)",
    )
    compile_pad_to: int = _f(32, "with compile: pad each micro-batch to a multiple of this")
    attention: str = _f(
        "auto",
        "attention kernel for training (and GRPO's updates): auto | sdpa | eager. auto = eager "
        "(plain matmul attention) on a CPU under bf16 autocast, where PyTorch's fused CPU "
        "attention backward costs ~8x its forward and a step is ~1.25x faster without it "
        "(BENCHMARKS.md); sdpa elsewhere (GPUs: fused kernels). Saved models load with sdpa "
        "either way: it decides the training arithmetic, not the model",
    )
    checkpoint_every: int = _f(200, "steps between Ray Train checkpoints (0 = only at the end)")
    max_failures: int = _f(2, "worker failures to survive by restoring the last checkpoint")
    injection_rate: float = _f(0.2, "fraction of traces with injected errors (eift, hybrid)")
    max_errors: int = _f(4, "errors per injected trace are uniform over 1..max_errors")
    error_placement: str = _f(
        "trace",
        "eift/hybrid: trace = injection_rate of the traces carry 1..max_errors errors (DESIGN 3); "
        "step = each step is an error with probability injection_rate, independently (no "
        "trace-level prior for the model to learn instead of checking the step)",
    )
    last_step_rate: float | None = _f(
        None,
        "error_placement step: probability that the trace's last step is an error (None = "
        "injection_rate); the last step's check is the one a model learns last "
        "(benchmarks/NOTES.md)",
    )
    onpolicy_fraction: float = _f(0.2, "hybrid: fraction of injected errors that are on-policy")
    p_mistake: float = _f(0.15, "insec: per-step mistake probability")
    mistake_loss: str = _f("mask", "insec: mask | unlikelihood")
    w_recognition: float = _f(1.0, "loss weight of recognition lines")
    w_correction: float = _f(1.0, "loss weight of correction steps")
    w_unlikelihood: float = _f(1.0, "insec unlikelihood term weight")
    w_decision: float = _f(
        1.0,
        "extra factor on w_recognition for the decision tokens of a recognition line (AH of "
        "the EIFT line, </mistake>): the one choice the line stands for",
    )
    log_every: int = _f(20, "steps between metric reports")
    probe_every: int = _f(
        0,
        "steps between learning-curve probes of methods with error traces: greedy recognition "
        "of synthetic and FT errors on a fixed item set (0 = off; skipped under ZeRO-3)",
    )
    probe_items: int = _f(48, "items per condition (synthetic, FT errors) in each probe")

    def method_steps(self, task: str) -> int:
        """The step budget of every method on ``task``: a task's recognition may need more."""
        return self.max_steps_by_task.get(task, self.max_steps)

    def validate(self) -> None:
        for m in self.methods:
            _check(
                m in ("ft", "eift", "hybrid", "insec"),
                "train.methods",
                f"unknown method {m!r}; choose from ft, eift, hybrid, insec",
            )
        _check(self.max_steps >= 1, "train.max_steps", "must be >= 1")
        _check(self.base_steps >= 0, "train.base_steps", "must be >= 0 (0 = no base stage)")
        _check(
            self.batch_size >= 1 and self.micro_batch_size >= 1, "train.batch_size", "must be >= 1"
        )
        _check(
            self.batch_size % (self.micro_batch_size * self.num_workers) == 0,
            "train.batch_size",
            f"must be a multiple of micro_batch_size * num_workers "
            f"({self.micro_batch_size} * {self.num_workers})",
        )
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.compile_pad_to >= 1, "train.compile_pad_to", "must be >= 1")
        _check(
            self.attention in ATTENTION_KERNELS,
            "train.attention",
            f"must be one of {', '.join(ATTENTION_KERNELS)}, got {self.attention!r}",
        )
        _check(
            not self.compile or self.zero_stage == 0,
            "train.compile",
            "is supported with zero_stage 0 (DDP) only; set train.compile=false for ZeRO",
        )
        for k, v in self.base_steps_by_task.items():
            _check(
                k in ("multiplication", "sudoku") and v >= 0,
                "train.base_steps_by_task",
                f"{k}: {v}: name a task (multiplication, sudoku) and steps >= 0",
            )
        for k, v in self.max_steps_by_task.items():
            _check(
                k in ("multiplication", "sudoku") and v >= 1,
                "train.max_steps_by_task",
                f"{k}: {v}: name a task (multiplication, sudoku) and steps >= 1",
            )
        _check(self.base_lr >= 0, "train.base_lr", "must be >= 0 (0 = train.lr)")
        _check(self.num_workers >= 1, "train.num_workers", "must be >= 1")
        _check(self.cpus_per_worker >= 1, "train.cpus_per_worker", "must be >= 1")
        _check(self.max_minutes >= 0, "train.max_minutes", "must be >= 0 (0 = no budget)")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(
            self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0 = at the end)"
        )
        _check(self.max_failures >= -1, "train.max_failures", "must be >= 0 (-1 = retry forever)")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.probe_every >= 0, "train.probe_every", "must be >= 0 (0 = no probes)")
        _check(self.probe_items >= 1, "train.probe_items", "must be >= 1")
        _check(
            min(self.w_recognition, self.w_correction, self.w_unlikelihood, self.w_decision) >= 0,
            "train.w_recognition/w_correction/w_unlikelihood/w_decision",
            "loss weights must be >= 0",
        )
        _check(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", "choose 0, 1, 2 or 3")
        _check(0 <= self.injection_rate <= 1, "train.injection_rate", "must be in [0, 1]")
        _check(
            self.last_step_rate is None or 0 <= self.last_step_rate <= 1,
            "train.last_step_rate",
            "must be in [0, 1], or null to use train.injection_rate",
        )
        _check(
            self.last_step_rate is None or self.error_placement == "step",
            "train.last_step_rate",
            "applies to train.error_placement=step only; set that or drop last_step_rate",
        )
        _check(0 <= self.onpolicy_fraction <= 1, "train.onpolicy_fraction", "must be in [0, 1]")
        _check(0 <= self.p_mistake <= 1, "train.p_mistake", "must be in [0, 1]")
        _check(self.max_errors >= 1, "train.max_errors", "must be >= 1")
        _check(
            self.error_placement in ("trace", "step"),
            "train.error_placement",
            f"unknown value {self.error_placement!r}; choose trace or step",
        )
        _check(self.bf16 in (True, False, "auto"), "train.bf16", "choose true, false or auto")
        _check(
            self.mistake_loss in ("mask", "unlikelihood"),
            "train.mistake_loss",
            "choose mask or unlikelihood",
        )


@dataclass
class HarvestConfig:
    splits: list[str] = _f(["train", "test"], "splits to harvest (train feeds hybrid)")
    max_problems: int = _f(2000, "problems per split to sample from (0 = all)")
    samples_per_problem: int = _f(1, "samples per problem, each with its own seed")
    temperature: float = _f(0.0, "0 = greedy")
    num_actors: int = _f(1, "generation actors (one model copy each)")
    batch_size: int = _f(128, "problems per generation batch")
    max_new_tokens: int = _f(200, "generation cap per sample")

    def validate(self) -> None:
        for s in self.splits:
            _check(s in ("train", "test"), "harvest.splits", "choose from train, test")
        _check(self.temperature >= 0, "harvest.temperature", "must be >= 0")
        _check(self.samples_per_problem >= 1, "harvest.samples_per_problem", "must be >= 1")
        _check(self.max_problems >= 0, "harvest.max_problems", "must be >= 0 (0 = all)")
        _check(self.num_actors >= 1, "harvest.num_actors", "must be >= 1")
        _check(self.batch_size >= 1, "harvest.batch_size", "must be >= 1")
        _check(self.max_new_tokens >= 1, "harvest.max_new_tokens", "must be >= 1")


@dataclass
class CoverageConfig:
    n_samples: int = _f(10000, "synthetic samples drawn per on-policy error")

    def validate(self) -> None:
        _check(self.n_samples >= 1, "coverage.n_samples", "must be >= 1")


# Mirrors selfcorrect.evaluate.CONDITIONS (config stays free of the evaluation imports).
EVAL_CONDITIONS = ("clean", "synthetic", "ft_errors", "matched_synthetic", "own_errors")


@dataclass
class EvalConfig:
    models: list[str] = _f(["ft", "eift", "hybrid", "insec", "grpo"], "models to evaluate")
    temperatures: list[float] = _f([0.0, 0.7, 1.0], "decoding temperatures (0 = greedy)")
    max_problems: int = _f(500, "test problems per condition (0 = all)")
    max_errors: int = _f(
        500, "harvested FT errors used by ft_errors and matched_synthetic (0 = all)"
    )
    batch_size: int = _f(128, "prompts per generation batch")
    num_actors: int = _f(1, "generation actors")
    max_new_tokens: int = _f(200, "generation cap")
    conditions: list[str] = _f(
        ["clean", "synthetic", "ft_errors", "matched_synthetic", "own_errors"],
        "conditions to evaluate (DESIGN 7); ft_errors and matched_synthetic need "
        "harvest/ft-test.parquet",
    )
    use_gpu: bool = _f(False, "one GPU per generation actor (bf16); False = CPU")
    cpus_per_actor: int = _f(1, "CPU cores per generation actor (sets torch threads)")
    surprise: bool = _f(
        True,
        "score each wrong step under the evaluated model: its surprise (wrong_step_surprise) "
        "and the signal's log-probability after it and after its paired correct step "
        "(signal_logp, paired_signal_logp -> discrimination_rate); a second actor pool per "
        "task, every model in one pass; false leaves the columns empty",
    )

    def validate(self) -> None:
        _check(all(t >= 0 for t in self.temperatures), "eval.temperatures", "must be >= 0")
        _check(len(self.temperatures) > 0, "eval.temperatures", "name at least one (0 = greedy)")
        for c in self.conditions:
            _check(
                c in EVAL_CONDITIONS,
                "eval.conditions",
                f"unknown condition {c!r}; choose from {', '.join(EVAL_CONDITIONS)}",
            )
        _check(len(self.conditions) > 0, "eval.conditions", "name at least one condition")
        _check(self.num_actors >= 1, "eval.num_actors", "must be >= 1")
        _check(
            self.max_problems >= 0 and self.max_errors >= 0,
            "eval.max_problems/max_errors",
            "must be >= 0 (0 = all)",
        )
        _check(self.cpus_per_actor >= 1, "eval.cpus_per_actor", "must be >= 1")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")


@dataclass
class GRPOConfig:
    enabled: bool = _f(True, "train the GRPO baseline from the FT model")
    steps: int = _f(100, "policy updates")
    group_size: int = _f(8, "samples per prompt")
    prompts_per_step: int = _f(16, "prompts per update (global)")
    lr: float = _f(1e-4, "learning rate")
    kl_coef: float = _f(0.04, "KL penalty to the reference (FT) model")
    clip: float = _f(0.2, "PPO-style ratio clip")
    temperature: float = _f(1.0, "rollout temperature")
    max_new_tokens: int = _f(200, "rollout length cap")
    reward: str = _f("answer", "answer | steps | self_correction")
    max_minutes: float = _f(0.0, "wall-clock budget in minutes (0 = none)")
    num_workers: int = _f(0, "Ray Train workers for GRPO (0 = train.num_workers)")
    micro_batch_size: int = _f(0, "sequences per forward pass per worker (0 = whole local batch)")
    updates_per_batch: int = _f(1, "optimizer steps per rollout batch (>1 makes the clip matter)")
    weight_decay: float = _f(0.0, "AdamW weight decay (0: zero advantage leaves weights alone)")
    correction_bonus: float = _f(0.5, "self_correction reward: bonus for fixing a real wrong step")
    false_alarm_penalty: float = _f(0.5, "self_correction reward: penalty per false alarm")
    checkpoint_every: int = _f(0, "steps between Ray Train checkpoints (0 = only at the end)")
    eval_every: int = _f(0, "steps between held-out greedy evaluations (0 = start and end only)")
    eval_problems: int = _f(64, "held-out test problems scored at each evaluation (0 = none)")

    def validate(self) -> None:
        _check(
            self.group_size >= 2, "grpo.group_size", "must be >= 2 (advantages are group-relative)"
        )
        _check(self.steps >= 1, "grpo.steps", "must be >= 1")
        _check(self.prompts_per_step >= 1, "grpo.prompts_per_step", "must be >= 1")
        _check(self.lr > 0, "grpo.lr", "must be > 0")
        _check(self.kl_coef >= 0, "grpo.kl_coef", "must be >= 0")
        _check(0 < self.clip < 1, "grpo.clip", "must be in (0, 1)")
        _check(self.temperature > 0, "grpo.temperature", "must be > 0 (rollouts must sample)")
        _check(self.max_new_tokens >= 1, "grpo.max_new_tokens", "must be >= 1")
        _check(self.num_workers >= 0, "grpo.num_workers", "must be >= 0")
        _check(self.micro_batch_size >= 0, "grpo.micro_batch_size", "must be >= 0")
        _check(self.updates_per_batch >= 1, "grpo.updates_per_batch", "must be >= 1")
        _check(self.weight_decay >= 0, "grpo.weight_decay", "must be >= 0")
        _check(self.max_minutes >= 0, "grpo.max_minutes", "must be >= 0 (0 = no budget)")
        _check(
            self.correction_bonus >= 0 and self.false_alarm_penalty >= 0,
            "grpo.correction_bonus/false_alarm_penalty",
            "must be >= 0",
        )
        _check(
            min(self.checkpoint_every, self.eval_every, self.eval_problems) >= 0,
            "grpo.checkpoint_every/eval_every/eval_problems",
            "must be >= 0",
        )
        _check(
            self.reward in ("answer", "steps", "self_correction"),
            "grpo.reward",
            "choose answer, steps or self_correction",
        )


@dataclass
class TuneConfig:
    enabled: bool = _f(True, "run the injection-rate sweep")
    injection_rates: list[float] = _f([0.05, 0.1, 0.2, 0.35, 0.5], "grid over injection rate")
    max_errors: list[int] = _f([], "optional grid over max errors per trace")
    w_recognition: list[float] = _f([], "optional grid over recognition loss weight")
    w_correction: list[float] = _f([], "optional grid over correction loss weight")
    search: str = _f("grid", "grid | random")
    num_samples: int = _f(1, "samples per grid point (random: total trials)")
    asha: bool = _f(False, "ASHA early stopping on validation loss")
    asha_grace_period: int = _f(1, "ASHA: metric reports before a trial may be stopped")
    asha_reduction_factor: int = _f(2, "ASHA: keep 1/reduction_factor of trials per rung")
    max_steps: int = _f(300, "training steps per trial")
    max_concurrent: int = _f(0, "concurrent trials (0 = as resources allow)")
    init: str = _f("scratch", "trial start point: scratch (random init) | ft (the FT model)")
    eval_problems: int = _f(
        0, "test problems per condition in a trial's eval (0 = eval.max_problems)"
    )
    val_examples: int = _f(64, "held-out test traces for a trial's validation loss")
    report_every: int = _f(
        0, "steps between a trial's validation-loss reports (ASHA rungs); 0 = auto"
    )
    trainer: str = _f(
        "auto",
        "how a trial trains: ray_train (a Ray Train TorchTrainer run per trial, Ray's "
        "Tune-over-Train pattern) | in_trial (the trial's own process runs the training loop "
        "and the evaluation: no Ray Train start-up, ~20 s a trial on 2 CPU cores; one worker, "
        "zero_stage 0, a local output dir) | auto (in_trial where it applies on CPUs, else "
        "ray_train). Same model either way",
    )
    reuse_actors: bool = _f(
        True,
        "a finished trial's process runs the next trial (Ray Tune's reuse_actors): no process "
        "start-up and imports per trial; false gives each trial a fresh process",
    )

    def validate(self) -> None:
        _check(len(self.injection_rates) > 0, "tune.injection_rates", "name at least one rate")
        _check(
            self.trainer in ("auto", "ray_train", "in_trial"),
            "tune.trainer",
            f"unknown value {self.trainer!r}; choose auto, ray_train or in_trial",
        )
        _check(all(0 <= r <= 1 for r in self.injection_rates), "tune.injection_rates", "in [0, 1]")
        _check(all(m >= 1 for m in self.max_errors), "tune.max_errors", "each must be >= 1")
        _check(
            all(w >= 0 for w in self.w_recognition + self.w_correction),
            "tune.w_recognition/w_correction",
            "loss weights must be >= 0",
        )
        _check(self.search in ("grid", "random"), "tune.search", "choose grid or random")
        _check(self.num_samples >= 1, "tune.num_samples", "must be >= 1")
        _check(self.asha_grace_period >= 1, "tune.asha_grace_period", "must be >= 1")
        _check(self.asha_reduction_factor >= 2, "tune.asha_reduction_factor", "must be >= 2")
        _check(self.max_steps >= 1, "tune.max_steps", "must be >= 1")
        _check(self.max_concurrent >= 0, "tune.max_concurrent", "must be >= 0 (0 = automatic)")
        _check(self.init in ("scratch", "ft"), "tune.init", "choose scratch or ft")
        _check(self.eval_problems >= 0, "tune.eval_problems", "must be >= 0")
        _check(self.val_examples >= 1, "tune.val_examples", "must be >= 1")
        _check(self.report_every >= 0, "tune.report_every", "must be >= 0 (0 = auto)")


@dataclass
class RayConfig:
    address: str | None = _f(None, "cluster address; None = embedded local Ray (or RAY_ADDRESS)")
    num_cpus: int | None = _f(None, "CPUs for the embedded local instance (None = all)")
    parallel_tasks: bool = _f(
        True,
        "pipeline: run every task's stages (data to tune) as one graph on a driver thread "
        "per task, each stage once the stages of its own task that it reads are done, so "
        "tasks share the cluster's CPUs/GPUs instead of waiting for each other (the report "
        "follows, once every task is done); without hybrid, a task's methods train from its "
        "base beside its FT",
    )

    def validate(self) -> None:
        _check(
            self.num_cpus is None or self.num_cpus >= 1,
            "ray.num_cpus",
            "must be >= 1 (or null = all cores)",
        )


@dataclass
class TrackingConfig:
    backend: str = _f(
        "mlflow",
        "experiment tracking: mlflow (a SQLite store under <output-dir>/mlruns/, or "
        "tracking.uri) | none",
    )
    uri: str | None = _f(
        None,
        "MLflow tracking URI, e.g. http://mlflow.internal:5000 for a cluster's server "
        "(None = the embedded store in the run directory)",
    )
    experiment: str | None = _f(
        None, "MLflow experiment name (None = '<name>: <output dir>', one per run directory)"
    )

    def validate(self) -> None:
        _check(
            self.backend in ("mlflow", "none"),
            "tracking.backend",
            f"unknown value {self.backend!r}; choose mlflow or none",
        )
        _check(
            self.uri is None or bool(self.uri.strip()),
            "tracking.uri",
            "must be a tracking URI (http://host:5000, sqlite:///path.db) or null",
        )
        _check(
            self.experiment is None or bool(self.experiment.strip()),
            "tracking.experiment",
            "must be a non-empty name or null",
        )


# (section, key) pairs that ``Config.to_dict`` leaves out while empty (see there).
OMITTED_AT_DEFAULT = (
    ("multiplication", "train_error_weights"),
    ("sudoku", "train_error_weights"),
)

# Settings that decide only the error traces (how errors are drawn, placed and weighted in
# the loss), never a clean trace. The data, the models trained on clean traces (base, FT),
# the harvest of FT and GRPO (which starts from FT) do not depend on them, so their stage
# hashes leave them out (``Config.section_hash(..., clean=True)``): a run resumed with another
# injection rate or injector mix keeps its bases and FT and retrains only what uses errors.
INJECTION_KEYS: dict[str, tuple[str, ...]] = {
    "multiplication": ("error_weights", "train_error_weights"),
    "sudoku": ("error_weights", "train_error_weights", "next_cell_share"),
    "train": (
        "injection_rate",
        "max_errors",
        "error_placement",
        "last_step_rate",
        "onpolicy_fraction",
        "p_mistake",
        "mistake_loss",
        "w_recognition",
        "w_correction",
        "w_unlikelihood",
        "w_decision",
        "probe_every",
        "probe_items",
    ),
}


@dataclass
class Config:
    name: str = _f("run", "run name (shown in the report)")
    seed: int = _f(0, "master seed: same seed, same data, errors and metrics")
    tasks: list[str] = _f(["multiplication", "sudoku"], "tasks to run")
    multiplication: MultiplicationConfig = field(default_factory=MultiplicationConfig)
    sudoku: SudokuConfig = field(default_factory=SudokuConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    coverage: CoverageConfig = field(default_factory=CoverageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        for t in self.tasks:
            _check(
                t in ("multiplication", "sudoku"),
                "tasks",
                f"unknown task {t!r}; choose multiplication, sudoku",
            )
        _check(len(self.tasks) > 0, "tasks", "name at least one task")
        _check(
            self.tune.trainer != "in_trial"
            or (self.train.num_workers == 1 and self.train.zero_stage == 0),
            "tune.trainer",
            "in_trial trains in the trial's one process: it needs train.num_workers=1 and "
            "train.zero_stage=0; set tune.trainer=ray_train (or auto) for more workers or ZeRO",
        )
        _check(self.seed >= 0, "seed", "must be >= 0 (numpy seeds are non-negative)")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                v.validate()

    def task_options(self, task: str) -> dict[str, Any]:
        """Constructor options for ``selfcorrect.tasks.get_task``."""
        if task == "multiplication":
            return {
                "digits_a": self.multiplication.digits_a,
                "digits_b": self.multiplication.digits_b,
            }
        return {
            "min_empty": self.sudoku.min_empty,
            "max_empty": self.sudoku.max_empty,
            "next_cell_share": self.sudoku.next_cell_share,
        }

    def error_weights(self, task: str) -> dict[str, float] | None:
        w = getattr(self, task).error_weights
        return dict(w) if w else None

    def train_error_weights(self, task: str) -> dict[str, float] | None:
        """The injector mix of the methods' error traces: ``train_error_weights``, else
        ``error_weights``."""
        w = getattr(self, task).train_error_weights
        return dict(w) if w else self.error_weights(task)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        # Keys added after runs were recorded are left out at their default, so config.yaml
        # and every stage hash of a run that never set them stay as they were.
        for section, key in OMITTED_AT_DEFAULT:
            if not d[section][key]:
                del d[section][key]
        return d

    def clean_dict(self) -> dict[str, Any]:
        """``to_dict()`` without ``INJECTION_KEYS``: what decides the clean traces alone."""
        d = self.to_dict()
        for section, keys in INJECTION_KEYS.items():
            for k in keys:
                d[section].pop(k, None)
        return d

    def section_hash(self, *sections: str, clean: bool = False) -> str:
        """Stable hash of the named config sections: decides whether a stage must be redone.

        ``clean``: leave ``INJECTION_KEYS`` out, for stages that never see an error trace.
        """
        d = self.clean_dict() if clean else self.to_dict()
        blob = json.dumps({s: d[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


def _check_weights(w: dict[str, float], key: str, allowed: tuple[str, ...]) -> None:
    for k, v in w.items():
        _check(k in allowed, key, f"unknown error type {k!r}; choose from {', '.join(allowed)}")
        _check(v >= 0, key, f"weight of {k!r} must be >= 0")
    _check(not w or sum(w.values()) > 0, key, "at least one weight must be > 0")


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner[:-1]:  # first type that takes the value, e.g. bool | str for "auto"
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(
                f"config key '{key}': expected a list, got {value!r}; write a YAML list, "
                f"e.g. {key}=[{value}]"
            )
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = (
                f"; did you mean '{prefix}{near[0]}'?"
                if near
                else f"; valid keys: {', '.join(names)}"
            )
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name] or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(data[name], tp, prefix + name)
    return cls(**kwargs)


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    d[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``train.lr=3e-4`` -> ('train.lr', 0.0003); values are parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=3e-4)")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    # YAML reads 3e-4 as a string; numbers people type should be numbers.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML preset, apply dotted overrides, validate. Raises ConfigError with a fix."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(
                f"config file {str(p)!r} not found; pass --config configs/<preset>.yaml"
            )
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    for item in overrides or []:
        k, v = parse_override(item)
        _set_dotted(data, k, v)
    cfg = _build(Config, data)
    cfg.validate()
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data)
    cfg.validate()
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per key with its help text (``python -m rayjobs.pipeline --help-config``)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            lines += describe(hints[f.name], f"{prefix}{f.name}.")
        else:
            lines.append(f"{prefix}{f.name}: {f.metadata.get('help', '')}")
    return lines
