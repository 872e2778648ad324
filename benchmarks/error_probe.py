"""What a model already knows about a wrong step, before any method trains it to say so.

python benchmarks/error_probe.py --task sudoku [--model DIR] [--n 1000] [key=value overrides]

EIFT asks the model to decide, at the newline that ends a step, whether to write the
recognition line. This probe asks whether that decision is already within reach of the model
(by default the preset's clean base, the model every method starts from, cached like
``premise_probe.py``'s). For ``--n`` training problems it takes the golden trace up to a
random step and builds pairs at that state: the correct golden step against one synthetic
wrong step of each error type (the injector's own draw). For each error type it reports:

* ``surprise``: how well the model's own next-token probabilities tell the wrong step from
  the correct one (``generation.step_surprise``, which eval records for every wrong step as
  ``wrong_step_surprise``: minus the lowest log-probability among the step's tokens): ROC AUC, and the
  share of wrong steps flagged at a threshold that flags 5% of correct steps. High means the
  model would not have written that step: the information is in its predictions.
* ``line_end``: test accuracy (chance 0.5) of a logistic regression on the hidden states at
  the step line's end (its last character and the newline after it, where EIFT's decision
  is made), per layer, fit on 70% of the problems. High means the
  decision EIFT trains is a linear read-out of what the model already computes there.

Sudoku errors are also split by whether they are written in the golden step's cell (only the
digit is wrong), the errors the model's own mistakes resemble. Like ``premise_probe.py`` it
uses synthetic errors only: own and FT errors are the experiment's answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.premise_probe import cached_base  # noqa: E402
from selfcorrect.config import load_config  # noqa: E402
from selfcorrect.data import make_splits, stream_rng  # noqa: E402
from selfcorrect.evaluate import render_prefix  # noqa: E402
from selfcorrect.generation import step_surprise  # noqa: E402
from selfcorrect.tasks import get_task  # noqa: E402
from selfcorrect.tasks.base import Task  # noqa: E402
from selfcorrect.tokenizer import frame_text  # noqa: E402
from selfcorrect.training import build_training_model  # noqa: E402

SAME_TARGET = "same_target"  # group: wrong steps written where the golden step writes


def step_pairs(task: Task, prompts: list[str], seed: int) -> list[dict[str, Any]]:
    """(text, label, problem, group) rows: per problem, the correct golden step at one random
    state (label 0, once per group) and one wrong step of each error type there (label 1)."""
    rows = []
    for pi, prompt in enumerate(prompts):
        problem = task.parse_prompt(prompt)
        golden = task.golden_steps(problem)
        rng = stream_rng(seed, task.name, "error-probe", str(pi))
        i = int(rng.integers(len(golden)))
        state = task.initial_state(problem)
        for step in golden[:i]:
            state = task.apply_step(state, step)
        prefix = render_prefix(prompt, golden[:i])
        dists = task.type_distributions(state)
        for etype in task.error_types:
            if not dists.get(etype):
                continue
            wrong = task.sample_error_of_type(state, etype, rng)
            groups = [etype]
            if wrong.split("=")[0] == golden[i].split("=")[0]:
                groups.append(SAME_TARGET)
            for g in groups:
                for step, label in ((golden[i], 0), (wrong, 1)):
                    rows.append(
                        {
                            "prefix": prefix,
                            "step": step,
                            "text": prefix + step + "\n",
                            "label": label,
                            "problem": pi,
                            "group": g,
                        }
                    )
    return rows


@torch.no_grad()
def line_end_states(model, tok, texts: list[str]) -> np.ndarray:
    """Per text (a prefix, a step and its newline): the hidden states at the step line's end,
    its last character and the newline, every layer: [n, layers + 1, 2 * hidden]."""
    model.eval()
    feats = []
    for text in texts:
        ids = tok(frame_text(tok, text), add_special_tokens=False)["input_ids"]
        out = model(torch.tensor([ids]), output_hidden_states=True)
        ends = [torch.cat([h[0, -2], h[0, -1]]) for h in out.hidden_states]
        feats.append(torch.stack(ends).float().numpy())
    return np.stack(feats)


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a random positive > a random negative), ties counting half."""
    gt = (pos[:, None] > neg[None, :]).mean()
    eq = (pos[:, None] == neg[None, :]).mean()
    return float(gt + 0.5 * eq)


def recall_at_false_alarm(pos: np.ndarray, neg: np.ndarray, rate: float = 0.05) -> float:
    """Share of positives above the threshold that flags ``rate`` of the negatives."""
    return float((pos > np.quantile(neg, 1 - rate)).mean())


def linear_probe_accuracy(
    x: np.ndarray, y: np.ndarray, problems: np.ndarray, train_share: float = 0.7
) -> float:
    """Held-out accuracy of an L2 logistic regression; train/test split by problem, so both
    rows of a pair land on the same side."""
    ids = np.unique(problems)
    train = np.isin(problems, ids[: int(train_share * len(ids))])
    xt = torch.tensor(x, dtype=torch.float32)
    mu, sd = xt[train].mean(0), xt[train].std(0) + 1e-6
    xt = (xt - mu) / sd
    yt = torch.tensor(y, dtype=torch.float32)
    tr = torch.tensor(train)
    w = torch.zeros(xt.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        logits = xt[tr] @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt[tr])
        loss = loss + 1e-3 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (xt[~tr] @ w + b) > 0
    return float((pred == yt[~tr].bool()).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--task", default="multiplication")
    ap.add_argument("--model", default=None, help="a saved model (default: the cached base)")
    ap.add_argument("--n", type=int, default=1000, help="training problems (one state each)")
    ap.add_argument("--cache", default=os.path.join(os.getcwd(), ".probe-cache"))
    ap.add_argument("--out", default=None, help="append a JSON line with the results here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(max(1, cfg.train.cpus_per_worker))
    task = get_task(args.task, **cfg.task_options(args.task))
    prompts = make_splits(task, cfg.data.n_train, cfg.data.n_test, cfg.seed)["train"]
    prompts = prompts.column("prompt").to_pylist()
    model_path = args.model or cached_base(cfg, args.task, prompts, args.cache)
    model, tok = build_training_model(cfg, model_path)

    rows = step_pairs(task, prompts[: args.n], cfg.seed)
    texts = sorted({r["text"] for r in rows})  # a correct step serves several groups
    at = {t: i for i, t in enumerate(texts)}
    idx = np.array([at[r["text"]] for r in rows])
    feats = line_end_states(model, tok, texts)[idx]
    first = {r["text"]: r for r in rows}
    surprise = np.array(
        step_surprise(
            model, tok, [first[t]["prefix"] for t in texts], [first[t]["step"] for t in texts]
        )
    )[idx]
    labels = np.array([r["label"] for r in rows])
    problems = np.array([r["problem"] for r in rows])
    groups = np.array([r["group"] for r in rows])
    result: dict[str, Any] = {
        "task": args.task,
        "model": "base" if args.model is None else os.path.basename(args.model.rstrip("/")),
        "overrides": args.overrides,
        "by_group": {},
    }
    for g in [*task.error_types, SAME_TARGET]:
        m = groups == g
        if m.sum() < 20:
            continue
        pos, neg = surprise[m & (labels == 1)], surprise[m & (labels == 0)]
        line_end = [
            linear_probe_accuracy(feats[m, layer], labels[m], problems[m])
            for layer in range(feats.shape[1])
        ]
        result["by_group"][g] = {
            "n_pairs": int((m & (labels == 1)).sum()),
            "surprise_auc": roc_auc(pos, neg),
            "surprise_recall_at_5pct": recall_at_false_alarm(pos, neg),
            "line_end_accuracy_by_layer": line_end,
            "line_end_accuracy_best": max(line_end),
        }
        r = result["by_group"][g]
        print(
            f"[error-probe] {args.task} {g}: {r['n_pairs']} pairs, surprise AUC "
            f"{r['surprise_auc']:.3f} (recall {r['surprise_recall_at_5pct']:.2f} at 5% of "
            f"correct steps), line-end linear probe {r['line_end_accuracy_best']:.2f} "
            f"(chance 0.50)",
            flush=True,
        )
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
