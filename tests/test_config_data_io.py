"""Config loading/validation, dataset determinism and disjointness, atomic I/O."""

from __future__ import annotations

import os
import re

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


def test_bf16_is_true_false_or_auto_and_auto_follows_the_hardware():
    import torch

    from selfcorrect.models import cpu_has_bf16, resolve_bf16

    assert load_config(None).train.bf16 == "auto"
    assert load_config(None, ["train.bf16=false"]).train.bf16 is False
    with pytest.raises(ConfigError, match="choose true, false or auto"):
        load_config(None, ["train.bf16=fast"])
    cpu = torch.device("cpu")
    assert resolve_bf16(True, cpu) is True and resolve_bf16(False, cpu) is False
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    expected = "avx512_bf16" in flags or "amx_bf16" in flags
    assert cpu_has_bf16() is expected
    assert resolve_bf16("auto", cpu) is expected


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
        ("sudoku.next_cell_share=1.5", "sudoku.next_cell_share.*must be in \\[0, 1\\]"),
        ("train.batch_size=10", "multiple of micro_batch_size"),
        # issue 9: typos in nested sections, wrong types, out-of-range values
        ("model.max_len=100", "did you mean 'model.max_length'"),
        ("grpo.group_sise=4", "did you mean 'grpo.group_size'"),
        ("eval.temperature=[0.0]", "did you mean 'eval.temperatures'"),
        ("train.zzz=1", "valid keys: methods, max_steps"),
        ("train=5", "config section 'train' must be a mapping"),
        ("train.lr=-1", "'train.lr': must be > 0"),
        ("train.batch_size=abc", "'train.batch_size': expected an integer, got 'abc'"),
        ("train.use_gpu=maybe", "'train.use_gpu': expected true/false"),
        ("tasks=sudoku", r"'tasks': expected a list.*tasks=\[sudoku\]"),
        ("tasks=[]", "name at least one task"),
        ("seed=-1", "'seed': must be >= 0"),
        ("train.warmup_steps=-5", "'train.warmup_steps': must be >= 0"),
        ("train.weight_decay=-0.1", "'train.weight_decay': must be >= 0"),
        ("train.log_every=0", "'train.log_every': must be >= 1"),
        ("train.w_recognition=-1", "loss weights must be >= 0"),
        ("train.last_step_rate=0.5", "error_placement=step only"),
        ("train.last_step_rate=1.5", "'train.last_step_rate': must be in"),
        ("train.cpus_per_worker=0", "'train.cpus_per_worker': must be >= 1"),
        ("harvest.num_actors=0", "'harvest.num_actors': must be >= 1"),
        ("harvest.max_new_tokens=0", "'harvest.max_new_tokens': must be >= 1"),
        ("harvest.max_problems=-1", "'harvest.max_problems': must be >= 0"),
        ("eval.max_errors=-3", "'eval.max_problems/max_errors': must be >= 0"),
        ("grpo.max_minutes=-1", "'grpo.max_minutes': must be >= 0"),
        ("model.lora_r=0", "'model.lora_r/lora_alpha': must be >= 1"),
        ("ray.num_cpus=0", "'ray.num_cpus': must be >= 1"),
        ("multiplication.digits_a=0", "must be in 1..9"),
        ("sudoku.max_empty=17", "min_empty <= max_empty <= 16"),
        ("multiplication.error_weights.carry=abc", "expected a number"),
        ("train.lr", "must look like key=value"),
    ],
)
def test_bad_config_gets_a_clear_message(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize(
    "yaml_text,match",
    [
        ("seeed: 3\n", "unknown config key 'seeed'; did you mean 'seed'"),
        ("grpo: {group_sise: 4}\n", "did you mean 'grpo.group_size'"),
        ("multiplication: {digits: 3}\n", "did you mean 'multiplication.digits_[ab]'"),
        ("train: {lr: -1}\n", "'train.lr': must be > 0"),
        ("train: {injection_rate: 1.5}\n", "'train.injection_rate': must be in"),
        ("tasks: [chess]\n", "unknown task 'chess'; choose multiplication, sudoku"),
        ("- just\n- a list\n", "'<root>' must be a mapping"),
        ("train: {lr: [1\n", "is not valid YAML"),
    ],
)
def test_bad_yaml_gets_a_clear_message(tmp_path, yaml_text, match):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match):
        load_config(str(bad))


def _snapshot(root) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: proves a refused job touched nothing."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_bad_config_on_the_command_line_writes_nothing(tmp_path, capsys):
    from rayjobs import data

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        data.main(["--output-dir", str(out), "tasks=[sudoku]", "train.lrr=1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "config error: unknown config key 'train.lrr'; did you mean 'train.lr'" in err
    assert not out.exists()


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


@pytest.mark.parametrize(
    "rel,stage",
    [
        ("sudoku/data/train.parquet", "rayjobs.data"),
        ("sudoku/harvest/ft-test.parquet", "rayjobs.harvest"),
        ("sudoku/coverage/ft.parquet", "rayjobs.coverage"),
        ("sudoku/eval/ft.parquet", "rayjobs.evaluate"),
        ("eval_summary.parquet", "rayjobs.evaluate"),
        ("sudoku/tune/results.parquet", "rayjobs.tune"),
    ],
)
def test_corrupt_parquet_message_names_the_file_and_the_stage_to_rerun(tmp_path, rel, stage):
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    io.write_parquet(str(path), pa.table({"a": [1, 2, 3]}))
    with pytest.raises(io.CorruptFileError, match=rf"{path}.*lacks columns.*rerun {stage}"):
        io.read_parquet(str(path), required=["prompt"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated mid-file, as by a full disk
    with pytest.raises(io.CorruptFileError, match=rf"{path} is not a readable.*rerun {stage}"):
        io.read_parquet(str(path))
    path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{path} does not exist; run {stage}"):
        io.read_parquet(str(path))


def test_train_stage_refuses_corrupt_data_before_starting_ray(tmp_path):
    """The stage reads its input on the driver: a broken file stops it before any worker runs."""
    import ray

    from rayjobs.train import train_one

    cfg = load_config(os.path.join(REPO, "configs/smoke.yaml"))
    train = tmp_path / "sudoku" / "data" / "train.parquet"
    train.parent.mkdir(parents=True)
    io.write_parquet(str(train), pa.table({"problem_id": [0], "answer": ["x"]}))  # no prompt
    out = tmp_path / "sudoku" / "models" / "ft"
    with pytest.raises(io.CorruptFileError, match=r"lacks columns \['prompt'\].*rayjobs.data"):
        train_one(cfg, "sudoku", "ft", str(out), train_path=str(train))
    train.write_bytes(b"PAR1 garbage")
    with pytest.raises(io.CorruptFileError, match="not a readable Parquet.*rerun rayjobs.data"):
        train_one(cfg, "sudoku", "ft", str(out), train_path=str(train))
    assert not out.exists() and not ray.is_initialized()


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


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


def test_rewrite_clears_what_a_killed_write_left(tmp_path):
    """A SIGKILL between temp file / staging dir and rename leaves designated temp names; the
    next write of the same target removes them (and only them: not other targets' temps, not
    the Ray Train checkpoints a rerun resumes from). Temps carry their writer: one whose
    process is gone goes at once; one without a writer this machine can check (old name,
    other host) only once it is an hour old."""
    here, dead = io.host_tag(), _dead_pid()
    leftovers = [
        f".a.parquet.{here}_{dead}_x1y2z3_4.tmp",
        f".ft.tmp-{here}_{dead}_abc123de",
        f".ft.old-{here}_{dead}_0a1b2c3d",
        ".a.parquet.k9j8h7g6.tmp",  # no writer in the name, two hours old
        ".ft.tmp-0123abcd_77_oldhost",  # another host's, two hours old
    ]
    kept = [
        f".b.parquet.{here}_{dead}_q9w8e7r6.tmp",  # another target's
        ".ft-ray",
        "a.parquet.bak",
        ".a.parquet.m1n2b3v4.tmp",  # no writer, fresh
        ".ft.old-0123abcd_77_fresh",  # another host's, fresh
    ]
    for name in leftovers + kept:
        (tmp_path / name).mkdir() if "ft" in name else (tmp_path / name).write_text("partial")
    for name in leftovers[3:]:
        os.utime(tmp_path / name, (1, os.path.getmtime(tmp_path / name) - 7200))
    assert all(io.TEMP_NAME.match(n) for n in leftovers + kept if n != "a.parquet.bak")
    assert not io.TEMP_NAME.match("a.parquet.bak")
    io.write_parquet(str(tmp_path / "a.parquet"), pa.table({"x": [1]}))
    io.replace_dir(io.staging_dir(str(tmp_path / "ft")), str(tmp_path / "ft"))
    assert sorted(os.listdir(tmp_path)) == sorted(["a.parquet", "ft", *kept])


def test_temps_of_a_live_writer_are_never_removed(tmp_path):
    """Two writers of one target (another driver, a Ray worker, a thread): neither removes the
    other's temp file or staging dir while its process runs."""
    import subprocess
    import sys

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tag = f"{io.host_tag()}_{other.pid}_"
        live = [f".manifest.json.{tag}r4nd0m_1.tmp", f".ft.tmp-{tag}abc", f".ft.old-{tag}def"]
        mine = [f".manifest.json.{io.owner_prefix()}another_thread.tmp"]
        for name in live + mine:
            (tmp_path / name).mkdir() if "ft" in name else (tmp_path / name).write_text("x")
            os.utime(tmp_path / name, (1, 1))  # old does not mean abandoned
        io.write_json(str(tmp_path / "manifest.json"), {"stages": {}})
        io.replace_dir(io.staging_dir(str(tmp_path / "ft")), str(tmp_path / "ft"))
        assert sorted(os.listdir(tmp_path)) == sorted(["manifest.json", "ft", *live, *mine])
        assert io.remove_stale_temps(tmp_path / "manifest.json") == []
    finally:
        other.kill()
        other.wait()
    # Its writer gone, the temp is what a killed write left: the next write removes it.
    io.write_json(str(tmp_path / "manifest.json"), {"stages": {}})
    assert not (tmp_path / live[0]).exists() and (tmp_path / mine[0]).exists()


def test_data_job_skips_when_done_and_refuses_other_experiment(tmp_path, capsys):
    from rayjobs import data

    out = str(tmp_path / "run")
    args = ["--config", os.path.join(REPO, "configs/smoke.yaml"), "--output-dir", out]
    data.main(args)
    before = os.path.getmtime(os.path.join(out, "sudoku/data/train.parquet"))
    data.main(args)
    assert "[skip] sudoku/data" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "sudoku/data/train.parquet")) == before
    before_bytes = _snapshot(tmp_path / "run")
    for other in (["seed=5"], ["tasks=[sudoku]"], ["data.n_train=7"], ["sudoku.min_empty=5"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:  # one line, exit 2 (rayjobs.common.job_main)
            data.main(args + other)
        assert exc.value.code == 2
        assert re.search("different experiment.*--overwrite", capsys.readouterr().err)
        # refused before anything was written: config, manifest and data are byte-identical
        assert _snapshot(tmp_path / "run") == before_bytes, other
    data.main(args + ["seed=5", "--overwrite"])
    assert _snapshot(tmp_path / "run") != before_bytes


def test_relative_output_dir_becomes_absolute(tmp_path, monkeypatch):
    """Ray workers run in another working directory, so jobs must hand them absolute paths."""
    from rayjobs.common import parse_args

    monkeypatch.chdir(tmp_path)
    ctx = parse_args(
        "x", ["--config", os.path.join(REPO, "configs/smoke.yaml"), "--output-dir", "runs/a"]
    )
    assert ctx.output_dir == str(tmp_path / "runs" / "a")
    assert parse_args("x", ["--output-dir", "s3://bucket/run"]).output_dir == "s3://bucket/run"


def test_config_knows_every_model_preset():
    from selfcorrect.config import PRESET_NAMES
    from selfcorrect.models import PRESETS

    assert set(PRESET_NAMES) == set(PRESETS)
    with pytest.raises(ConfigError, match="choose one of nano, mini, tiny, tiny-deep"):
        load_config(None, ["model.preset=huge"])
