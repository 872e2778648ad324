"""Before a cluster run: prove the paper path on the GPUs of one machine, then measure them.

    .venv/bin/python scripts/gpu_check.py                 # all GPUs of this machine
    .venv/bin/python scripts/gpu_check.py --gpus 2 --out runs/gpu-check

1. The paper path at toy size: ``paper-multiplication`` on a local Qwen2-architecture stand-in
   (``selfcorrect.standin``; nothing downloaded), every stage, with NCCL between the Ray Train
   workers, bf16 and DeepSpeed ZeRO-2, then again with ZeRO-3 and LoRA. A failure here costs
   minutes, not a cluster's hours.
2. Training throughput of a ~0.5B Qwen2-architecture model (random init, the ``0.5b``
   preset): bf16 autocast, AdamW, fixed batch; tokens/s and MFU against the bf16 matmul peak
   measured on the same GPU.

Prints a Markdown summary (paste it into BENCHMARKS.md) and writes it to ``<out>/gpu_check.md``.
``--device cpu --skip-pipeline`` runs step 2 on the CPU (what the test suite does, tiny).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from selfcorrect.models import PRESETS, build_model, count_params  # noqa: E402


def pipeline_case(out: Path, standin: str, gpus: int, zero: int, lora: bool) -> tuple[str, float]:
    """Run the toy paper pipeline as the README's main command does; returns (status, seconds)."""
    from selfcorrect.standin import toy_overrides

    run = out / f"paper-toy-zero{zero}{'-lora' if lora else ''}"
    cmd = [
        sys.executable,
        "-m",
        "rayjobs.pipeline",
        "--config",
        str(REPO / "configs" / "paper-multiplication.yaml"),
        "--output-dir",
        str(run),
        "--overwrite",
        *toy_overrides(standin, lora=lora, gpus=gpus),
        "train.bf16=true",
        f"train.zero_stage={zero}",
    ]
    t0 = time.time()
    log = run.with_suffix(".log")
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    status = "ok" if rc == 0 else f"FAILED (exit {rc}; see {log.name})"
    return status, time.time() - t0


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 20) -> float:
    """Best-of-3 dense n x n matmul FLOP/s on ``device``: the MFU denominator, measured."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(3):
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(
    device: torch.device, preset: str, batch: int, seq: int, steps: int
) -> dict[str, float]:
    """Tokens/s and MFU of a bf16-autocast training step (forward, backward, AdamW)."""
    model, _ = build_model(preset, max_length=seq)
    model.to(device).train()
    vocab = model.config.vocab_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernels
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    secs = (time.perf_counter() - t) / steps
    n = count_params(model)
    cfg = model.config
    # 6N per token for the dense weights + causal attention (QK^T and AV, fwd+bwd).
    flops_token = 6 * n + 6 * cfg.num_hidden_layers * cfg.hidden_size * seq
    tokens_s = batch * seq / secs
    peak = matmul_peak(device, torch.bfloat16, n=8192 if device.type == "cuda" else 512)
    return {
        "params": n,
        "tokens_per_s": tokens_s,
        "step_s": secs,
        "mfu": flops_token * tokens_s / peak,
        "peak_tflops": peak / 1e12,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gpus", type=int, default=0, help="GPUs for the pipeline (0 = all, max 2)")
    ap.add_argument("--out", default="runs/gpu-check")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--preset", default="0.5b", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU answers (torch.cuda.is_available() is False): run on a GPU node")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# GPU check", ""]
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.machine()
    lines += [f"Machine: {name}; torch {torch.__version__}.", ""]

    if not args.skip_pipeline:
        from selfcorrect.standin import make_standin

        gpus = args.gpus or min(torch.cuda.device_count(), 2)
        standin = make_standin(str(out / "standin-qwen2"), "qwen2")
        lines += [
            f"## Paper path at toy size ({gpus} GPU workers, NCCL, bf16)",
            "",
            "| case | result | seconds |",
            "| --- | --- | --- |",
        ]
        for zero, lora in ((2, False), (3, False), (2, True)):
            status, secs = pipeline_case(out, standin, gpus, zero, lora)
            lines.append(f"| ZeRO-{zero}{' + LoRA' if lora else ''} | {status} | {secs:.0f} |")
        lines.append("")

    r = throughput(device, args.preset, args.batch, args.seq, args.steps)
    lines += [
        f"## Training throughput, preset `{args.preset}` ({r['params'] / 1e6:.0f}M params, "
        f"bf16 autocast, batch {args.batch} x {args.seq})",
        "",
        "| tokens/s | step s | MFU | measured bf16 matmul peak |",
        "| --- | --- | --- | --- |",
        f"| {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {100 * r['mfu']:.1f}% | "
        f"{r['peak_tflops']:.1f} TFLOP/s |",
        "",
    ]
    text = "\n".join(lines)
    (out / "gpu_check.md").write_text(text)
    print(text)
    if "FAILED" in text:
        sys.exit(1)


if __name__ == "__main__":
    main()
