"""Calibrate the `tiny` preset: train FT in-process and measure greedy final-answer accuracy.

python benchmarks/tiny_accuracy.py --task multiplication [key=value overrides]

Trains with ``selfcorrect.training.train_local`` (the same loop Ray Train runs),
checkpointing every ``train.checkpoint_every`` steps, then decodes the test
split greedily from each checkpoint (``selfcorrect.generation.generate``) so one
run gives the accuracy-vs-steps curve and the wall-clock per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from selfcorrect.config import load_config  # noqa: E402
from selfcorrect.data import make_splits  # noqa: E402
from selfcorrect.generation import generate  # noqa: E402
from selfcorrect.tasks import final_answer_correct, get_task  # noqa: E402
from selfcorrect.training import TORCH_STATE, build_training_model, train_local  # noqa: E402


def accuracy(model, tok, task, prompts: list[str], max_new_tokens: int) -> tuple[float, int]:
    """Greedy final-answer accuracy and the number of wrong final answers."""
    texts = generate(model, tok, [p + "\n" for p in prompts], max_new_tokens=max_new_tokens)
    ok = [
        final_answer_correct(task, task.parse_prompt(p), t)
        for p, t in zip(prompts, texts, strict=True)
    ]
    return sum(ok) / len(ok), len(ok) - sum(ok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--task", default="multiplication")
    ap.add_argument("--method", default="ft")
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--out", default=None, help="append a JSON line with the results here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    task = get_task(args.task, **cfg.task_options(args.task))
    splits = make_splits(task, cfg.data.n_train, cfg.data.n_test, cfg.seed)
    prompts = splits["train"].column("prompt").to_pylist()
    test = splits["test"].column("prompt").to_pylist()[: args.n_test]
    t0 = time.time()
    last, session = train_local(cfg, args.task, args.method, prompts)
    train_s = time.time() - t0
    curve = []
    model, tok = build_training_model(cfg)
    for d in sorted(Path(session.root).glob("checkpoint_*")):
        state = json.loads((d / "trainer_state.json").read_text())
        sd = torch.load(d / TORCH_STATE, weights_only=True)["model"]
        model.load_state_dict(sd)
        acc, wrong = accuracy(model, tok, task, test, cfg.eval.max_new_tokens)
        curve.append({"step": state["step"], "accuracy": acc, "wrong": wrong})
        print(f"[tiny] {args.task} step {state['step']}: accuracy {acc:.3f} ({wrong} wrong)")
    res = {
        "task": args.task,
        "overrides": args.overrides,
        "train_minutes": train_s / 60,
        "seconds_per_step": train_s / cfg.train.max_steps,
        "tokens_per_s": last.get("tokens_per_s"),
        "final_loss": last.get("loss"),
        "curve": curve,
        "load_avg": os.getloadavg()[0],
    }
    print(json.dumps(res))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
