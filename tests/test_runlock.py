"""One driver per output directory (selfcorrect.runlock, taken in rayjobs.common.parse_args):
a second driver is refused with one line naming the holder, a SIGKILLed driver's lock is taken
over, nested and threaded use within one driver is fine, object stores say they get no lock.
The integration test starts two real pipeline drivers at the same moment on one directory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest

from rayjobs.common import parse_args
from selfcorrect import io, runlock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "configs", "smoke.yaml")
ENV = dict(os.environ, PYTHONPATH=REPO, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")

HOLD = (
    "import sys, time\n"
    "from rayjobs.common import parse_args\n"
    "parse_args('hold', ['--output-dir', sys.argv[1]])\n"
    "print('held', flush=True)\n"
    "time.sleep(300)\n"
)


def start_holder(out: str) -> subprocess.Popen:
    """Another driver process that has taken ``out``'s lock through the jobs' entry."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, out], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()  # type: ignore[union-attr]
    assert line.strip() == "held", f"holder did not start (rc {proc.poll()})"
    return proc


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(timeout=30)


def test_second_driver_is_refused_with_one_line_naming_the_holder(tmp_path, capsys):
    out = str(tmp_path / "run")
    holder = start_holder(out)
    try:
        with pytest.raises(SystemExit) as exc:
            parse_args("x", ["--config", SMOKE, "--output-dir", out])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert err.startswith(f"error: output dir {out} is in use by pid {holder.pid} on host ")
        assert socket.gethostname() in err and "(python -c, since " in err
        assert os.path.join(out, ".selfcorrect.lock") in err
        assert "wait for it to finish or use another --output-dir" in err
        assert os.listdir(out) == [".selfcorrect.lock"]  # the refused driver wrote nothing
        assert not runlock.held(out)
    finally:
        stop(holder)


def test_sigkilled_driver_leaves_a_lock_the_next_run_takes_over(tmp_path, capsys):
    out = str(tmp_path / "run")
    holder = start_holder(out)
    stop(holder, signal.SIGKILL)  # no exit handler runs: its record stays in the file
    assert json.loads(open(os.path.join(out, ".selfcorrect.lock")).read())["pid"] == holder.pid
    ctx = parse_args("x", ["--config", SMOKE, "--output-dir", out])
    printed = capsys.readouterr().out
    assert printed.startswith(f"[lock] took over the lock of {out} from pid {holder.pid} ")
    assert "ended without releasing it" in printed
    assert runlock.held(ctx.output_dir)
    record = json.loads(open(os.path.join(out, ".selfcorrect.lock")).read())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    # A clean release empties the record: the next driver has nothing to take over.
    runlock.release(out)
    assert open(os.path.join(out, ".selfcorrect.lock")).read() == ""
    parse_args("x", ["--config", SMOKE, "--output-dir", out])
    assert "[lock]" not in capsys.readouterr().out


def test_terminated_driver_is_taken_over_and_a_clean_exit_empties_the_lock(tmp_path):
    out = str(tmp_path / "run")
    holder = start_holder(out)
    stop(holder, signal.SIGTERM)  # Python's default SIGTERM: no atexit; the kernel unlocks
    proc = subprocess.run(
        [sys.executable, "-c", HOLD.replace("300", "0"), out],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "took over the lock" in proc.stdout, proc.stderr
    assert open(os.path.join(out, ".selfcorrect.lock")).read() == ""  # released at exit


def test_lock_is_reentrant_across_threads_of_one_driver(tmp_path):
    """The pipeline holds the lock and runs stage code in-process, possibly in threads."""
    out = str(tmp_path / "run")
    errors: list[BaseException] = []

    def take() -> None:
        try:
            for _ in range(20):
                assert runlock.acquire(out) is None
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and runlock.held(out)
    assert json.loads(open(os.path.join(out, ".selfcorrect.lock")).read())["pid"] == os.getpid()


def test_forked_child_does_not_keep_the_lock(tmp_path):
    out = str(tmp_path / "run")
    runlock.acquire(out)
    pid = os.fork()
    if pid == 0:  # the child outlives the parent's hold on the lock
        time.sleep(30)
        os._exit(0)
    try:
        runlock.release(out)
        assert runlock.acquire(out) is None  # a fresh descriptor: the child holds nothing
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_object_store_gets_no_lock_and_says_so(capsys):
    ctx = parse_args("x", ["--output-dir", "s3://bucket/run"])
    assert ctx.output_dir == "s3://bucket/run"
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1
    assert printed.startswith("[lock] s3://bucket/run is on an object store, where no run lock")
    assert "do not start a second driver" in printed


def test_report_job_still_refuses_a_missing_dir_without_making_it(tmp_path, capsys):
    from rayjobs import report

    with pytest.raises(SystemExit) as exc:
        report.main(["--output-dir", str(tmp_path / "nope")])
    assert exc.value.code == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


# ---------------------------------------------------------------------------
# Two real drivers at the same moment.
# ---------------------------------------------------------------------------

STEPS = ["--stages", "data,report"]  # no Ray: cheap, and the same entry as every job


def _pipeline(config: str, out: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rayjobs.pipeline",
        "--config",
        config,
        "--output-dir",
        out,
        *STEPS,
    ]


def _open_writer(fifo: str, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Open ``fifo`` for writing once ``proc`` has opened it to read its config."""
    t0 = time.time()
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            assert proc.poll() is None, f"driver exited early: {proc.communicate()}"
            assert time.time() - t0 < timeout, "driver never read its config"
            time.sleep(0.02)


def _results(out: str) -> dict:
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    stages = {  # the report's hash covers upstream finish times: it differs run to run
        k: (v["status"], None if k == "report" else v["config_hash"], sorted(v["artifacts"]))
        for k, v in manifest["stages"].items()
    }
    tables = {
        rel: pq.read_table(os.path.join(out, rel)).to_pylist()
        for rel in ("multiplication/data/train.parquet", "sudoku/data/test.parquet")
    }
    return {"stages": stages, "tables": tables, "config": open(f"{out}/config.yaml").read()}


def _temps(out: str) -> list[str]:
    return [n for _, ds, fs in os.walk(out) for n in ds + fs if io.TEMP_NAME.match(n)]


@pytest.mark.integration
def test_two_drivers_started_together_one_runs_one_is_refused(tmp_path, capsys):
    """Both drivers block reading their config from a FIFO; the test releases them together,
    so both reach the lock at the same moment. Then a driver is SIGKILLed holding the lock
    and the next run takes it over."""
    from rayjobs import pipeline

    lone = str(tmp_path / "lone")
    pipeline.main(["--config", SMOKE, "--output-dir", lone, *STEPS])
    runlock.release_all()
    expected = _results(lone)

    out = str(tmp_path / "run")
    text = open(SMOKE, "rb").read()
    fifos = [str(tmp_path / f"cfg{i}.yaml") for i in range(2)]
    procs = []
    for fifo in fifos:
        os.mkfifo(fifo)
        procs.append(
            subprocess.Popen(
                _pipeline(fifo, out),
                cwd=REPO,
                env=ENV,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    try:
        fds = [_open_writer(f, p) for f, p in zip(fifos, procs, strict=True)]
        for fd in fds:  # both configs arrive together: neither driver has a head start
            os.write(fd, text)
        for fd in fds:
            os.close(fd)
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            stop(p)
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], (codes, outputs)
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    stdout, stderr = outputs[loser]
    assert stdout == "" and stderr.count("\n") == 1, outputs[loser]
    assert stderr.startswith(
        f"error: output dir {out} is in use by pid {procs[winner].pid} on host "
        f"{socket.gethostname()} (rayjobs.pipeline, since "
    ), stderr
    assert f"which holds {out}/.selfcorrect.lock; wait for it" in stderr
    assert "pipeline finished" in outputs[winner][0]
    assert _results(out) == expected and _temps(out) == []
    assert open(os.path.join(out, ".selfcorrect.lock")).read() == ""  # released at exit

    # SIGKILL a driver while it holds the lock; the next run takes the lock over.
    killed_dir = str(tmp_path / "killed")
    lock = os.path.join(killed_dir, ".selfcorrect.lock")
    proc = subprocess.Popen(
        _pipeline(SMOKE, killed_dir),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        t0 = time.time()
        while not (os.path.exists(lock) and open(lock).read().strip()):
            assert proc.poll() is None and time.time() - t0 < 120, "driver never took the lock"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop(proc)
    capsys.readouterr()
    pipeline.main(["--config", SMOKE, "--output-dir", killed_dir, *STEPS])
    printed = capsys.readouterr().out
    assert f"[lock] took over the lock of {killed_dir} from pid {proc.pid} " in printed
    assert _results(killed_dir) == expected and _temps(killed_dir) == []
