"""The quiet console: per-stage routing of driver output, worker progress files, the summary's
headline lines (the smoke pipeline test counts the real terminal lines)."""

from __future__ import annotations

import os
import sys
import threading

from rayjobs.pipeline import headline_lines
from selfcorrect import console


def test_stage_output_goes_to_its_log_and_one_line_to_the_terminal(tmp_path, capsys):
    out = str(tmp_path / "run")
    console.configure(out, verbose=False)
    try:
        print("before")
        t = threading.Thread(
            target=print, args=("raylet warning",), name="ray_listen_error_messages"
        )
        t.start()
        t.join()
        with console.stage_scope("sudoku/ft"):
            print("inside the stage")
            spec = console.worker_spec()
            assert spec and spec["log"].endswith(os.path.join("logs", "sudoku", "ft.log"))
            p = console.Progress(spec)
            p.total(10)
            p.done(3)
            p.add(2)
            bar = console._Bar("sudoku/ft", spec["progress"])
            bar.poll()
            assert (bar.total, bar.done) == (10, 5)
        console.set_scope("[pipeline 2/9] ft")
        console.note("[skip] x")
        console.set_scope(None)
    finally:
        console.reset()
    printed = capsys.readouterr().out
    assert "before" in printed and "inside the stage" not in printed
    assert "[done] sudoku/ft" in printed and "[skip]" not in printed
    log = open(os.path.join(out, "logs", "sudoku", "ft.log")).read()
    assert "inside the stage" in log
    assert "[skip] x" in open(os.path.join(out, "logs", "driver.log")).read()
    assert "raylet warning" not in printed
    assert "raylet warning" in open(os.path.join(out, "logs", "ray.log")).read()
    assert not isinstance(sys.stdout, console._Router)


def test_verbose_streams_as_before(tmp_path, capsys):
    console.configure(str(tmp_path), verbose=True)
    with console.stage_scope("a/b"):
        print("shown")
        assert console.worker_spec() is None
    assert "shown" in capsys.readouterr().out
    console.reset()


def test_uri_output_dirs_log_locally():
    d = console.log_dir_for("s3://bucket/run")
    assert "://" not in d and d.endswith("s3_bucket_run")


def test_headline_lines():
    md = "# R\n\n## Headline\n\n- Premise on sudoku **holds**: `x`.\nEIFT 80%\n\n## Next\n- no\n"
    assert headline_lines(md) == ["- Premise on sudoku holds: x.", "EIFT 80%"]


def test_driver_c_level_stderr_goes_to_ray_log(tmp_path, capfd):
    """Ray core's C++ lines in the driver (fd 2) go to logs/ray.log; Python's stderr does not."""
    out = str(tmp_path / "run")
    console.configure(out, verbose=False)
    try:
        console.redirect_driver_stderr()
        os.write(2, b"C-level line\n")
        print("python line", file=sys.stderr, flush=True)
    finally:
        console.reset()
    err = capfd.readouterr().err
    assert "python line" in err and "C-level line" not in err
    assert "C-level line" in open(os.path.join(out, "logs", "ray.log")).read()
    os.write(2, b"")  # fd 2 is usable again
