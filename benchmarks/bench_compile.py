"""Compiled vs eager training (``train.compile``): steady-state speed, compile cost, end to end.

    python benchmarks/bench_compile.py [--config configs/tiny.yaml] [--steps 10] [--rounds 3]

Three measurements, each a ratio taken in this one run:

* **steady state, same batches**: a bare forward/backward/AdamW loop (bf16 autocast where
  the CPU has it) over the same pre-collated EIFT batches (the whole batch in one
  micro-batch, padded to a multiple of ``train.compile_pad_to``), eager against
  ``torch.compile``; every shape is compiled in a warm-up pass first, and the sides
  alternate per round;
* **compile cost**: seconds to the end of the first compiled step of one shape in a fresh
  process with an empty Inductor cache, and in a second process that finds the first one's
  cache (what a later stage or Ray Train worker of the same run pays);
* **end to end**: ``run_training`` with ``train.compile`` on and off at the preset's own
  micro-batch size, the same ``steps`` from a fresh model, compilation included;
* **pipeline layout** (``--pipeline-layout``): the steady state as a ``tiny`` task trains
  inside the pipeline, one thread and micro-batches of ``train.micro_batch_size`` cut from
  the length-sorted batch: eager on unpadded micro-batches (what ``train.compile=false``
  trains on) against compiled with static shapes (padded to ``compile_pad_to``) and with
  dynamic shapes; tokens/s counts real tokens, so the padding is charged to the compiled
  sides, and the seconds of the first (compiling) pass are reported per side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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

from benchmarks.bench_train import bench_config, bench_prompts, ours_loop  # noqa: E402
from benchmarks.common import alternate, load_avg, median_ratio  # noqa: E402
from selfcorrect.loss import collate, weighted_lm_loss  # noqa: E402
from selfcorrect.models import build_model, resolve_bf16  # noqa: E402
from selfcorrect.training import ExampleStream  # noqa: E402


def _step(model: Any, opt: Any, b: dict[str, torch.Tensor], bf16: bool) -> None:
    device = b["input_ids"].device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    loss, _ = weighted_lm_loss(logits, b, b["loss_weight"][:, 1:].sum())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: time what ran, not what was queued
        torch.cuda.synchronize()


def steady_loop(
    cfg: Any,
    batches: list[dict[str, torch.Tensor]],
    bf16: bool,
    compiled: bool,
    mode: str | None = None,
    dynamic: bool = False,
    warmup_s: dict[str, float] | None = None,
):
    """Returns a side: tokens/s (non-padding) of one pass over ``batches`` after a warm-up
    pass (which compiles every shape when ``compiled``; its seconds go to
    ``warmup_s["s"]``). Runs where ``batches`` live."""
    device = batches[0]["input_ids"].device
    model, _ = build_model(cfg.model.preset, cfg.model.max_length, cfg.seed)
    model.to(device).train()
    fwd = torch.compile(model, dynamic=dynamic, mode=mode) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    t0 = time.perf_counter()
    for b in batches:  # warm-up: every shape seen (and compiled) once
        _step(fwd, opt, b, bf16)
    _sync(device)
    if warmup_s is not None:
        warmup_s["s"] = time.perf_counter() - t0
    tokens = sum(float(b["attention_mask"].sum()) for b in batches)

    def side() -> float:
        _sync(device)
        t = time.perf_counter()
        for b in batches:
            _step(fwd, opt, b, bf16)
        _sync(device)
        return tokens / (time.perf_counter() - t)

    return side


_FIRST_STEP = """
import sys, time
t0 = time.time()
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads({threads})
from selfcorrect.models import build_model
from benchmarks.bench_compile import _step
model, tok = build_model({preset!r}, {max_length}, 0)
model.to({device!r})
fwd = torch.compile(model, dynamic=False)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(3, len(tok), (32, {length}), device={device!r})
b = {{"input_ids": ids, "attention_mask": torch.ones_like(ids),
      "loss_weight": torch.ones(ids.shape), "ul_weight": torch.zeros(ids.shape),
      "span_kind": torch.zeros_like(ids), "fa_target": torch.full_like(ids, -1)}}
_step(fwd, opt, b, {bf16})
if {device!r} == "cuda":
    torch.cuda.synchronize()
print(time.time() - t0)
"""


def compile_cost(
    cfg: Any, bf16: bool, threads: int, length: int, device: str = "cpu"
) -> dict[str, float]:
    """Seconds from process start to the end of the first compiled step (one shape): with an
    empty Inductor cache, then again in a new process that finds that cache."""
    code = _FIRST_STEP.format(
        repo=str(Path(__file__).resolve().parents[1]),
        threads=threads,
        preset=cfg.model.preset,
        max_length=cfg.model.max_length,
        length=length,
        bf16=bf16,
        device=device,
    )
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for name in ("fresh_process_s", "warm_cache_process_s"):
            r = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            )
            out[name] = float(r.stdout.strip().splitlines()[-1])
    # The same process start without compiling: what is not compile cost.
    eager = code.replace("torch.compile(model, dynamic=False)", "model")
    r = subprocess.run([sys.executable, "-c", eager], capture_output=True, text=True, check=True)
    out["eager_process_s"] = float(r.stdout.strip().splitlines()[-1])
    return out


def pipeline_layout(
    base: Any, stream: Any, tok: Any, bf16: bool, steps: int, rounds: int
) -> dict[str, Any]:
    """Eager vs static vs dynamic compile on the micro-batches a ``tiny`` task trains on
    (one thread; the caller sets it). Each side compiles in its own process-wide Inductor
    cache state: the static side first, so the dynamic side may reuse nothing of it."""
    from selfcorrect.training import length_grouped

    mbs = base.train.micro_batch_size
    pad = base.train.compile_pad_to
    examples = [stream.local_batch(s, 0, 1) for s in range(steps)]

    def micro(pad_to: int) -> list[dict[str, torch.Tensor]]:
        return [
            collate(mb, tok.pad_token_id, pad_to)
            for ex in examples
            for mb in length_grouped(ex, mbs)
        ]

    eager_b, padded_b = micro(1), micro(pad)
    warm: dict[str, dict[str, float]] = {k: {} for k in ("eager", "static", "dynamic")}
    sides = {
        "eager": steady_loop(base, eager_b, bf16, compiled=False, warmup_s=warm["eager"]),
        "static": steady_loop(base, padded_b, bf16, compiled=True, warmup_s=warm["static"]),
        "dynamic": steady_loop(
            base, padded_b, bf16, compiled=True, dynamic=True, warmup_s=warm["dynamic"]
        ),
    }
    med, rates = alternate(sides, rounds)
    return {
        "micro_batch_size": mbs,
        "micro_batches": len(eager_b),
        "static_shapes": len({tuple(b["input_ids"].shape) for b in padded_b}),
        "tokens_per_s": med,
        "rates": rates,
        "first_pass_s": {k: round(v["s"], 1) for k, v in warm.items()},
        "static_over_eager": median_ratio(rates, "static", "eager"),
        "dynamic_over_eager": median_ratio(rates, "dynamic", "eager"),
    }


def layout_only(
    config: str, task: str, steps: int, rounds: int, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """``pipeline_layout`` alone, on ``task``'s EIFT batches (bf16 where the CPU has it)."""
    torch.set_num_threads(1)
    base = bench_config(config, overrides, steps, 1)
    bf16 = resolve_bf16(base.train.bf16, torch.device("cpu"))
    _, tok = build_model(base.model.preset, base.model.max_length)
    stream = ExampleStream(base, task, "eift", bench_prompts(base, task), tok)
    res: dict[str, Any] = {"config": config, "task": task, "steps": steps, "rounds": rounds}
    res.update(bf16=bf16, load_avg_start=load_avg())
    res["pipeline_layout"] = pipeline_layout(base, stream, tok, bf16, steps, rounds)
    res["load_avg_end"] = load_avg()
    return res


def run(
    config: str = "configs/tiny.yaml",
    task: str = "multiplication",
    method: str = "eift",
    steps: int = 10,
    threads: int = 2,
    rounds: int = 3,
    overrides: Sequence[str] = (),
    device: str = "cpu",
    layout: bool = False,
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    res: dict[str, Any] = {"config": config, "task": task, "method": method, "steps": steps}
    res.update(rounds=rounds, threads=threads, device=device, load_avg_start=load_avg())
    if device == "cuda":
        res["gpu"] = torch.cuda.get_device_name(0)
        overrides = [*overrides, "train.use_gpu=true"]
    base = bench_config(config, overrides, steps, threads)
    bf16 = resolve_bf16(base.train.bf16, torch.device(device))
    pad = base.train.compile_pad_to
    prompts = bench_prompts(base, task)
    _, tok = build_model(base.model.preset, base.model.max_length)
    stream = ExampleStream(base, task, method, prompts, tok)
    batches = [
        {
            k: v.to(device)
            for k, v in collate(stream.local_batch(s, 0, 1), tok.pad_token_id, pad).items()
        }
        for s in range(steps)
    ]
    sides = {
        "eager": steady_loop(base, batches, bf16, compiled=False),
        "compiled": steady_loop(base, batches, bf16, compiled=True),
    }
    if device == "cuda":  # CUDA graphs: a tiny model's step is kernel-launch bound on a GPU
        sides["compiled_cudagraphs"] = steady_loop(
            base, batches, bf16, compiled=True, mode="reduce-overhead"
        )
    med, rates = alternate(sides, rounds)
    shapes = sorted({tuple(b["input_ids"].shape) for b in batches})
    res["steady"] = {
        "bf16": bf16,
        "pad_to": pad,
        "shapes": shapes,
        "tokens_per_s": med,
        "rates": rates,
        "compiled_over_eager": median_ratio(rates, "compiled", "eager"),
    }
    if "compiled_cudagraphs" in sides:
        res["steady"]["cudagraphs_over_eager"] = median_ratio(rates, "compiled_cudagraphs", "eager")
    res["compile_cost"] = compile_cost(base, bf16, threads, shapes[-1][1], device)
    # End to end: the loop as the preset runs it, a fresh model per side, compile included.
    on = bench_config(config, overrides, steps, threads, "train.compile=true")

    def wall(cfg: Any) -> float:
        t = time.perf_counter()
        ours_loop(cfg, task, method, prompts, steps)
        return (steps + 1) / (time.perf_counter() - t)  # steps per second, warm-up included

    e2e_med, e2e_rates = alternate({"eager": lambda: wall(base), "compiled": lambda: wall(on)}, 1)
    res["end_to_end"] = {
        "micro_batch_size": base.train.micro_batch_size,
        "steps_per_s": e2e_med,
        "compiled_over_eager": median_ratio(e2e_rates, "compiled", "eager"),
    }
    if layout and device == "cpu":
        torch.set_num_threads(1)  # one core per task, as ray.parallel_tasks trains tiny
        res["pipeline_layout"] = pipeline_layout(base, stream, tok, bf16, steps, rounds)
        torch.set_num_threads(threads)
    res["load_avg_end"] = load_avg()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--task", default="multiplication")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--pipeline-layout",
        action="store_true",
        help="also: one thread, the preset's micro-batches; eager vs static vs dynamic compile",
    )
    ap.add_argument(
        "--layout-only",
        action="store_true",
        help="only the --pipeline-layout measurement (minutes instead of a quarter hour)",
    )
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.layout_only:
        print(
            json.dumps(layout_only(args.config, args.task, args.steps, args.rounds, args.overrides))
        )
        return
    res = run(
        args.config,
        args.task,
        "eift",
        args.steps,
        args.threads,
        args.rounds,
        args.overrides,
        args.device,
        args.pipeline_layout,
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
