"""Calibrate the experiment's premise: does a method learn to recognise *synthetic* errors?

python benchmarks/premise_probe.py --task multiplication --method eift --steps 600 \
    [--from-scratch] [--method-set train.weight_decay=1.0 ...] [key=value overrides]

Trains the shared clean base (``train.base_steps`` at ``train.base_lr``, cached under
``--cache``) unless ``--from-scratch``, then the method for ``--steps`` steps with
``selfcorrect.training.train_local`` (the loop Ray Train runs), checkpointing ``--points``
times. At every checkpoint it decodes greedily and reports the premise numbers only:

* synthetic recognition: golden prefix + one fresh synthetic error (the eval's
  ``synthetic`` items), the share whose next line is the recognition line; overall, and
  split by whether the error replaces the trace's last step (``last_step``), by error type,
  and by whether it writes where the correct step would (sudoku: the golden cell, so only
  the digit is wrong; ``same_target``);
* false alarms on clean problems: the share of free generations with a recognition line
  right after a correct step;
* clean accuracy: final-answer accuracy of the free generations;
* recognition without the greedy threshold on the same synthetic items: eval's
  ``discrimination_rate`` against the paired correct step, and the share of errors a
  threshold set at 5% of those correct steps would flag (``ranking``).

Overrides (``key=value``) apply to the base, the method and the items, as in the pipeline;
``--method-set`` applies to the method's fine-tune only (its lr, weight decay, injector mix),
so a lever is compared from the same base on the same items.

It never looks at FT or own errors: those are the experiment's answer, not its calibration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from rayjobs.train import base_config as pipeline_base_config  # noqa: E402
from rayjobs.train import train_hash  # noqa: E402
from selfcorrect.config import INJECTION_KEYS, Config, load_config  # noqa: E402
from selfcorrect.data import make_splits  # noqa: E402
from selfcorrect.evaluate import (  # noqa: E402
    discrimination,
    is_last_step,
    paired_step,
    render_prefix,
    score_after_error,
    score_free_generation,
    state_after,
    synthetic_items,
)
from selfcorrect.generation import generate, step_scores  # noqa: E402
from selfcorrect.harvest import pick_gold  # noqa: E402
from selfcorrect.tasks import get_task, signal_line, step_target  # noqa: E402
from selfcorrect.training import (  # noqa: E402
    MODEL_DIR,
    TORCH_STATE,
    build_training_model,
    train_local,
)


def method_only(key: str) -> bool:
    """What --method-set may change: the fine-tune's training and its task's error injection
    (``INJECTION_KEYS``), not what the base shares with it (seed, data, model, the task's
    problems)."""
    section, _, name = key.partition(".")
    return section == "train" or name in INJECTION_KEYS.get(section, ())


def ranking(model, tok, signal: str, pairs: list[tuple[str, str, str]]) -> dict:
    """Recognition without the greedy threshold, on (prefix, wrong step, paired correct step)
    triples: eval's ``discrimination_rate`` (the share of errors after which the signal is
    likelier than after the right value at the same state; 0.5 on a tie), and the share of
    errors that a threshold on that likelihood would flag if it were set to flag 5% of the
    paired correct steps (what greedy recognition could reach at the premise's false-alarm
    bar, had training put the threshold there)."""
    if not pairs:
        return {"discrimination_rate": float("nan"), "flagged_at_5pct": float("nan"), "n": 0}
    prefixes = [p for p, _, _ in pairs] * 2
    steps = [w for _, w, _ in pairs] + [r for _, _, r in pairs]
    _, logp = step_scores(model, tok, prefixes, steps, signals=[signal] * len(steps))
    wrong, right = logp[: len(pairs)], logp[len(pairs) :]
    ranked, _ = discrimination(pd.DataFrame({"signal_logp": wrong, "paired_signal_logp": right}))
    threshold = torch.quantile(torch.tensor(right), 0.95)
    return {
        "discrimination_rate": float(ranked.mean()),
        "flagged_at_5pct": float((torch.tensor(wrong) > threshold).float().mean()),
        "n": len(pairs),
    }


def premise(
    model,
    tok,
    task,
    test_rows,
    seed: int,
    n: int,
    max_new_tokens: int,
    signal: str,
    weights: dict[str, float] | None = None,
) -> dict:
    """Greedy synthetic recognition, clean false alarms and clean accuracy on ``n`` problems,
    and the ranking of the same synthetic errors against the right value (``ranking``).
    The synthetic items are eval's, drawn with the task's ``error_weights`` (``weights``)."""
    model.eval()
    items = synthetic_items(task, test_rows, seed, n, weights)
    texts = generate(model, tok, [it["prefix"] for it in items], max_new_tokens=48)
    rec = {True: [], False: []}  # by whether the error replaces the trace's last step
    by_type: dict[str, list[bool]] = {}
    same_target: dict[bool, list[bool]] = {True: [], False: []}
    pairs: list[tuple[str, str, str]] = []
    for it, text in zip(items, texts, strict=True):
        problem = task.parse_prompt(it["prompt"])
        state = state_after(task, problem, it["prefix_steps"])
        scored = score_after_error(task, problem, state, it["wrong_step"], text)
        right = paired_step(it["wrong_step"], pick_gold(task, state, it["wrong_step"]))
        if right is not None:
            pairs.append((render_prefix(it["prompt"], it["prefix_steps"]), it["wrong_step"], right))
        rec[bool(is_last_step(task, state))].append(scored["recognized"])
        by_type.setdefault(it["error_type"], []).append(scored["recognized"])
        # Does the error write where the correct step would (sudoku: the golden step's cell)?
        # Then only its value can tell it apart.
        same = step_target(it["wrong_step"]) == step_target(it["gold_step"])
        same_target[same].append(scored["recognized"])
    prompts = [r["prompt"] for r in test_rows[:n]]
    free = generate(model, tok, [p + "\n" for p in prompts], max_new_tokens=max_new_tokens)
    scores = [
        score_free_generation(task, task.parse_prompt(p), t)
        for p, t in zip(prompts, free, strict=True)
    ]
    ranks = ranking(model, tok, signal, pairs)
    model.train()
    return {
        "discrimination_rate": ranks["discrimination_rate"],
        "flagged_at_5pct": ranks["flagged_at_5pct"],
        "discrimination_n": ranks["n"],
        "synthetic_recognition": sum(map(sum, rec.values())) / len(items),
        "synthetic_recognition_earlier": sum(rec[False]) / max(1, len(rec[False])),
        "synthetic_recognition_last_step": sum(rec[True]) / max(1, len(rec[True])),
        "synthetic_recognition_same_target": sum(same_target[True])
        / max(1, len(same_target[True])),
        "synthetic_recognition_other_target": sum(same_target[False])
        / max(1, len(same_target[False])),
        "synthetic_n": {
            "all": len(items),
            "last_step": len(rec[True]),
            "same_target": len(same_target[True]),
        },
        "synthetic_n_by_type": {t: len(v) for t, v in sorted(by_type.items())},
        "synthetic_recognition_by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
        "clean_false_alarm": sum(s["false_alarm"] for s in scores) / len(scores),
        "clean_accuracy": sum(s["correct"] for s in scores) / len(scores),
    }


def base_config(cfg: Config, task_name: str) -> tuple[Config, str]:
    """The pipeline's config for ``task_name``'s clean base (``rayjobs.train.base_config``)
    and its cache name, keyed by the pipeline's ``train_hash`` of that config: an override
    that changes the base gets its own."""
    bcfg = pipeline_base_config(cfg, task_name)
    bcfg = dataclasses.replace(bcfg, train=dataclasses.replace(bcfg.train, checkpoint_every=0))
    digest = train_hash(bcfg, task_name, "base")
    steps = bcfg.train.max_steps
    return bcfg, f"base-{task_name}-{cfg.model.preset}-{steps}-seed{cfg.seed}-{digest}"


def cached_base(cfg: Config, task_name: str, prompts: list[str], cache: str) -> str:
    """The preset's clean base for ``task_name``, trained once and kept under ``cache``."""
    bcfg, name = base_config(cfg, task_name)
    base = os.path.join(cache, name)
    if not os.path.isdir(base):
        steps = bcfg.train.max_steps
        _, session = train_local(bcfg, task_name, "ft", prompts, max_steps=steps)
        tmp = base + ".tmp"
        shutil.copytree(os.path.join(session.latest, MODEL_DIR), tmp)
        os.replace(tmp, base)
        shutil.rmtree(session.root, ignore_errors=True)
    return base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--task", default="multiplication")
    ap.add_argument("--method", default="eift")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--points", type=int, default=3, help="checkpoints evaluated")
    ap.add_argument("--n", type=int, default=200, help="test problems per measurement")
    ap.add_argument("--from-scratch", action="store_true", help="no base: random init")
    ap.add_argument("--cache", default=os.path.join(os.getcwd(), ".probe-cache"))
    ap.add_argument("--out", default=None, help="append a JSON line with the results here")
    ap.add_argument(
        "--method-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for the method's fine-tune only, not the base (e.g. "
        "train.weight_decay=1.0): a lever on the method from the same base",
    )
    ap.add_argument("overrides", nargs="*", help="overrides for the base and the method")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    for kv in args.method_set:
        if not method_only(kv.split("=", 1)[0]):
            ap.error(
                f"--method-set {kv}: only the method's own settings (train.*, and the task's "
                "injector: error_weights, next_cell_share) can differ from the base's; put it "
                "with the overrides to change both"
            )
    method_cfg = load_config(args.config, [*args.overrides, *args.method_set])
    torch.set_num_threads(max(1, cfg.train.cpus_per_worker))
    task = get_task(args.task, **cfg.task_options(args.task))
    splits = make_splits(task, cfg.data.n_train, cfg.data.n_test, cfg.seed)
    prompts = splits["train"].column("prompt").to_pylist()
    test_rows = splits["test"].to_pylist()
    t = cfg.train

    base = None if args.from_scratch else cached_base(cfg, args.task, prompts, args.cache)

    every = max(1, args.steps // args.points)
    # The LR schedule spans train.max_steps: set it, not just the loop's step count.
    mt = method_cfg.train
    mcfg = dataclasses.replace(
        method_cfg, train=dataclasses.replace(mt, checkpoint_every=every, max_steps=args.steps)
    )
    t0 = time.time()
    last, session = train_local(
        mcfg, args.task, args.method, prompts, init_model_path=base, max_steps=args.steps
    )
    train_s = time.time() - t0
    model, tok = build_training_model(cfg, base)
    model.to("cuda" if t.use_gpu else "cpu")  # train.use_gpu=true: train and decode on the GPU
    curve = []
    for d in sorted(Path(session.root).glob("checkpoint_*")):
        state = json.loads((d / "trainer_state.json").read_text())
        model.load_state_dict(
            torch.load(d / TORCH_STATE, weights_only=True, map_location="cpu")["model"]
        )
        point = {"step": state["step"], **state["history"][-1]}
        point.update(
            premise(
                model,
                tok,
                task,
                test_rows,
                cfg.seed,
                args.n,
                128,
                signal_line(args.method),
                cfg.error_weights(args.task),  # eval's items: --method-set leaves them alone
            )
        )
        curve.append(point)
        keys = (
            "synthetic_recognition",
            "synthetic_recognition_earlier",
            "synthetic_recognition_last_step",
            "synthetic_recognition_same_target",
            "discrimination_rate",
            "flagged_at_5pct",
            "clean_false_alarm",
            "clean_accuracy",
        )
        shown = {k: round(point[k], 3) for k in keys}
        dec = {k: round(v, 3) for k, v in point.items() if k.startswith("decision")}
        print(f"[probe] {args.task}/{args.method} step {state['step']}: {shown} {dec}", flush=True)
    res = {
        "task": args.task,
        "method": args.method,
        "from_scratch": args.from_scratch,
        "overrides": args.overrides,
        "method_overrides": args.method_set,
        "steps": args.steps,
        "train_minutes": train_s / 60,
        "seconds_per_step": train_s / args.steps,
        "curve": curve,
    }
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")
    shutil.rmtree(session.root, ignore_errors=True)


if __name__ == "__main__":
    main()
