"""Generation throughput and peak memory: our batched KV-cached loop vs HF ``generate``.

    python benchmarks/bench_generation.py [--preset tiny] [--n 64] [--max-new-tokens 96]

Same random-init model, same prompts (4x4-digit multiplication), greedy, CPU, same
thread count. Variants: HF ``model.generate`` one prompt at a time (the baseline),
HF ``model.generate`` batched with default settings, ``selfcorrect.generation.generate``
batched, and the same loop over transformers' ``DynamicCache`` (which appends each token's
keys and values with ``torch.cat``) instead of its preallocated cache. Throughput does not
depend on what an untrained model writes, only on how many tokens, so every variant counts
the tokens it actually generated.

Each variant runs in a fresh subprocess per round (rounds alternate the variants), so
its peak resident memory (``VmHWM``) is that variant's own; the report gives it and its
increase over the same process just after loading the model and warming up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("hf_single", "hf_batched", "ours", "ours_dynamic_cache")


def _maxrss_mb() -> float:
    """This process's peak resident memory. ``VmHWM`` rather than ``ru_maxrss``: Linux keeps
    ``ru_maxrss`` across exec, so a subprocess would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(
    variant: str, preset: str, n: int, max_new_tokens: int, batch_size: int, threads: int
) -> dict[str, Any]:
    """Run one variant in this process: generated tokens, seconds, peak RSS (MB)."""
    import numpy as np
    import torch

    import selfcorrect.generation as generation
    from selfcorrect.generation import generate
    from selfcorrect.models import build_model
    from selfcorrect.tasks import get_task

    torch.set_num_threads(threads)
    if variant == "ours_dynamic_cache":  # the baseline: torch.cat per token, as transformers does
        from transformers import DynamicCache

        generation._preallocated_cache_class = lambda: lambda capacity: DynamicCache()
    task = get_task("multiplication", digits_a=4, digits_b=4)
    rng = np.random.default_rng(0)
    prefixes = [task.prompt(task.sample_problem(rng)) + "\n" for _ in range(n)]
    model, tok = build_model(preset, max_length=256)
    model.eval()
    tok.padding_side = "left"  # decoder-only batched generate needs left padding
    with torch.inference_mode():
        if variant.startswith("ours"):
            generate(model, tok, prefixes[:4], max_new_tokens=8)
        else:
            enc = tok(prefixes[:4], return_tensors="pt", padding=True, add_special_tokens=False)
            model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    rss_ready = _maxrss_mb()
    t0 = time.perf_counter()
    with torch.inference_mode():
        if variant.startswith("ours"):
            texts = generate(
                model, tok, prefixes, max_new_tokens=max_new_tokens, batch_size=batch_size
            )
            tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
        else:
            step = 1 if variant == "hf_single" else batch_size
            tokens = 0
            for i in range(0, n, step):
                enc = tok(
                    prefixes[i : i + step],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                )
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
                gen = out[:, enc["input_ids"].shape[1] :]
                tokens += int((gen != tok.pad_token_id).sum())
    secs = time.perf_counter() - t0
    return {
        "variant": variant,
        "tokens": tokens,
        "seconds": secs,
        "tokens_per_s": tokens / secs,
        "rss_ready_mb": rss_ready,
        "rss_peak_mb": _maxrss_mb(),
    }


def _subprocess(variant: str, **kw: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench_generation", "--one", variant]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(
    preset: str = "tiny",
    n: int = 64,
    n_single: int = 8,
    max_new_tokens: int = 96,
    batch_size: int = 64,
    threads: int = 2,
    rounds: int = 2,
) -> dict[str, Any]:
    """Tokens/s and peak RSS per variant (median over rounds), ratios to the baselines."""
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for v in order:
            runs[v].append(
                _subprocess(
                    v,
                    preset=preset,
                    n=n_single if v == "hf_single" else n,
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                    threads=threads,
                )
            )

    def med(v: str, k: str) -> float:
        return statistics.median(x[k] for x in runs[v])

    def ratio(a: str, b: str) -> float:
        return statistics.median(
            x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(runs[a], runs[b], strict=True)
        )

    return {
        "preset": preset,
        "prompts": n,
        "prompts_single": n_single,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "threads": threads,
        "rounds": rounds,
        "variants": {
            v: {
                "tokens_per_s": med(v, "tokens_per_s"),
                "tokens": med(v, "tokens"),
                "rss_ready_mb": med(v, "rss_ready_mb"),
                "rss_peak_mb": med(v, "rss_peak_mb"),
                "rss_increase_mb": statistics.median(
                    x["rss_peak_mb"] - x["rss_ready_mb"] for x in runs[v]
                ),
            }
            for v in VARIANTS
        },
        "hf_batched_over_single": ratio("hf_batched", "hf_single"),
        "ours_over_single": ratio("ours", "hf_single"),
        "ours_over_hf_batched": ratio("ours", "hf_batched"),
        "ours_over_dynamic_cache": ratio("ours", "ours_dynamic_cache"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--n", type=int, default=64, help="prompts for the batched methods")
    ap.add_argument("--n-single", type=int, default=8, help="prompts for the one-at-a-time run")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--one", choices=VARIANTS, help="run one variant in this process (internal)")
    args = ap.parse_args()
    if args.one:
        res = measure(
            args.one, args.preset, args.n, args.max_new_tokens, args.batch_size, args.threads
        )
    else:
        res = run(
            args.preset,
            args.n,
            args.n_single,
            args.max_new_tokens,
            args.batch_size,
            args.threads,
            args.rounds,
        )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
