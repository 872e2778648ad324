"""Every job ends bad input with one line naming the problem and the fix, and exit code 2."""

from __future__ import annotations

import importlib
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "configs", "smoke.yaml")
JOBS = ["data", "train", "harvest", "coverage", "grpo", "evaluate", "tune", "report", "pipeline"]
# The jobs that read an earlier stage's output, and the stage they name as the fix.
NEEDS_INPUT = {
    "train": "data",
    "harvest": "train",
    "coverage": "harvest",
    "grpo": "train",
    "evaluate": "train",
    "tune": "data",
}


def _one_line_exit_2(capsys, job: str, argv: list[str]) -> str:
    module = importlib.import_module(f"rayjobs.{job}")
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    assert exc.value.code == 2, f"rayjobs.{job} exited {exc.value.code}"
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("job", JOBS)
def test_a_misspelled_key_exits_2_with_one_line(job, tmp_path, capsys):
    argv = ["--config", SMOKE, "--output-dir", str(tmp_path / "run"), "train.lrr=1e-3"]
    if job == "report":
        (tmp_path / "run").mkdir()
    err = _one_line_exit_2(capsys, job, argv)
    assert "train.lrr" in err and "did you mean 'train.lr'" in err


@pytest.mark.integration
@pytest.mark.parametrize("job", sorted(NEEDS_INPUT))
def test_a_missing_input_exits_2_with_one_line_naming_the_stage(job, tmp_path, capsys, ray_session):
    argv = ["--config", SMOKE, "--output-dir", str(tmp_path / "run")]
    err = _one_line_exit_2(capsys, job, argv)
    assert "rayjobs." in err or "run the" in err or NEEDS_INPUT[job] in err, err
