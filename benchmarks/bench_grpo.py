"""GRPO step time (generation / update split) and rollout tokens/s: ours vs TRL's GRPOTrainer.

Both run in this one process on the same FT model (a nano model fine-tuned for a
few seconds on clean 2-digit x 1-digit multiplication traces), the same
prompts, group size, completion cap, temperature, learning rate, clip and KL
coefficient, one optimizer step per rollout batch, fp32 on CPU. Ours is
``selfcorrect.grpo.grpo_local`` (the loop the Ray job runs on each worker,
ZeRO stage 0 in one process); TRL's is ``trl.GRPOTrainer``. The first step of
each is warm-up and left out.

    .venv/bin/python benchmarks/bench_grpo.py [--steps 6] [--prompts 8] [--group 8]

Prints one JSON line: per-implementation timings per round and median ratios TRL / ours.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from selfcorrect.config import load_config  # noqa: E402
from selfcorrect.data import load_problems, make_splits  # noqa: E402
from selfcorrect.grpo import grpo_local, reward_answer  # noqa: E402
from selfcorrect.loss import LossWeights, collate, encode_example  # noqa: E402
from selfcorrect.models import build_model, load_model, save_model  # noqa: E402
from selfcorrect.tasks import get_task  # noqa: E402
from selfcorrect.traces import clean_example  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick_ft(task, problems, out_dir: str, preset: str, steps: int) -> None:
    """A briefly supervised model: competent enough that sampled groups differ in reward."""
    model, tok = build_model(preset, 160, seed=0)
    enc = [encode_example(tok, clean_example(task, p), LossWeights()) for p in problems]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        b = collate([enc[i] for i in rng.choice(len(enc), 16)], tok.pad_token_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        nll = -logp.gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
        w = b["loss_weight"][:, 1:]
        loss = (nll * w).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(model, tok, out_dir)


def summarise(name: str, steps: list[dict]) -> dict:
    s = steps[1:]  # step 1 is warm-up
    gen = float(np.mean([x["generation_s"] for x in s]))
    upd = float(np.mean([x["update_s"] for x in s]))
    tot = float(np.mean([x["step_s"] for x in s]))
    toks = float(np.mean([x["tokens"] for x in s]))
    return {
        "impl": name,
        "steps_timed": len(s),
        "step_s": round(tot, 3),
        "generation_s": round(gen, 3),
        "update_s": round(upd, 3),
        "other_s": round(tot - gen - upd, 3),
        "rollout_tokens_per_s": round(toks / gen, 1),
        "completion_tokens_per_step": round(toks, 1),
        "reward_mean": round(float(np.mean([x["reward"] for x in s])), 3),
    }


def bench_ours(cfg, task_name, prompts, ft_dir) -> dict:
    m, session = grpo_local(cfg, task_name, prompts, ft_dir)
    steps = [
        {
            "generation_s": r["generation_s"],
            "update_s": r["update_s"],
            "step_s": r["step_s"],
            "tokens": r["completion_tokens"] * cfg.grpo.prompts_per_step * cfg.grpo.group_size,
            "reward": r["reward_mean"],
        }
        for r in session.reports
    ]
    return summarise("selfcorrect", steps)


def bench_trl(cfg, task, task_name, prompts, ft_dir, out_dir) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    g = cfg.grpo
    model, tok = load_model(ft_dir)
    problems = {p: task.parse_prompt(p) for p in prompts}

    def answer_reward(prompts, completions, **_):
        return [
            reward_answer(task, problems[p.rstrip("\n")], c)
            for p, c in zip(prompts, completions, strict=True)
        ]

    n = g.prompts_per_step * g.group_size
    args = GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=g.group_size,
        max_completion_length=g.max_new_tokens,
        temperature=g.temperature,
        top_k=0,
        learning_rate=g.lr,
        lr_scheduler_type="constant",
        weight_decay=g.weight_decay,
        beta=g.kl_coef,
        epsilon=g.clip,
        num_iterations=1,
        loss_type="grpo",
        max_steps=g.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=cfg.seed,
        disable_tqdm=True,
    )
    ds = Dataset.from_dict({"prompt": [p + "\n" for p in prompts]})
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[answer_reward],
        args=args,
        train_dataset=ds,
        processing_class=tok,
    )
    rows: list[dict] = []
    cur: dict = {}
    gen_fn = trainer._generate_and_score_completions

    def timed_gen(*a, **kw):
        t = time.perf_counter()
        out = gen_fn(*a, **kw)
        cur["generation_s"] = time.perf_counter() - t
        cur["tokens"] = float(out["completion_mask"].sum())
        return out

    trainer._generate_and_score_completions = timed_gen

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            cur.clear()
            cur["t0"] = time.perf_counter()

        def on_step_end(self, *a, **kw):
            cur["step_s"] = time.perf_counter() - cur["t0"]
            cur["update_s"] = cur["step_s"] - cur["generation_s"]

        def on_log(self, _args, _state, _control, logs=None, **kw):
            if logs and "reward" in logs and "step_s" in cur:
                rows.append({**cur, "reward": logs["reward"]})

    trainer.add_callback(Timer())
    trainer.train()
    return summarise("trl.GRPOTrainer", rows)


def run(
    steps: int = 6,
    prompts: int = 8,
    group: int = 8,
    max_new_tokens: int = 48,
    preset: str = "nano",
    ft_steps: int = 200,
    threads: int = 2,
    rounds: int = 1,
) -> dict[str, Any]:
    """Step time and its split for both implementations; TRL / ours ratios (median of rounds).

    Rounds alternate which implementation goes first, so background load hits both alike.
    """
    torch.set_num_threads(threads)
    task_name = "multiplication"
    cfg = load_config(
        os.path.join(REPO, "configs", "smoke.yaml"),
        [
            f"tasks=[{task_name}]",
            "multiplication.digits_b=1",
            f"grpo.steps={steps}",
            f"grpo.prompts_per_step={prompts}",
            f"grpo.group_size={group}",
            f"grpo.max_new_tokens={max_new_tokens}",
            "grpo.eval_problems=0",
            "train.zero_stage=0",
            f"train.cpus_per_worker={threads}",
        ],
    )
    task = get_task(task_name, **cfg.task_options(task_name))
    train = make_splits(task, 60, 16, cfg.seed)["train"]
    prompt_list = train.column("prompt").to_pylist()
    res: dict[str, Any] = {
        "preset": preset,
        "prompts": prompts,
        "group": group,
        "max_new_tokens": max_new_tokens,
        "steps_timed": steps - 1,
        "threads": threads,
        "rounds": rounds,
        "ours": [],
        "trl": [],
    }
    with tempfile.TemporaryDirectory() as d:
        ft_dir = os.path.join(d, "ft")
        quick_ft(task, load_problems(task, train), ft_dir, preset, ft_steps)
        for r in range(rounds):
            for side in ("ours", "trl") if r % 2 == 0 else ("trl", "ours"):
                torch.set_num_threads(threads)
                if side == "ours":
                    res["ours"].append(bench_ours(cfg, task_name, prompt_list, ft_dir))
                else:
                    out = os.path.join(d, f"trl{r}")
                    res["trl"].append(bench_trl(cfg, task, task_name, prompt_list, ft_dir, out))

    def ratio(key: str, inverse: bool = False) -> float:
        vals = [
            (o[key] / t[key]) if inverse else (t[key] / o[key])
            for o, t in zip(res["ours"], res["trl"], strict=True)
        ]
        return round(statistics.median(vals), 3)

    res["step_time_trl_over_ours"] = ratio("step_s")
    res["generation_time_trl_over_ours"] = ratio("generation_s")
    res["update_time_trl_over_ours"] = ratio("update_s")
    res["rollout_tokens_per_s_ours_over_trl"] = ratio("rollout_tokens_per_s", inverse=True)
    for side in ("ours", "trl"):
        res[f"{side}_median"] = {
            k: statistics.median(x[k] for x in res[side])
            for k in ("step_s", "generation_s", "update_s", "other_s", "rollout_tokens_per_s")
        }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--ft-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    res = run(
        args.steps,
        args.prompts,
        args.group,
        args.max_new_tokens,
        args.preset,
        args.ft_steps,
        args.threads,
        args.rounds,
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
