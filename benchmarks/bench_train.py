"""Supervised training throughput: our loop vs TRL ``SFTTrainer`` vs a minimal loop, fp32/bf16, MFU.

    python benchmarks/bench_train.py [--config configs/tiny.yaml] [--steps 10] [--rounds 3]

Three sides on the same random-init model (``build_model``, same seed), the same EIFT
examples (``ExampleStream(cfg, task, "eift", ...)``: masked loss on wrong steps), the
same batch size, thread count and number of steps:

* ours: ``selfcorrect.training.run_training`` in one process (examples built on the fly,
  global-batch loss normalisation, metrics every step);
* TRL: ``trl.SFTTrainer`` on the same examples pre-tokenised, ``labels`` = input_ids with
  -100 where our loss weight is 0, sequential sampler (same batches), no gradient
  checkpointing (ours does not checkpoint either);
* minimal: a bare ``loss.backward(); opt.step()`` loop on pre-collated batches (the floor
  for framework overhead).

Every side trains with the attention kernel ours picks (``train.attention``: plain matmul
attention on a CPU under bf16, sdpa otherwise), so the ratios are framework overhead; the
kernel's own ratio is measured apart (``attention``: our loop at the pipeline's layout,
``auto`` against ``sdpa``).

Each side runs ``steps + 1`` steps; the first is warm-up. The sides alternate for
``rounds`` rounds and the median of per-round ratios is reported. MFU: model FLOPs
(6 x params + attention, per token) x tokens/s over a dense-matmul peak measured in
the same process (fp32 and bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import alternate, load_avg, matmul_peak, median_ratio  # noqa: E402
from selfcorrect.config import load_config  # noqa: E402
from selfcorrect.data import make_splits  # noqa: E402
from selfcorrect.loss import collate, weighted_lm_loss  # noqa: E402
from selfcorrect.models import (  # noqa: E402
    build_model,
    count_params,
    resolve_attention,
    resolve_bf16,
)
from selfcorrect.tasks import get_task  # noqa: E402
from selfcorrect.training import ExampleStream, LocalSession, run_training  # noqa: E402

SIDES = ("ours", "trl", "minimal")
CPU = torch.device("cpu")


def _tokens(batch: list[dict[str, Any]]) -> float:
    return float(sum(len(e["input_ids"]) for e in batch))


def minimal_loop(cfg: Any, batches: list[list[dict[str, Any]]], bf16: bool) -> float:
    """Tokens/s of a bare PyTorch loop over pre-collated batches (first batch = warm-up)."""
    model, tok = build_model(cfg.model.preset, cfg.model.max_length, cfg.seed)
    model.set_attn_implementation(resolve_attention(cfg.train.attention, CPU, bf16))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    coll = [collate(b, tok.pad_token_id) for b in batches]
    t = 0.0
    for i, b in enumerate(coll):
        if i == 1:
            t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss, _ = weighted_lm_loss(logits, b, b["loss_weight"][:, 1:].sum())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return sum(_tokens(b) for b in batches[1:]) / (time.perf_counter() - t)


def step_reports(cfg: Any, task: str, method: str, prompts: list[str], steps: int) -> list[dict]:
    """The metric line of each ``run_training`` step after the first (the warm-up)."""
    session = LocalSession()
    config = {
        "cfg": cfg.to_dict(),
        "task": task,
        "method": method,
        "prompts": prompts,
        "max_steps": steps + 1,
    }
    try:
        run_training(config, session)
    finally:
        shutil.rmtree(session.root, ignore_errors=True)
    return session.reports[1:]


def ours_loop(cfg: Any, task: str, method: str, prompts: list[str], steps: int) -> float:
    """Tokens/s of ``run_training`` as the loop measures each step (first step = warm-up)."""
    reps = step_reports(cfg, task, method, prompts, steps)
    tokens = sum(r["tokens_per_s"] * r["step_s"] for r in reps)
    return tokens / sum(r["step_s"] for r in reps)


def trl_loop(cfg: Any, batches: list[list[dict[str, Any]]], bf16: bool, threads: int) -> float:
    """Tokens/s of TRL ``SFTTrainer`` on the same batches, wall time between step ends."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model, tok = build_model(cfg.model.preset, cfg.model.max_length, cfg.seed)
    model.set_attn_implementation(resolve_attention(cfg.train.attention, CPU, bf16))
    flat = [e for b in batches for e in b]
    ds = Dataset.from_dict(
        {
            "input_ids": [e["input_ids"].tolist() for e in flat],
            "labels": [
                [
                    int(t) if w > 0 else -100
                    for t, w in zip(e["input_ids"], e["loss_weight"], strict=True)
                ]
                for e in flat
            ],
        }
    )
    ends: list[float] = []

    class StepEnd(TrainerCallback):
        def on_step_end(self, *a: Any, **kw: Any) -> None:
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as d:
        args = SFTConfig(
            output_dir=d,
            per_device_train_batch_size=len(batches[0]),
            gradient_accumulation_steps=1,
            max_steps=len(batches),
            learning_rate=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            lr_scheduler_type="constant",
            max_length=cfg.model.max_length,
            train_sampling_strategy="sequential",
            gradient_checkpointing=False,
            bf16=bf16,
            use_cpu=True,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=cfg.seed,
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[StepEnd()]
        )
        torch.set_num_threads(threads)  # accelerate may change it
        trainer.train()
    return sum(_tokens(b) for b in batches[1:]) / (ends[-1] - ends[0])


def flops_per_token(model: torch.nn.Module, seq_len: float) -> float:
    """Training FLOPs per token: 6 x params (matmuls) + 12 x layers x seq_len x width (attention)."""
    c = model.config
    return 6 * count_params(model) + 12 * c.num_hidden_layers * seq_len * c.hidden_size


def run(
    config: str = "configs/tiny.yaml",
    task: str = "multiplication",
    method: str = "eift",
    steps: int = 10,
    threads: int = 2,
    rounds: int = 3,
    overrides: Sequence[str] = (),
    precisions: Sequence[str] = ("fp32", "bf16"),
    with_trl: bool = True,
    grouped_micro: int = 8,
) -> dict[str, Any]:
    """Tokens/s per side and precision, median ratios, matmul peaks and MFU; with
    ``grouped_micro``, also our loop's length-sorted micro-batches against one batch."""
    torch.set_num_threads(threads)
    res: dict[str, Any] = {
        "config": config,
        "task": task,
        "method": method,
        "steps": steps,
        "rounds": rounds,
        "threads": threads,
        "load_avg_start": load_avg(),
    }
    base = load_config(config, list(overrides))
    whole_batch = base.train.batch_size
    # The same examples on every side, precision and micro-batching.
    prompts = bench_prompts(base, task)
    for name in precisions:
        bf16 = name == "bf16"
        # One micro-batch per step, as the baselines collate it: the framework overhead is
        # measured on the same padded tensors (length grouping is measured below).
        cfg = bench_config(
            config,
            overrides,
            steps,
            threads,
            f"train.bf16={str(bf16).lower()}",
            f"train.micro_batch_size={whole_batch}",
        )
        model, tok = build_model(cfg.model.preset, cfg.model.max_length)
        stream = ExampleStream(cfg, task, method, prompts, tok)
        batches = [stream.local_batch(s, 0, 1) for s in range(steps + 1)]
        sides = {
            "ours": lambda cfg=cfg: ours_loop(cfg, task, method, prompts, steps),
            "minimal": lambda cfg=cfg, b=batches, bf16=bf16: minimal_loop(cfg, b, bf16),
        }
        if with_trl:
            sides["trl"] = lambda cfg=cfg, b=batches, bf16=bf16: trl_loop(cfg, b, bf16, threads)
        med, rates = alternate(sides, rounds)
        torch.set_num_threads(threads)
        seq = sum(max(len(e["input_ids"]) for e in b) for b in batches) / len(batches)
        fpt = flops_per_token(model, seq)
        peak = matmul_peak(torch.bfloat16 if bf16 else torch.float32)
        res[name] = {
            "tokens_per_s": med,
            "rates": rates,
            "ours_over_minimal": median_ratio(rates, "ours", "minimal"),
            "ours_over_trl": median_ratio(rates, "ours", "trl") if with_trl else None,
            "batch_size": cfg.train.batch_size,
            "mean_padded_len": seq,
            "tokens_per_step": sum(_tokens(b) for b in batches) / len(batches),
            "flops_per_token": fpt,
            "matmul_peak_flops": peak,
            "mfu_ours": med["ours"] * fpt / peak,
            "mfu_minimal": med["minimal"] * fpt / peak,
        }
        res["params"] = count_params(model)
        res["preset"] = cfg.model.preset
    if grouped_micro:
        ours = (config, task, method, prompts, steps, threads, rounds, overrides)
        micro = f"train.micro_batch_size={grouped_micro}"
        # Length-sorted micro-batches against the whole batch padded to its longest row: same
        # examples, same update, bf16 where the CPU has it (the presets' ``auto``).
        med, rates = our_loop_variants(
            {"grouped": [micro], "whole": [f"train.micro_batch_size={whole_batch}"]}, *ours
        )
        res["length_grouped"] = {
            "micro_batch_size": grouped_micro,
            "batch_size": whole_batch,
            "tokens_per_s": med,
            "rates": rates,
            "grouped_over_whole": median_ratio(rates, "grouped", "whole"),
        }
        # The training kernel's own ratio at the pipeline's layout: auto against sdpa.
        med, rates = our_loop_variants(
            {k: [micro, f"train.attention={k}"] for k in ("auto", "sdpa")}, *ours
        )
        bf16 = resolve_bf16(base.train.bf16, CPU)
        res["attention"] = {
            "micro_batch_size": grouped_micro,
            "bf16": bf16,
            "auto_kernel": resolve_attention("auto", CPU, bf16),
            "tokens_per_s": med,
            "rates": rates,
            "auto_over_sdpa": median_ratio(rates, "auto", "sdpa"),
        }
    if "fp32" in res and "bf16" in res:
        res["bf16_over_fp32_ours"] = (
            res["bf16"]["tokens_per_s"]["ours"] / res["fp32"]["tokens_per_s"]["ours"]
        )
        res["bf16_over_fp32_matmul"] = (
            res["bf16"]["matmul_peak_flops"] / res["fp32"]["matmul_peak_flops"]
        )
    res["load_avg_end"] = load_avg()
    return res


def bench_config(
    config: str, overrides: Sequence[str], steps: int, threads: int, *extra: str
) -> Any:
    """The config every side of this benchmark runs: ``steps`` timed steps after one warm-up
    step on ``threads`` threads, no checkpoints, a metric line per step."""
    return load_config(
        config,
        [
            *overrides,
            f"train.cpus_per_worker={threads}",
            "train.checkpoint_every=0",
            "train.log_every=1",
            "train.warmup_steps=1",
            f"train.max_steps={steps + 1}",
            *extra,
        ],
    )


def bench_prompts(cfg: Any, task: str) -> list[str]:
    t = get_task(task, **cfg.task_options(task))
    return make_splits(t, 2000, 10, cfg.seed)["train"].column("prompt").to_pylist()


def our_loop_variants(
    variants: dict[str, Sequence[str]],
    config: str,
    task: str,
    method: str,
    prompts: list[str],
    steps: int,
    threads: int,
    rounds: int,
    overrides: Sequence[str],
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Our loop once per variant (its extra overrides), alternating per round, on the same
    examples: median tokens/s and per-round rates by variant."""
    cfgs = {k: bench_config(config, overrides, steps, threads, *x) for k, x in variants.items()}
    sides = {k: lambda c=c: ours_loop(c, task, method, prompts, steps) for k, c in cfgs.items()}
    return alternate(sides, rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--task", default="multiplication")
    ap.add_argument("--method", default="eift")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    res = run(
        args.config,
        args.task,
        args.method,
        args.steps,
        args.threads,
        args.rounds,
        args.overrides,
        with_trl=not args.no_trl,
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
