"""``python -m benchmarks`` end to end on its cheapest subset (no timing assertions)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _quick_run(tmp_path: Path, only: str, timeout: int, *extra: str) -> str:
    """``python -m benchmarks --quick --only <only>``; returns the BENCHMARKS.md it wrote."""
    out = tmp_path / "BENCHMARKS.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--only", only, "--out", str(out)]
    subprocess.run(
        [*cmd, *extra], cwd=REPO, env=env, check=True, timeout=timeout, capture_output=True
    )
    return out.read_text()


def test_runner_writes_machine_line_and_ratio_table(tmp_path: Path) -> None:
    text = _quick_run(
        tmp_path, "coverage,examples,pipeline", 180, "--tiny-run", str(tmp_path / "no-run")
    )
    assert "**Machine:**" in text and "torch" in text and "load average" in text
    assert "| task | reference samples/s | vectorised samples/s | vectorised / reference" in text
    assert "| multiplication |" in text and "| sudoku |" in text
    assert "| multiplication | eift |" in text and "| token loss weights/s, sudoku eift |" in text
    assert "| training batches built/s, multiplication eift |" in text  # own applicable types
    assert "| training batches built/s, sudoku eift |" not in text  # no shortcut to compare
    assert "Not measured in this run" in text  # no tiny run manifest given
    assert "## Notes" in text  # hand-written notes appended


def test_compile_benchmark_runs_and_renders(tmp_path: Path) -> None:
    """The compile benchmark on the nano model: both sides, the compile-cost processes and
    the end-to-end loop run, and the section and summary rows render."""
    text = _quick_run(tmp_path, "compile", 900)
    assert "## Compiled training (`train.compile`)" in text
    assert "| `torch.compile` |" in text and "in a fresh process (empty Inductor cache)" in text
    assert "| training tokens/s, compiled, same batches | eager |" in text


def test_pipeline_section_reads_manifest(tmp_path: Path) -> None:
    import json

    from benchmarks.__main__ import md_pipeline
    from benchmarks.pipeline_times import run

    m = {
        "stages": {
            "multiplication/base": {
                "status": "done",
                "seconds": 549.0,
                "startup_s": 49.0,
                "compute_s": 400.0,
            },
            "multiplication/data": {"status": "done", "seconds": 3.0},
        },
        "pipeline": {"steps": {"ft": 952.0}, "total_seconds": 1800.0, "finished": 0},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    r = run(str(tmp_path))
    assert r["found"] and r["stages"]["multiplication/base"]["seconds"] == 549.0
    text = "\n".join(md_pipeline(r))
    assert "| ft | 952.0 |" in text
    assert "| multiplication/base | 549.0 | 49.0 | 400.0 | done |" in text
    assert "| multiplication/data | 3.0 | - | - | done |" in text
    assert "549 s of stage time, of which 400 s (73%) optimizer steps and 49 s (9%)" in text


def test_gpu_check_throughput_part_runs_on_cpu(tmp_path: Path) -> None:
    """scripts/gpu_check.py's measuring half, on the CPU at nano size (the pipeline half is
    the paper path the integration tier runs on CPU workers)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--skip-pipeline"]
    cmd += ["--preset", "nano", "--batch", "2", "--seq", "32", "--steps", "1"]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path)], cwd=REPO, env=env, timeout=300, capture_output=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| tokens/s | step s | MFU |" in text and "preset `nano`" in text


def test_premise_probe_writes_its_curve(tmp_path: Path) -> None:
    """The calibration probe end to end on the smoke preset: base, method, greedy premise
    numbers at every checkpoint, every synthetic item counted in exactly one split."""
    import json

    from benchmarks.premise_probe import base_config
    from selfcorrect.config import load_config

    out = tmp_path / "probe.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    overrides = ["train.base_steps=4", "train.error_placement=step", "train.last_step_rate=0.5"]
    cmd = [
        sys.executable,
        "benchmarks/premise_probe.py",
        "--config",
        "configs/smoke.yaml",
        "--task",
        "sudoku",
        "--steps",
        "4",
        "--points",
        "2",
        "--n",
        "8",
        "--cache",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        "--method-set",
        "train.weight_decay=0.5",
        *overrides,
    ]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=600, capture_output=True)
    (res,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert res["method_overrides"] == ["train.weight_decay=0.5"]
    assert [p["step"] for p in res["curve"]] == [2, 4]
    for p in res["curve"]:
        n = p["synthetic_n"]
        assert n["all"] == 8 == sum(p["synthetic_n_by_type"].values())
        assert 0 <= n["last_step"] <= 8 and 0 <= n["same_target"] <= 8
        assert 0 <= p["synthetic_recognition"] <= 1 and 0 <= p["clean_accuracy"] <= 1
        assert set(p["synthetic_recognition_by_type"]) <= {"invalid", "non_naked_single"}
    # The base is cached for the next probe, under the name of the base's own config.
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [
        base_config(load_config("configs/smoke.yaml", overrides), "sudoku")[1]
    ]


def test_premise_probe_keys_the_base_by_what_decides_it() -> None:
    """A method-only lever (its steps, its lr) reuses the cached base; a setting the base
    trains with (weight decay, seed, model) gets a base of its own; --method-set refuses keys the
    base shares with the method."""
    from benchmarks.premise_probe import base_config
    from selfcorrect.config import load_config

    def name(*overrides: str) -> str:
        return base_config(load_config("configs/tiny.yaml", list(overrides)), "sudoku")[1]

    base = name()
    assert name("train.max_steps=1250", "train.lr=3e-3") == base
    assert name("train.max_steps_by_task={sudoku: 2000}") == base
    # the injector never reaches the clean base (config.INJECTION_KEYS)
    assert name("sudoku.next_cell_share=1", "train.injection_rate=0.5") == base
    for other in ("train.weight_decay=1.0", "seed=1", "model.preset=small", "train.base_lr=2e-3"):
        assert name(other) != base, other
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for kv in ("model.preset=small", "multiplication.digits_a=3"):
        cmd = [sys.executable, "benchmarks/premise_probe.py", "--method-set", kv]
        proc = subprocess.run(cmd, cwd=REPO, env=env, timeout=120, capture_output=True, text=True)
        assert proc.returncode == 2 and "only the method's own settings" in proc.stderr, kv


def test_error_probe_statistics_on_known_inputs() -> None:
    """AUC and recall on textbook cases; the linear probe finds a planted signal and not
    noise."""
    import numpy as np

    from benchmarks.error_probe import linear_probe_accuracy, recall_at_false_alarm, roc_auc

    assert roc_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert roc_auc(np.array([1.0, 3.0]), np.array([2.0])) == 0.5
    assert roc_auc(np.array([2.0]), np.array([2.0])) == 0.5  # a tie counts half
    neg = np.arange(100, dtype=float)  # threshold at the 95th percentile: 94.05
    assert recall_at_false_alarm(np.array([10.0, 94.0, 95.0, 200.0]), neg) == 0.5

    rng = np.random.default_rng(0)
    n = 600
    y = np.tile([0, 1], n // 2)
    problems = np.repeat(np.arange(n // 2), 2)  # a pair per problem, as the probe builds
    noise = rng.normal(size=(n, 16))
    planted = noise.copy()
    planted[:, 3] += 3.0 * y
    assert linear_probe_accuracy(planted, y, problems) > 0.9
    assert 0.35 < linear_probe_accuracy(noise, y, problems) < 0.65


def test_error_probe_pairs_a_correct_step_with_wrong_ones() -> None:
    """Each problem gives one state: its golden step (label 0) and one wrong step per
    applicable error type (label 1), the same-target group only where the wrong step writes
    where the golden one does."""
    from benchmarks.error_probe import SAME_TARGET, step_pairs
    from selfcorrect.data import make_splits
    from selfcorrect.evaluate import state_after
    from selfcorrect.tasks import get_task, split_lines

    for name in ("multiplication", "sudoku"):
        task = get_task(name)
        prompts = make_splits(task, 30, 5, 0)["train"].column("prompt").to_pylist()
        rows = step_pairs(task, prompts, seed=0)
        assert rows == step_pairs(task, prompts, seed=0)  # seeded
        assert {r["problem"] for r in rows} == set(range(len(prompts)))
        for r in rows:
            lines = split_lines(r["text"])
            problem = task.parse_prompt(lines[0])
            state = state_after(task, problem, lines[1:-1])
            assert task.check_step(state, lines[-1]) == (r["label"] == 0)
            assert r["text"] == r["prefix"] + r["step"] + "\n"
            assert r["group"] in (*task.error_types, SAME_TARGET)
        for g in {r["group"] for r in rows}:
            labels = [r["label"] for r in rows if r["group"] == g]
            assert labels.count(0) == labels.count(1)
        same = [r for r in rows if r["group"] == SAME_TARGET]
        for wrong, right in zip(same[1::2], same[0::2], strict=True):
            target = split_lines(right["text"])[-1].split("=")[0]
            assert split_lines(wrong["text"])[-1].split("=")[0] == target
        if name == "multiplication":  # every error type keeps the golden left-hand side
            assert len(same) == sum(r["group"] != SAME_TARGET for r in rows)


def test_error_probe_runs_end_to_end(tmp_path: Path) -> None:
    """The probe on the smoke preset: a result per error type with numbers in range."""
    import json

    out = tmp_path / "probe.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [
        sys.executable,
        "benchmarks/error_probe.py",
        "--config",
        "configs/smoke.yaml",
        "--task",
        "multiplication",
        "--n",
        "40",
        "--cache",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        "train.base_steps=2",
    ]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=600, capture_output=True)
    (res,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert res["task"] == "multiplication" and res["model"] == "base"
    assert "same_target" in res["by_group"] and len(res["by_group"]) >= 3
    for r in res["by_group"].values():
        assert r["n_pairs"] >= 10
        assert 0 <= r["surprise_auc"] <= 1 and 0 <= r["surprise_recall_at_5pct"] <= 1
        assert all(0 <= a <= 1 for a in r["line_end_accuracy_by_layer"])


def test_compile_pipeline_layout_renders_its_three_sides() -> None:
    """``--pipeline-layout`` results become a table: eager, static and dynamic compile, each
    with its compiling first pass and its ratio to eager."""
    sys.path.insert(0, str(REPO))
    from benchmarks.__main__ import md_compile

    side = {"eager": 3672.0, "static": 4321.0, "dynamic": 3464.0}
    r = {
        "config": "configs/tiny.yaml",
        "task": "sudoku",
        "method": "eift",
        "threads": 2,
        "steps": 20,
        "rounds": 2,
        "steady": {
            "bf16": True,
            "pad_to": 32,
            "shapes": [[32, 256]],
            "tokens_per_s": {"eager": 1.0, "compiled": 1.35},
            "rates": {"eager": [1.0], "compiled": [1.35]},
            "compiled_over_eager": 1.35,
        },
        "compile_cost": {
            "fresh_process_s": 60.0,
            "warm_cache_process_s": 5.0,
            "eager_process_s": 3.0,
        },
        "end_to_end": {"micro_batch_size": 8, "steps_per_s": {}, "compiled_over_eager": 0.09},
        "pipeline_layout": {
            "micro_batch_size": 8,
            "micro_batches": 80,
            "static_shapes": 6,
            "tokens_per_s": side,
            "rates": {k: [v] for k, v in side.items()},
            "first_pass_s": {"eager": 25.3, "static": 172.4, "dynamic": 83.7},
            "static_over_eager": 4321 / 3672,
            "dynamic_over_eager": 3464 / 3672,
        },
    }
    text = "\n".join(md_compile(r))
    assert "Pipeline layout (`--pipeline-layout`)" in text and "6 static shapes" in text
    assert "| `torch.compile`, static shapes | 172 | 4,321 | **1.18x** |" in text
    assert "| `torch.compile(dynamic=True)` | 84 | 3,464 | **0.94x** |" in text
