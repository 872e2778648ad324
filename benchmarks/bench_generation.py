"""Generation throughput: our batched KV-cached loop vs HF ``generate`` (one at a time, batched).

    python benchmarks/bench_generation.py [--preset nano] [--n 64] [--max-new-tokens 96]

Same model, same prompts (4x4-digit multiplication), greedy, CPU. Reports
generated tokens per second of each method and the ratio to HF ``generate``
called one prompt at a time (the baseline). The model is random-initialised:
throughput does not depend on what it writes, only on how many tokens.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from selfcorrect.generation import generate
from selfcorrect.models import build_model
from selfcorrect.tasks import get_task


def _count(tok, texts):
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)


def hf_one_at_a_time(model, tok, prefixes, max_new_tokens):
    n = 0
    for p in prefixes:
        enc = tok([p], return_tensors="pt", add_special_tokens=False)
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        n += out.shape[1] - enc["input_ids"].shape[1]
    return n


def hf_batched(model, tok, prefixes, max_new_tokens, batch_size):
    n = 0
    for i in range(0, len(prefixes), batch_size):
        enc = tok(
            prefixes[i : i + batch_size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        gen = out[:, enc["input_ids"].shape[1] :]
        n += int((gen != tok.pad_token_id).sum())
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--n", type=int, default=64, help="prompts for the batched methods")
    ap.add_argument("--n-single", type=int, default=16, help="prompts for the one-at-a-time run")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task("multiplication", digits_a=4, digits_b=4)
    rng = np.random.default_rng(0)
    prefixes = [task.prompt(task.sample_problem(rng)) + "\n" for _ in range(args.n)]
    model, tok = build_model(args.preset, max_length=256)
    model.eval()
    mnt = args.max_new_tokens
    generate(model, tok, prefixes[:4], max_new_tokens=8)  # warm-up

    with torch.inference_mode():
        t0 = time.perf_counter()
        n_single = hf_one_at_a_time(model, tok, prefixes[: args.n_single], mnt)
        t_single = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_hfb = hf_batched(model, tok, prefixes, mnt, args.batch_size)
        t_hfb = time.perf_counter() - t0
    t0 = time.perf_counter()
    texts = generate(model, tok, prefixes, max_new_tokens=mnt, batch_size=args.batch_size)
    t_ours = time.perf_counter() - t0
    n_ours = _count(tok, texts)

    base = n_single / t_single
    print(f"preset={args.preset} threads={args.threads} prompts={args.n} max_new_tokens={mnt}")
    for name, n, t in [
        ("hf generate, one at a time", n_single, t_single),
        (f"hf generate, batch {args.batch_size}", n_hfb, t_hfb),
        (f"selfcorrect.generate, batch {args.batch_size}", n_ours, t_ours),
    ]:
        print(f"{name:40s} {n:7d} tokens {t:7.2f}s {n / t:9.0f} tok/s  x{n / t / base:5.1f}")


if __name__ == "__main__":
    main()
