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
    text = _quick_run(tmp_path, "coverage,pipeline", 120, "--tiny-run", str(tmp_path / "no-run"))
    assert "**Machine:**" in text and "torch" in text and "load average" in text
    assert "| task | reference samples/s | vectorised samples/s | vectorised / reference" in text
    assert "| multiplication |" in text and "| sudoku |" in text
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

    out = tmp_path / "probe.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
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
        "train.base_steps=4",
        "train.error_placement=step",
        "train.last_step_rate=0.5",
    ]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=600, capture_output=True)
    (res,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["step"] for p in res["curve"]] == [2, 4]
    for p in res["curve"]:
        n = p["synthetic_n"]
        assert n["all"] == 8 == sum(p["synthetic_n_by_type"].values())
        assert 0 <= n["last_step"] <= 8 and 0 <= n["same_target"] <= 8
        assert 0 <= p["synthetic_recognition"] <= 1 and 0 <= p["clean_accuracy"] <= 1
        assert set(p["synthetic_recognition_by_type"]) <= {"invalid", "non_naked_single"}
    assert any((tmp_path / "cache").iterdir())  # the base is cached for the next probe
