"""Run every benchmark on this machine and rewrite BENCHMARKS.md.

    python -m benchmarks [--only train,compile,generation,eval,tune,grpo,coverage,pipeline] [--quick]
                         [--out BENCHMARKS.md] [--tiny-run runs/tiny] [--threads 2]

Every figure in the file is a ratio measured side by side in this one run (the sides
alternate per round; medians of rounds), next to the machine it ran on and the load
average before and after. ``--quick`` uses tiny step counts: a smoke check that the
benchmarks and the report still work, not numbers to quote. Hand-written notes that are
not benchmark tables live in ``benchmarks/NOTES.md`` and are appended under "Notes".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_info, load_avg  # noqa: E402

NAMES = (
    "train",
    "compile",
    "examples",
    "generation",
    "eval",
    "tune",
    "grpo",
    "coverage",
    "pipeline",
)
NOTES = Path(__file__).with_name("NOTES.md")


def _params(quick: bool, threads: int) -> dict[str, dict[str, Any]]:
    """Arguments of each benchmark's ``run``: full (a few CPU-minutes on 2 idle cores) or smoke check."""
    if quick:
        return {
            "train": dict(steps=2, rounds=1, threads=threads),
            # One micro-batch per step: the end-to-end loop then compiles the steady loop's
            # shape again, which Inductor's cache serves (the smoke check pays one compile).
            "compile": dict(
                steps=1,
                rounds=1,
                threads=threads,
                overrides=["model.preset=nano", "train.micro_batch_size=32"],
            ),
            "generation": dict(
                n=8, n_single=2, max_new_tokens=16, batch_size=8, rounds=1, threads=threads
            ),
            "grpo": dict(
                steps=2,
                prompts=2,
                group=2,
                max_new_tokens=16,
                ft_steps=5,
                rounds=1,
                threads=threads,
            ),
            "coverage": dict(
                errors=10, samples=500, naive_errors=1, naive_samples=200, rounds=1, ray_cpus=0
            ),
            "eval": dict(models=2, problems=4, rounds=1, cpus=threads, scoring_rows=256),
            "tune": dict(trials=2, steps=2, rounds=1, cpus=threads),
            "examples": dict(
                batches=1, steps=1, rounds=1, methods=("eift",), overrides=["model.preset=nano"]
            ),
        }
    return {
        "train": dict(steps=3, rounds=5, threads=threads),
        "compile": dict(steps=10, rounds=3, threads=threads),
        # The eval stage's batch and length (`tiny`: 128 rows, up to 128 new tokens).
        "generation": dict(
            n=128, n_single=4, max_new_tokens=128, batch_size=128, rounds=2, threads=threads
        ),
        "grpo": dict(
            steps=6, prompts=4, group=8, max_new_tokens=48, ft_steps=100, rounds=4, threads=threads
        ),
        "coverage": dict(
            errors=100, samples=10_000, naive_errors=2, naive_samples=500, rounds=3, ray_cpus=2
        ),
        "eval": dict(models=5, problems=20, rounds=3, cpus=threads),
        "tune": dict(trials=3, steps=20, rounds=2, cpus=threads),
        "examples": dict(batches=10, steps=3, rounds=3, threads=1),
    }


def _runner(name: str) -> Callable[..., dict[str, Any]]:
    if name == "train":
        from benchmarks.bench_train import run
    elif name == "compile":
        from benchmarks.bench_compile import run
    elif name == "generation":
        from benchmarks.bench_generation import run
    elif name == "grpo":
        from benchmarks.bench_grpo import run
    elif name == "coverage":
        from benchmarks.bench_coverage import run
    elif name == "eval":
        from benchmarks.bench_eval import run
    elif name == "examples":
        from benchmarks.bench_examples import run
    elif name == "tune":
        from benchmarks.bench_tune import run
    else:
        from benchmarks.pipeline_times import run
    return run


def machine(threads: int) -> dict[str, Any]:
    import torch

    info = cpu_info()
    return {
        **info,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "load_avg_before": load_avg(),
    }


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------


def _n(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"**{x:.2f}x**"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _pair_table(
    head: list[str], baseline: tuple[str, ...], ours: tuple[str, ...], ratio: float
) -> list[str]:
    """A baseline row and our row, the ratio ours / baseline in our row's last column."""
    return _table(head, [[*baseline, ""], [*ours, _x(ratio)]])


def md_train(r: dict[str, Any]) -> list[str]:
    lines = [
        f"`benchmarks/bench_train.py`: `{r['method']}` examples ({r['task']}, `{r['config']}`, "
        f"preset `{r['preset']}`, {r['params']:,} params), batch "
        f"{r.get('fp32', r.get('bf16', {})).get('batch_size')}, {r['steps']} timed steps after "
        f"one warm-up step, {r['threads']} threads, {r['rounds']} alternating rounds. Ours: "
        "`selfcorrect.training.run_training` in one process. TRL: `SFTTrainer` on the same "
        "examples pre-tokenised, `labels` = input_ids with -100 where our loss weight is 0, "
        "sequential sampler, gradient checkpointing off (TRL's default is on; ours has none). "
        "Minimal: bare forward/backward/AdamW on pre-collated batches (the overhead floor). "
        "Tokens are non-padding tokens.",
        "",
    ]
    rows = []
    for p in ("fp32", "bf16"):
        if p not in r:
            continue
        q = r[p]
        t = q["tokens_per_s"]
        rows.append(
            [
                p,
                _n(t["ours"]),
                _n(t.get("trl")),
                _n(t["minimal"]),
                _x(q.get("ours_over_trl")),
                _x(q["ours_over_minimal"]),
                f"{100 * q['mfu_ours']:.1f}%",
                f"{100 * q['mfu_minimal']:.1f}%",
                _n(q["matmul_peak_flops"] / 1e9, 1),
            ]
        )
    lines += _table(
        [
            "precision",
            "ours tokens/s",
            "TRL SFTTrainer tokens/s",
            "minimal loop tokens/s",
            "ours / TRL",
            "ours / minimal",
            "MFU ours",
            "MFU minimal",
            "matmul peak GFLOP/s",
        ],
        rows,
    )
    spread = []
    for p in ("fp32", "bf16"):
        if p in r:
            rt = r[p]["rates"]
            for peer in ("trl", "minimal"):
                if peer in rt:
                    per = ", ".join(
                        f"{a / b:.2f}" for a, b in zip(rt["ours"], rt[peer], strict=True)
                    )
                    spread.append(f"{p} ours/{peer} {per}")
    lg = r.get("length_grouped")
    if lg:
        t = lg["tokens_per_s"]
        per = ", ".join(
            f"{a / b:.2f}"
            for a, b in zip(lg["rates"]["grouped"], lg["rates"]["whole"], strict=True)
        )
        lines += [
            "",
            f"Length-sorted micro-batches (`selfcorrect.training.length_grouped`): our loop with "
            f"micro-batches of {lg['micro_batch_size']} cut from the length-sorted batch of "
            f"{lg['batch_size']} runs at {_n(t['grouped'])} tokens/s against {_n(t['whole'])} "
            f"with the whole batch padded to its longest trace: {_x(lg['grouped_over_whole'])} "
            f"(per round {per}). Same examples and the same update (the loss is normalised over "
            "the global batch); the table above uses one micro-batch per step on both sides.",
        ]
    at = r.get("attention")
    if at:
        t = at["tokens_per_s"]
        per = ", ".join(
            f"{a / b:.2f}" for a, b in zip(at["rates"]["auto"], at["rates"]["sdpa"], strict=True)
        )
        lines += [
            "",
            f"Attention kernel (`train.attention`): at that layout ({'bf16' if at['bf16'] else 'fp32'}), "
            f"`auto` trains with `{at['auto_kernel']}` attention at {_n(t['auto'])} tokens/s against "
            f"{_n(t['sdpa'])} with PyTorch's fused `sdpa` kernel: {_x(at['auto_over_sdpa'])} "
            f"(per round {per}). The table above runs every side with `auto`'s kernel.",
        ]
    lines += [
        "",
        "Per-round ratios (the spread is this shared machine's load noise): "
        + "; ".join(spread)
        + ".",
    ]
    gap = []
    for p in ("fp32", "bf16"):
        if p in r:
            q = r[p]
            gap.append(
                f"{p}: ours at {100 * q['mfu_ours']:.1f}% of the measured 1024^3 {p} matmul peak "
                f"({q['matmul_peak_flops'] / 1e9:.0f} GFLOP/s; model FLOPs "
                f"{q['flops_per_token'] / 1e6:.1f} M/token at {q['mean_padded_len']:.0f} tokens "
                "per padded row)"
            )
    lines += ["", "**Gap to hardware:** " + "; ".join(gap) + "."]
    if "bf16_over_fp32_ours" in r:
        lines.append(
            f"bf16 / fp32: matmul peak {r['bf16_over_fp32_matmul']:.1f}x, our loop "
            f"{r['bf16_over_fp32_ours']:.2f}x (a {r['params'] / 1e6:.1f} M-param model's "
            "matmuls are too small to reach the peak; per-op overhead and the non-matmul work "
            "- norms, softmax, optimizer - do not speed up with bf16)."
        )
    return lines


VARIANT_NAMES = {
    "hf_single": "HF `generate`, one prompt at a time",
    "hf_batched": "HF `generate`, batched, default settings",
    "ours": "`selfcorrect.generate`, batched",
    "ours_dynamic_cache": "the same, over transformers' `DynamicCache` (`torch.cat` per token)",
}


def md_generation(r: dict[str, Any]) -> list[str]:
    lines = [
        f"`benchmarks/bench_generation.py`: preset `{r['preset']}` (random init), "
        f"{r['prompts']} prompts of 4x4-digit multiplication ({r['prompts_single']} for "
        f"one-at-a-time), greedy, up to {r['max_new_tokens']} new tokens, batch "
        f"{r['batch_size']}, {r['threads']} threads, {r['rounds']} alternating rounds, each "
        "variant in a fresh process; peak memory is that process's peak RSS (`VmHWM`; and its rise "
        "over the loaded, warmed-up model).",
        "",
    ]
    v = r["variants"]
    ratio_single = {
        "hf_single": 1.0,
        "hf_batched": r["hf_batched_over_single"],
        "ours": r["ours_over_single"],
    }
    ratio_batched = {"hf_batched": 1.0, "ours": r["ours_over_hf_batched"]}
    ratio_cat = {"ours_dynamic_cache": 1.0, "ours": r.get("ours_over_dynamic_cache")}
    rows = [
        [
            VARIANT_NAMES[k],
            _n(v[k]["tokens_per_s"]),
            _x(ratio_single.get(k)),
            _x(ratio_batched.get(k)),
            _x(ratio_cat.get(k)),
            _n(v[k]["rss_peak_mb"]),
            _n(v[k]["rss_increase_mb"], 1),
        ]
        for k in VARIANT_NAMES
        if k in v
    ]
    return lines + _table(
        [
            "method",
            "tokens/s",
            "vs one at a time",
            "vs HF batched",
            "vs `DynamicCache`",
            "peak RSS MB",
            "RSS rise while generating MB",
        ],
        rows,
    )


def md_grpo(r: dict[str, Any]) -> list[str]:
    lines = [
        f"`benchmarks/bench_grpo.py`: ours (`selfcorrect.grpo.grpo_local`, ZeRO stage 0 in one "
        f"process) vs TRL `GRPOTrainer`, same briefly fine-tuned `{r['preset']}` model, "
        f"{r['prompts']} prompts x {r['group']} samples, up to {r['max_new_tokens']} completion "
        f"tokens, one update per rollout batch, fp32, {r['threads']} threads; "
        f"{r['steps_timed']} steps timed after one warm-up, {r['rounds']} alternating rounds "
        "(medians). TRL's generation time includes its old-policy and reference log-prob "
        "passes; ours counts the reference pass under update: compare step times.",
        "",
    ]
    rows = []
    for side, name in (("ours", "selfcorrect"), ("trl", "TRL GRPOTrainer")):
        m = r[f"{side}_median"]
        rows.append(
            [
                name,
                _n(m["step_s"], 3),
                _n(m["generation_s"], 3),
                _n(m["update_s"], 3),
                _n(m["other_s"], 3),
                _n(m["rollout_tokens_per_s"]),
            ]
        )
    lines += _table(
        ["impl", "step s", "generation s", "update s", "other s", "rollout tokens/s"], rows
    )
    lines += [
        "",
        f"TRL / ours: step time {_x(r['step_time_trl_over_ours'])}, generation "
        f"{_x(r['generation_time_trl_over_ours'])}, update {_x(r['update_time_trl_over_ours'])}; "
        f"rollout tokens/s ours / TRL {_x(r['rollout_tokens_per_s_ours_over_trl'])}.",
    ]
    return lines


def md_coverage(r: dict[str, Any]) -> list[str]:
    lines = [
        f"`benchmarks/bench_coverage.py`: {r['errors']} errors x {r['samples']:,} synthetic "
        "samples each at random golden states (4x4-digit multiplication, 4x4 Sudoku; 10% "
        "malformed `other` lines). Reference: the one-sample injector `sample_error` per "
        f"sample, compared as strings ({r['naive_errors']} errors x {r['naive_samples']:,} "
        "samples; its cost per sample does not depend on the error). Vectorised: "
        f"`coverage_batch` in this process, one core. {r['rounds']} alternating rounds."
        + (
            f" Ray Data: the `coverage` stage on a local Ray with {r['ray_cpus']} CPUs, after a "
            f"warm-up dataset (cold start {r['ray_cold_start_s']:.1f} s, paid once per pipeline)."
            if r.get("ray_cpus")
            else ""
        ),
        "",
    ]
    rows = []
    for name, t in r["tasks"].items():
        s = t["samples_per_s"]
        rows.append(
            [
                name,
                _n(s["naive"]),
                _n(s["vectorised"]),
                _x(t["vectorised_over_naive"]),
                _n(s.get("ray_data")),
                _x(t.get("ray_data_over_naive")),
            ]
        )
    return lines + _table(
        [
            "task",
            "reference samples/s",
            "vectorised samples/s",
            "vectorised / reference",
            "Ray Data stage samples/s",
            "Ray Data / reference",
        ],
        rows,
    )


def md_eval(r: dict[str, Any]) -> list[str]:
    g, sec = r["generations_per_s"], r["seconds"]
    per = ", ".join(
        f"{a / b:.2f}" for a, b in zip(r["rates"]["one_pass"], r["rates"]["per_model"], strict=True)
    )
    lines = [
        f"`benchmarks/bench_eval.py`: the eval stage's generation for {r['models']} models of "
        f"one task (random-initialised `{r['preset']}` models, the `smoke` preset's eval: "
        f"{r['generations']} generations in all, up to {r['max_new_tokens']} new tokens) on a "
        f"local Ray with {r['cpus']} CPUs, actor-pool start-up and model loads included. Per "
        "model: `rayjobs.evaluate.evaluate_model` once per model (one actor pool each, the "
        "stage before). One pass: `evaluate_models` (one pool; its actors switch models). "
        f"Both wrote the same rows. {r['rounds']} alternating rounds.",
        "",
    ]
    lines += _pair_table(
        ["side", "generations/s", "wall s", "one pass / per model"],
        ("per model", _n(g["per_model"], 1), _n(sec["per_model"], 1)),
        ("one pass", _n(g["one_pass"], 1), _n(sec["one_pass"], 1)),
        r["one_pass_over_per_model"],
    )
    lines += ["", f"Per-round ratios: {per}."]
    if "item_order" in g:
        lines += [
            "",
            "Feed order: the one pass with its generation and scoring feeds in item order "
            f"ran at {_n(g['item_order'], 1)} generations/s against {_n(g['one_pass'], 1)} "
            f"sorted by length (`rayjobs.evaluate.by_length`): "
            f"{_x(r['sorted_over_item_order'])} (same rows; random-initialised models "
            "write to the token cap, so prompt padding is a small share here).",
        ]
    sc = r.get("scoring")
    if sc:
        v = sc["rows_per_s"]
        lines += [
            "",
            f"Scoring pass (`generation.step_scores`) on the `tiny` preset's eval items "
            f"({', '.join(sc['tasks'])}: {sc['rows']:,} synthetic wrong steps and their gold "
            "steps, a random-initialised `tiny` model: teacher forcing costs the same whatever "
            "the weights), in Ray Data batches of 128 consecutive rows, one thread:",
            "",
        ]
        lines += _table(
            ["feed", "forward batch", "rows/s", "over item order, 128"],
            [
                ["item order (before)", "128", _n(v["items_128"], 1), ""],
                ["sorted by length", "128", _n(v["sorted_128"], 1), _x(sc["sorted_over_items"])],
                [
                    "sorted by length",
                    "32 (a CPU actor's)",
                    _n(v["sorted_32"], 1),
                    _x(sc["both_over_before"]),
                ],
            ],
        )
    return lines


def md_tune(r: dict[str, Any]) -> list[str]:
    tpm, sec = r["trials_per_min"], r["seconds_per_trial"]
    per = ", ".join(
        f"{a / b:.2f}" for a, b in zip(r["rates"]["in_trial"], r["rates"]["ray_train"], strict=True)
    )
    lines = [
        f"`benchmarks/bench_tune.py`: the tune stage's sweep (`rayjobs.tune.sweep`) of "
        f"{r['trials']} injection rates on {r['task']} (the `tiny` preset's model and training, "
        f"{r['steps']} steps a trial from scratch, one trial at a time) on a local Ray with "
        f"{r['cpus']} CPUs, everything the sweep does included. Ray Train: a `TorchTrainer` run "
        "per trial, then an evaluation task (`tune.trainer=ray_train`). In the trial: the trial's "
        "own process runs the same loop and evaluation (`tune.trainer=in_trial`, what `auto` "
        "picks for one CPU worker). In the trial, a process per trial: the same with "
        "`tune.reuse_actors=false` (each trial in a fresh Ray actor process; the default reuses "
        "a finished trial's process). Every side gave the same model weights. "
        f"{r['rounds']} alternating rounds after a warm-up round.",
        "",
    ]
    if "in_trial_fresh_process" not in tpm:  # results from before the third side
        lines += _pair_table(
            ["side", "trials/min", "s per trial", "in the trial / Ray Train"],
            ("Ray Train run per trial", _n(tpm["ray_train"], 2), _n(sec["ray_train"], 1)),
            ("in the trial", _n(tpm["in_trial"], 2), _n(sec["in_trial"], 1)),
            r["in_trial_over_ray_train"],
        )
        return lines + ["", f"Per-round ratios: {per}."]
    lines += _table(
        ["side", "trials/min", "s per trial", "over Ray Train", "over a process per trial"],
        [
            ["Ray Train run per trial", _n(tpm["ray_train"], 2), _n(sec["ray_train"], 1), "", ""],
            [
                "in the trial, a process per trial",
                _n(tpm["in_trial_fresh_process"], 2),
                _n(sec["in_trial_fresh_process"], 1),
                "",
                "",
            ],
            [
                "in the trial, processes reused (default)",
                _n(tpm["in_trial"], 2),
                _n(sec["in_trial"], 1),
                _x(r["in_trial_over_ray_train"]),
                _x(r["reused_over_fresh_process"]),
            ],
        ],
    )
    return lines + ["", f"Per-round ratios, in the trial / Ray Train: {per}."]


def md_examples(r: dict[str, Any]) -> list[str]:
    lines = [
        "`benchmarks/bench_examples.py`: the batch a training step builds before its forward "
        "pass (`ExampleStream.local_batch`: traces, injected errors, tokenisation, per-token "
        f"loss weights) on `{r['config']}`, {r['threads']} thread(s). Token weights: "
        "`token_weights` (vectorised) against `token_weights_reference` (the per-token rule) "
        f"on the same encoded examples, {r['rounds']} alternating rounds. Which error types "
        "apply: the same batches built with the task's own `applicable_types` against the "
        "enumeration of every injector's outcomes (`type_distributions`; tasks without a "
        "shortcut run the same code on both sides), checked identical first. Share: seconds to "
        f"build one batch over the median `run_training` step ({r['steps']} steps after a "
        "warm-up; a step includes its build).",
        "",
    ]
    rows = [
        [
            x["task"],
            x["method"],
            _n(x["weights_examples_per_s"]["reference"]),
            _n(x["weights_examples_per_s"]["vectorised"]),
            _x(x["weights_vectorised_over_reference"]),
            _x(x["build_over_enumerated"]) if "build_over_enumerated" in x else "-",
            _n(x["build_s"], 3),
            _n(x["step_s"], 2),
            f"{100 * x['build_share']:.1f}%",
        ]
        for x in r["rows"]
    ]
    return lines + _table(
        [
            "task",
            "method",
            "reference examples/s",
            "vectorised examples/s",
            "vectorised / reference",
            "batch build, own applicable types / enumerated",
            "build s per batch",
            "step s",
            "build share of a step",
        ],
        rows,
    )


def md_pipeline(r: dict[str, Any]) -> list[str]:
    if not r.get("found"):
        where = " (no manifest.json in the `--tiny-run` directory)" if r.get("run_dir") else ""
        return [
            f"Not measured in this run{where}: the `tiny` pipeline takes ~30 min, so the runner "
            "reads an existing run's `manifest.json`. Produce one with "
            "`python -m rayjobs.pipeline --config configs/tiny.yaml --output-dir runs/tiny`, "
            "then `python -m benchmarks --only pipeline --tiny-run runs/tiny` (or a full run).",
        ]
    when = (
        dt.datetime.fromtimestamp(r["finished"]).strftime("%Y-%m-%d %H:%M")
        if r.get("finished")
        else "unfinished"
    )
    lines = [
        f"Read from the `tiny` run's `manifest.json` (pipeline finished {when}; not rerun by "
        "this command, so the machine load of that run applies, not the one above).",
        "",
    ]
    if r.get("steps"):
        rows = [[k, _n(v, 1)] for k, v in r["steps"].items()]
        rows.append(["**total**", _n(r.get("total_seconds"), 1)])
        lines += _table(["step", "wall s"], rows) + [""]
    rows = [
        [k, _n(v["seconds"], 1), _n(v.get("startup_s"), 1), _n(v.get("compute_s"), 1), v["status"]]
        for k, v in r["stages"].items()
    ]
    lines += _table(["stage", "seconds", "Ray Train start-up s", "steps s", "status"], rows)
    trained = [v for v in r["stages"].values() if v.get("compute_s") is not None]
    if trained:
        wall = sum(float(v["seconds"] or 0) for v in trained)
        steps = sum(float(v["compute_s"]) for v in trained)
        start = sum(float(v.get("startup_s") or 0) for v in trained)
        lines += [
            "",
            f"Supervised training: {_n(wall, 0)} s of stage time, of which {_n(steps, 0)} s "
            f"({100 * steps / max(wall, 1e-9):.0f}%) optimizer steps and {_n(start, 0)} s "
            f"({100 * start / max(wall, 1e-9):.0f}%) Ray Train start-up; the rest is model "
            "loading, learning-curve probes and checkpoints.",
        ]
    return lines


def md_compile(r: dict[str, Any]) -> list[str]:
    st, cc, e2e = r["steady"], r["compile_cost"], r["end_to_end"]
    t = st["tokens_per_s"]
    per = ", ".join(
        f"{a / b:.2f}" for a, b in zip(st["rates"]["compiled"], st["rates"]["eager"], strict=True)
    )
    shapes = ", ".join(f"{b}x{n}" for b, n in st["shapes"])
    lines = [
        f"`benchmarks/bench_compile.py`: `train.compile` on `{r['config']}` ({r['task']} "
        f"`{r['method']}` examples, {r['threads']} threads, bf16 {'on' if st['bf16'] else 'off'}"
        f"). Steady state: a bare forward/backward/AdamW loop over the same {r['steps']} "
        f"batches (one micro-batch per step, padded to multiples of {st['pad_to']}: shapes "
        f"{shapes}), every shape compiled in a warm-up pass, {r['rounds']} alternating rounds.",
        "",
    ]
    lines += _table(
        ["side", "tokens/s", "compiled / eager"],
        [
            ["eager", _n(t["eager"]), ""],
            ["`torch.compile`", _n(t["compiled"]), _x(st["compiled_over_eager"])],
        ],
    )
    lines += [
        "",
        f"Per-round ratios: {per}. Compile cost of one shape, from process start to the end "
        f"of the first step: {cc['fresh_process_s']:.1f} s in a fresh process (empty Inductor "
        f"cache), {cc['warm_cache_process_s']:.1f} s in a second process that finds that cache, "
        f"{cc['eager_process_s']:.1f} s for the same process without compiling.",
        "",
        f"End to end (`run_training`, micro-batches of {e2e['micro_batch_size']} as the preset "
        f"runs them, {r['steps'] + 1} steps from a fresh model, compilation included): "
        f"{_x(e2e['compiled_over_eager'])} the steps/s of eager. This is why `train.compile` is "
        "off by default on CPU: a run must amortise one compile per padded shape per process.",
    ]
    pl = r.get("pipeline_layout")
    if pl:
        t, first = pl["tokens_per_s"], pl["first_pass_s"]
        lines += [
            "",
            f"Pipeline layout (`--pipeline-layout`): one thread and micro-batches of "
            f"{pl['micro_batch_size']} cut from the length-sorted batch, as each task trains "
            f"inside `tiny` ({pl['micro_batches']} micro-batches; eager unpadded, compiled "
            f"padded: {pl['static_shapes']} static shapes). Tokens/s counts real tokens.",
            "",
        ]
        lines += _table(
            ["side", "first pass s (compiles)", "tokens/s", "/ eager"],
            [
                ["eager", f"{first['eager']:.0f}", _n(t["eager"]), ""],
                [
                    "`torch.compile`, static shapes",
                    f"{first['static']:.0f}",
                    _n(t["static"]),
                    _x(pl["static_over_eager"]),
                ],
                [
                    "`torch.compile(dynamic=True)`",
                    f"{first['dynamic']:.0f}",
                    _n(t["dynamic"]),
                    _x(pl["dynamic_over_eager"]),
                ],
            ],
        )
    return lines


RENDER = {
    "train": ("Supervised training (EIFT, masked loss)", md_train),
    "compile": ("Compiled training (`train.compile`)", md_compile),
    "examples": ("Building training batches", md_examples),
    "generation": ("Generation (harvest / eval)", md_generation),
    "eval": ("Eval stage: one Ray Data pass for every model of a task", md_eval),
    "tune": ("Tune trials: training in the trial's own process", md_tune),
    "grpo": ("GRPO step", md_grpo),
    "coverage": ("Coverage sampling", md_coverage),
    "pipeline": ("Whole `tiny` pipeline: wall time per stage", md_pipeline),
}


def headline(results: dict[str, Any]) -> list[str]:
    """One row per comparison: our figure over the peer's, measured in this run."""
    rows: list[list[str]] = []

    def add(what: str, peer: str, ratio: float | None) -> None:
        if ratio is not None:
            rows.append([what, peer, _x(ratio), "yes" if ratio >= 1.0 else "**no**"])

    tr = results.get("train", {})
    for p in ("fp32", "bf16"):
        if isinstance(tr.get(p), dict):
            add(f"training tokens/s, {p}", "TRL SFTTrainer", tr[p].get("ours_over_trl"))
            add(f"training tokens/s, {p}", "minimal PyTorch loop", tr[p].get("ours_over_minimal"))
    lg = tr.get("length_grouped")
    if isinstance(lg, dict):
        add(
            f"training tokens/s, sorted micro-batches of {lg['micro_batch_size']}",
            "one padded batch (same loop)",
            lg.get("grouped_over_whole"),
        )
    at = tr.get("attention")
    if isinstance(at, dict) and at["auto_kernel"] != "sdpa":
        add(
            f"training tokens/s, {at['auto_kernel']} attention (`auto`)",
            "PyTorch's fused sdpa, same loop",
            at["auto_over_sdpa"],
        )
    c = results.get("compile", {})
    if isinstance(c.get("steady"), dict):
        add(
            "training tokens/s, compiled, same batches", "eager", c["steady"]["compiled_over_eager"]
        )
        add(
            "training steps/s, compiled end to end", "eager", c["end_to_end"]["compiled_over_eager"]
        )
    for row in results.get("examples", {}).get("rows", []):
        if row["method"] != "eift":  # one row per task; the section has every method
            continue
        add(
            f"token loss weights/s, {row['task']} {row['method']}",
            "per-token reference",
            row["weights_vectorised_over_reference"],
        )
        if row.get("own_applicable_types"):
            add(
                f"training batches built/s, {row['task']} {row['method']}",
                "every injector enumerated to find the types that apply",
                row["build_over_enumerated"],
            )
    g = results.get("generation", {})
    if "ours_over_single" in g:
        add("generation tokens/s", "HF generate, one at a time", g["ours_over_single"])
        add("generation tokens/s", "HF generate, batched", g["ours_over_hf_batched"])
        if "ours_over_dynamic_cache" in g:
            add(
                "generation tokens/s, preallocated KV cache",
                "transformers' DynamicCache, same loop",
                g["ours_over_dynamic_cache"],
            )
    e = results.get("eval", {})
    if "one_pass_over_per_model" in e:
        add(
            f"eval generations/s, {e['models']} models",
            "one actor pool per model",
            e["one_pass_over_per_model"],
        )
    if "scoring" in e:
        add(
            "eval scoring rows/s, sorted feed, forward batch 32",
            "item order, forward batch 128",
            e["scoring"]["both_over_before"],
        )
    tu = results.get("tune", {})
    if "in_trial_over_ray_train" in tu:
        add(
            "tune trials/min, one CPU worker",
            "a Ray Train run per trial",
            tu["in_trial_over_ray_train"],
        )
    if "reused_over_fresh_process" in tu:
        add(
            "tune trials/min, trial processes reused",
            "a fresh process per trial",
            tu["reused_over_fresh_process"],
        )
    gr = results.get("grpo", {})
    if "step_time_trl_over_ours" in gr:
        add("GRPO step time (TRL s / ours s)", "TRL GRPOTrainer", gr["step_time_trl_over_ours"])
    for name, t in results.get("coverage", {}).get("tasks", {}).items():
        add(f"coverage samples/s, {name}", "one-sample reference", t["vectorised_over_naive"])
    if not rows:
        return []
    return _table(["figure", "peer", "ours / peer", "at or above peer"], rows)


def render(results: dict[str, Any], mach: dict[str, Any], quick: bool, argv: list[str]) -> str:
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in mach["flags"].items())
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m benchmarks`; edit benchmarks/__main__.py or "
        "benchmarks/NOTES.md, not this file. -->",
        "",
        f"Generated {mach['date']} by `python -m benchmarks {' '.join(argv)}`"
        + (" (**--quick: smoke-check step counts, not figures to quote**)" if quick else "")
        + f" in {mach['wall_s'] / 60:.1f} min.",
        "",
        f"**Machine:** {mach['cpu']}, {mach['cores']} logical cores ({flags}); no GPU used; "
        f"Python {mach['python']}, torch {mach['torch']}, {mach['threads']} torch threads; "
        f"load average {mach['load_avg_before']} before, {mach['load_avg_after']} after "
        "(the machine is shared: absolute numbers move with load, ratios are measured side by "
        "side within one run, alternating the sides per round).",
        "",
    ]
    head = headline(results)
    if head:
        lines += ["## Summary", ""] + head + [""]
    for name in NAMES:
        if name not in results:
            continue
        title, fn = RENDER[name]
        lines += [f"## {title}", ""]
        r = results[name]
        if "error" in r:
            lines += [f"Failed in this run: `{r['error']}`", ""]
        else:
            lines += fn(r) + [""]
    if NOTES.exists():
        lines += ["## Notes", "", NOTES.read_text().strip(), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--only", default=",".join(NAMES), help="comma list of " + ",".join(NAMES))
    ap.add_argument("--quick", action="store_true", help="small step counts (smoke check)")
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    default_run = REPO / "runs" / "tiny"
    ap.add_argument(
        "--tiny-run",
        default=str(default_run) if default_run.exists() else None,
        help="pipeline output dir whose manifest.json gives per-stage seconds",
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in NAMES]
    if bad:
        ap.error(f"unknown benchmark(s) {bad}; choose from {','.join(NAMES)}")
    mach = machine(args.threads)
    mach["date"] = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(json.dumps({"machine": mach}), flush=True)
    params = _params(args.quick, args.threads)
    t0 = time.time()
    results: dict[str, Any] = {}
    failed = False
    for name in NAMES:
        if name not in only:
            continue
        kw = {"run_dir": args.tiny_run} if name == "pipeline" else params[name]
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        t = time.time()
        try:
            results[name] = _runner(name)(**kw)
        except Exception as e:  # one failing benchmark must not lose the others' figures
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            failed = True
        print(f"[benchmarks] {name} done in {time.time() - t:.0f}s", file=sys.stderr, flush=True)
        print(json.dumps({"benchmark": name, **results[name]}), flush=True)
        # Rewrite after each benchmark: an interrupted run still leaves the finished ones.
        mach["load_avg_after"] = load_avg()
        mach["wall_s"] = time.time() - t0
        Path(args.out).write_text(render(results, mach, args.quick, argv))
    print(f"[benchmarks] wrote {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
