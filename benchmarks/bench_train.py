"""Training throughput: the project's loop vs a minimal PyTorch loop, fp32 vs bf16, MFU.

python benchmarks/bench_train.py [--preset tiny] [--steps 20] [--threads 2] [--rounds 3]

* framework overhead: ``selfcorrect.training.run_training`` (in-process session,
  on-the-fly example building, global-batch loss normalisation, metrics) against
  a minimal loop (pre-encoded batches, plain ``loss.backward(); opt.step()``) on
  the same model, data, batch shape and thread count. The two alternate for
  ``--rounds`` rounds and the median ratio is reported, so background load hits
  both alike.
* fp32 vs bf16 autocast tokens/s for both loops.
* MFU: model FLOPs (6 * params * tokens + attention) per second over a measured
  fp32 (and bf16) matmul peak on this machine.

Writes a JSON line to stdout; figures go into BENCHMARKS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from selfcorrect.config import load_config  # noqa: E402
from selfcorrect.data import make_splits  # noqa: E402
from selfcorrect.loss import collate, weighted_lm_loss  # noqa: E402
from selfcorrect.models import build_model, count_params  # noqa: E402
from selfcorrect.tasks import get_task  # noqa: E402
from selfcorrect.training import ExampleStream, LocalSession, run_training  # noqa: E402


def matmul_peak(dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    """Measured dense matmul FLOP/s (the MFU denominator)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def minimal_loop(cfg, stream: ExampleStream, steps: int, bf16: bool) -> tuple[float, float]:
    """(tokens, seconds) of a bare PyTorch loop over the same examples (pre-encoded)."""
    model, tok = build_model(cfg.model.preset, cfg.model.max_length, cfg.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    batches = [collate(stream.local_batch(s, 0, 1), tok.pad_token_id) for s in range(steps)]
    tokens = 0.0
    t = time.perf_counter()
    for b in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss, _ = weighted_lm_loss(logits, b, b["loss_weight"][:, 1:].sum())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += float(b["attention_mask"].sum())
    return tokens, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--task", default="multiplication")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res: dict = {"threads": args.threads, "load_avg_start": os.getloadavg()[0]}
    for bf16 in (False, True):
        cfg = load_config(
            args.config,
            [
                *args.overrides,
                f"train.bf16={str(bf16).lower()}",
                f"train.cpus_per_worker={args.threads}",
                "train.checkpoint_every=0",
                "train.log_every=1",
                "train.warmup_steps=1",
                f"train.max_steps={args.steps}",
            ],
        )
        task = get_task(args.task, **cfg.task_options(args.task))
        prompts = make_splits(task, 2000, 10, cfg.seed)["train"].column("prompt").to_pylist()
        _, tok = build_model(cfg.model.preset, cfg.model.max_length)
        stream = ExampleStream(cfg, args.task, "ft", prompts, tok)
        ratios, ours, base = [], [], []
        for _ in range(args.rounds):
            tb, sb = minimal_loop(cfg, stream, args.steps, bf16)
            session = LocalSession()
            config = {
                "cfg": cfg.to_dict(),
                "task": args.task,
                "method": "ft",
                "prompts": prompts,
                "max_steps": args.steps,
            }
            run_training(config, session)
            shutil.rmtree(session.root, ignore_errors=True)
            # Per-step wall time as the loop measures it (example building included,
            # model construction excluded, as in the baseline).
            to = sum(r["tokens_per_s"] * r["step_s"] for r in session.reports)
            so = sum(r["step_s"] for r in session.reports)
            ours.append(to / so)
            base.append(tb / sb)
            ratios.append((to / so) / (tb / sb))
        name = "bf16" if bf16 else "fp32"
        res[f"{name}_tokens_per_s_ours"] = statistics.median(ours)
        res[f"{name}_tokens_per_s_minimal"] = statistics.median(base)
        res[f"{name}_ratio"] = statistics.median(ratios)
    model, _ = build_model(cfg.model.preset, cfg.model.max_length)
    n = count_params(model)
    res["params"] = n
    res["peak_fp32_flops"] = matmul_peak(torch.float32)
    res["peak_bf16_flops"] = matmul_peak(torch.bfloat16)
    flops_per_token = 6 * n  # attention adds < 5% at these lengths and widths
    for name in ("fp32", "bf16"):
        res[f"{name}_mfu"] = (
            res[f"{name}_tokens_per_s_ours"] * flops_per_token / res[f"peak_{name}_flops"]
        )
    res["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
