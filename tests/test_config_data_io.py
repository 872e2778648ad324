"""Config loading/validation, dataset determinism and disjointness, atomic I/O."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from selfcorrect import io
from selfcorrect.config import ConfigError, describe, load_config, parse_override
from selfcorrect.data import DATA_COLUMNS, make_splits
from selfcorrect.tasks import get_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_overrides_are_typed():
    cfg = load_config(
        None, ["train.lr=3e-4", "train.max_steps=7", "tasks=[sudoku]", "train.bf16=true"]
    )
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.max_steps == 7
    assert cfg.tasks == ["sudoku"] and cfg.train.bf16 is True
    assert parse_override("model.path=null") == ("model.path", None)


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.lrr=1", "did you mean 'train.lr'"),
        ("trian.lr=1", "did you mean 'train'"),
        ("train.lr=abc", "expected a number"),
        ("train.max_steps=1.5", "expected an integer"),
        ("train.injection_rate=1.5", "train.injection_rate"),
        ("train.mistake_loss=foo", "mask or unlikelihood"),
        ("tasks=[chess]", "unknown task"),
        ("multiplication.error_weights={carry: -1}", "must be >= 0"),
        ("sudoku.error_weights={typo: 1}", "unknown error type"),
        ("train.batch_size=10", "multiple of micro_batch_size"),
    ],
)
def test_bad_config_gets_a_clear_message(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


def test_every_key_has_help():
    lines = describe()
    assert len(lines) > 40
    assert all(line.split(": ", 1)[1] for line in lines), [x for x in lines if x.endswith(": ")]


@pytest.mark.parametrize("name", ["multiplication", "sudoku"])
def test_data_is_deterministic_and_disjoint(name):
    task = get_task(name)
    a = make_splits(task, 300, 50, seed=1)
    b = make_splits(task, 300, 50, seed=1)
    c = make_splits(task, 300, 50, seed=2)
    assert a["train"].equals(b["train"]) and a["test"].equals(b["test"])
    assert not a["train"].equals(c["train"])
    train, test = set(a["train"]["prompt"].to_pylist()), set(a["test"]["prompt"].to_pylist())
    assert len(train) == 300 and len(test) == 50 and not train & test
    assert a["train"].column_names[: len(DATA_COLUMNS)] == DATA_COLUMNS


def test_too_few_distinct_problems_is_a_clear_error():
    with pytest.raises(ValueError, match="distinct"):
        make_splits(get_task("multiplication", digits_a=1, digits_b=1), 200, 10, 0)


def test_atomic_parquet_and_corrupt_file_errors(tmp_path):
    p = str(tmp_path / "x" / "t.parquet")
    io.write_parquet(p, pa.table({"a": [1, 2]}))
    assert io.read_parquet(p, required=["a"]).num_rows == 2
    assert not [f for f in os.listdir(tmp_path / "x") if f.endswith(".tmp")]
    with pytest.raises(io.CorruptFileError, match="lacks columns"):
        io.read_parquet(p, required=["b"])
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(io.CorruptFileError, match="delete it and rerun"):
        io.read_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(FileNotFoundError, match="run the stage"):
        io.read_parquet(str(tmp_path / "missing.parquet"))


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    p = str(tmp_path / "t.parquet")
    io.write_parquet(p, pa.table({"a": [1]}))

    def die(fd):
        raise OSError("disk died mid-write")

    monkeypatch.setattr(os, "fsync", die)
    with pytest.raises(OSError, match="disk died"):
        io.write_parquet(p, pa.table({"a": [2, 3]}))
    monkeypatch.undo()
    assert io.read_parquet(p)["a"].to_pylist() == [1]
    assert os.listdir(tmp_path) == ["t.parquet"]


def test_rewrite_clears_what_a_killed_write_left(tmp_path):
    """A SIGKILL between temp file / staging dir and rename leaves designated temp names; the
    next write of the same target removes them (and only them: not other targets' temps, not
    the Ray Train checkpoints a rerun resumes from)."""
    leftovers = [".a.parquet.x1y2z3_4.tmp", ".ft.tmp-abc123de", ".ft.old-0a1b2c3d"]
    kept = [".b.parquet.q9w8e7r6.tmp", ".ft-ray", "a.parquet.bak"]
    for name in leftovers + kept:
        (tmp_path / name).mkdir() if "ft" in name else (tmp_path / name).write_text("partial")
    assert all(io.TEMP_NAME.match(n) for n in leftovers + kept[:2])
    assert not io.TEMP_NAME.match("a.parquet.bak")
    io.write_parquet(str(tmp_path / "a.parquet"), pa.table({"x": [1]}))
    io.replace_dir(io.staging_dir(str(tmp_path / "ft")), str(tmp_path / "ft"))
    assert sorted(os.listdir(tmp_path)) == sorted(["a.parquet", "ft", *kept])


def test_data_job_skips_when_done_and_refuses_other_experiment(tmp_path, capsys):
    from rayjobs import data

    out = str(tmp_path / "run")
    args = ["--config", os.path.join(REPO, "configs/smoke.yaml"), "--output-dir", out]
    data.main(args)
    before = os.path.getmtime(os.path.join(out, "sudoku/data/train.parquet"))
    data.main(args)
    assert "[skip] sudoku/data" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "sudoku/data/train.parquet")) == before
    with pytest.raises(ConfigError, match="different experiment"):
        data.main(args + ["seed=5"])
    data.main(args + ["seed=5", "--overwrite"])


def test_relative_output_dir_becomes_absolute(tmp_path, monkeypatch):
    """Ray workers run in another working directory, so jobs must hand them absolute paths."""
    from rayjobs.common import parse_args

    monkeypatch.chdir(tmp_path)
    ctx = parse_args(
        "x", ["--config", os.path.join(REPO, "configs/smoke.yaml"), "--output-dir", "runs/a"]
    )
    assert ctx.output_dir == str(tmp_path / "runs" / "a")
    assert parse_args("x", ["--output-dir", "s3://bucket/run"]).output_dir == "s3://bucket/run"
