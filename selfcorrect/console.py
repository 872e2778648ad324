"""The terminal and the per-stage log files.

Quiet mode (every job's default; ``--verbose`` turns it off) keeps the terminal to what a
user acts on: the stage plan, one progress bar per running stage (redrawn in place, only on a
TTY), one line per finished stage and a closing summary. Everything else goes to files under
``<output-dir>/logs/``:

* ``logs/<stage key>.log`` (e.g. ``logs/multiplication/ft.log``): what the driver prints while
  the stage runs and the stdout/stderr (C level too, via ``os.dup2``) of the processes the stage
  starts: Ray Train workers, generation actors, Tune trials. The stage hands them a small spec
  (``worker_spec()``) and they call ``attach_worker(spec)`` first thing.
* ``logs/ray.log``: the driver's own Ray log records (Ray Data, Tune, Train driver side).
* Processes the stage does not start (Ray's controllers and daemons) keep their output in
  Ray's session logs (``/tmp/ray/session_latest/logs``); ``logs/ray.log`` names the directory.

Progress reaches the driver through a small append-only file per stage
(``logs/.progress/<stage key>.jsonl``): workers append ``{"total": n}``, ``{"done": n}`` or
``{"add": n}`` lines, and a driver thread polls them into the bars. When no job configured the
console (library use, notebooks, the in-process tests) nothing changes: output streams as
before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

_lock = threading.RLock()
_local = threading.local()
_state: dict[str, Any] = {"quiet": False, "log_dir": None, "out": None, "err": None}
_moved: list[tuple[logging.Logger, logging.Handler]] = []  # (logger, handler) to restore
_bars: dict[str, Any] = {}  # stage key -> _Bar
_poller: threading.Thread | None = None
_process_spec: dict[str, Any] | None = None  # worker side: the spec this process attached


# ---------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------


def log_dir_for(output_dir: str) -> str:
    """Where a run's logs go: ``<output-dir>/logs``; for a URI output dir (logs are appended
    line by line, which object stores cannot do) a local dir under the temp dir."""
    if "://" not in output_dir:
        return os.path.join(output_dir, "logs")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", output_dir).strip("_")
    return os.path.join(tempfile.gettempdir(), "selfcorrect-logs", slug)


def configure(output_dir: str, *, verbose: bool) -> None:
    """Set the console up for one job. Quiet: driver prints made while a stage runs go to
    that stage's log file, Ray's driver log records to ``logs/ray.log``."""
    _state["quiet"] = not verbose
    _state["log_dir"] = log_dir_for(output_dir)
    if verbose:
        return
    # Nothing is created before a first line is logged (a refused job writes nothing).
    if _state["out"] is None:
        _state["out"], _state["err"] = sys.stdout, sys.stderr
        sys.stdout = _Router(sys.stdout)  # type: ignore[assignment]
        sys.stderr = _Router(sys.stderr)  # type: ignore[assignment]
    quiet_ray_driver_logging(os.path.join(_state["log_dir"], "ray.log"))


def reset() -> None:
    """Undo ``configure`` (a job run in-process ends): the terminal streams and Ray's log
    handlers as they were, output streamed again."""
    saved = _state.pop("saved_fd2", None)
    if saved is not None:  # fd 2 back to the terminal
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        with contextlib.suppress(Exception):
            _state.pop("term_err").close()
    if _state["out"] is not None:
        sys.stdout, sys.stderr = _state["out"], _state["err"]
    for lg, h in _moved:
        if isinstance(h, logging.FileHandler):
            lg.removeHandler(h)
            h.close()
        else:
            lg.addHandler(h)
    _moved.clear()
    if _state["quiet"]:
        with contextlib.suppress(ImportError):
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = True
    _state.update(quiet=False, log_dir=None, out=None, err=None)


def quiet() -> bool:
    """Whether a job configured quiet mode (the default of every job's command line)."""
    return bool(_state["quiet"])


def log_dir() -> str | None:
    return _state["log_dir"]


def terminal() -> TextIO:
    """The real terminal stdout (past the per-stage routing)."""
    return _state["out"] or sys.stdout


def line(msg: str) -> None:
    """Print one line to the terminal without tearing the progress bars."""
    with _lock:
        if _bars and _tty():
            from tqdm import tqdm

            tqdm.write(msg, file=terminal())
        else:
            print(msg, file=terminal(), flush=True)


def note(msg: str) -> None:
    """A line a single job shows but a quiet pipeline keeps in its logs (a skipped stage):
    inside a pipeline step the stage's log (or ``logs/driver.log``), else the terminal."""
    if not quiet():
        print(msg, flush=True)
        return
    if getattr(_local, "scope", None) is None:
        line(msg)
        return
    path = _current("log") or os.path.join(_state["log_dir"], "driver.log")
    _append(path, msg + "\n")


class _Router:
    """sys.stdout/err in quiet mode: a thread inside a stage writes to that stage's log."""

    def __init__(self, real: TextIO) -> None:
        self._real = real

    def write(self, s: str) -> int:
        path = _current("log")
        if path is None and threading.current_thread().name.startswith("ray_"):
            # Ray's own driver threads, e.g. ray_listen_error_messages printing the raylet's
            # warnings ("N PYTHON worker processes have been started ..."): Ray's log.
            path = os.path.join(_state["log_dir"], "ray.log")
        if path is None:
            return self._real.write(s)
        _append(path, s)
        return len(s)

    def flush(self) -> None:
        self._real.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _append(path: str, s: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(s)


def _current(field: str) -> str | None:
    spec = getattr(_local, "spec", None)
    return spec.get(field) if spec else None


def _slug(key: str) -> str:
    return "/".join(re.sub(r"[^A-Za-z0-9._=+-]+", "_", p) for p in key.split("/") if p)


def _tty() -> bool:
    try:
        return terminal().isatty()
    except (AttributeError, ValueError):
        return False


def set_scope(label: str | None) -> None:
    """Name the pipeline scope of this thread (e.g. ``ft (sudoku)``): inside a pipeline a
    finished stage gets no terminal line of its own (the pipeline step prints one)."""
    _local.scope = label


@contextlib.contextmanager
def stage_scope(key: str) -> Iterator[None]:
    """Route this thread's output (and that of the workers it starts) to the stage's log and
    show its progress bar; a line when it ends (unless a pipeline step prints one)."""
    if not quiet():
        yield
        return
    log = os.path.join(_state["log_dir"], _slug(key) + ".log")
    prog = os.path.join(_state["log_dir"], ".progress", _slug(key) + ".jsonl")
    os.makedirs(os.path.dirname(prog), exist_ok=True)
    open(prog, "w").close()
    _append(log, f"==== {key}: start {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    prev = getattr(_local, "spec", None)
    _local.spec = {"log": log, "progress": prog}
    bar = _Bar(key, prog)
    with _lock:
        _bars[key] = bar
    _start_poller()
    t0 = time.time()
    ok = False
    try:
        yield
        ok = True
    finally:
        with _lock:
            _bars.pop(key, None)
            bar.close()
        _local.spec = prev
        secs = time.time() - t0
        status = "done" if ok else "FAILED"
        _append(log, f"==== {key}: {status} in {secs:.1f}s\n")
        if getattr(_local, "scope", None) is None or not ok:
            line(f"[{status}] {key} in {secs:.1f}s (log: {log})")


def add_total(n: int) -> None:
    """The driver knows a batch of the stage's items (harvest, eval, tune trials): grow the
    bar's total by ``n`` (a stage may generate more than once)."""
    prog = _current("progress")
    if prog:
        _append(prog, json.dumps({"more": int(n)}) + "\n")


class _Bar:
    def __init__(self, key: str, progress_path: str) -> None:
        self.key, self.path, self.offset = key, progress_path, 0
        self.total: int | None = None
        self.done = 0
        self.bar: Any = None

    def poll(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        end = chunk.rfind("\n") + 1  # only whole lines
        self.offset += len(chunk[:end].encode())
        for raw in chunk[:end].splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(raw)
                if "total" in rec:
                    self.total = int(rec["total"])
                if "more" in rec:
                    self.total = (self.total or 0) + int(rec["more"])
                if "done" in rec:
                    self.done = int(rec["done"])
                if "add" in rec:
                    self.done += int(rec["add"])
        self._draw()

    def _draw(self) -> None:
        if not _tty():
            return
        from tqdm import tqdm

        if self.bar is None:
            used = {b.bar.pos for b in _bars.values() if b.bar is not None}
            pos = next(i for i in range(len(_bars) + 1) if i not in used and -i not in used)
            self.bar = tqdm(
                total=self.total,
                initial=self.done,  # a resumed run starts part-way
                desc=self.key,
                position=pos,
                leave=False,
                file=terminal(),
                dynamic_ncols=True,
                mininterval=0.5,
            )
        if self.total is not None and self.bar.total != self.total:
            self.bar.total = self.total
        if self.done >= self.bar.n:
            self.bar.update(self.done - self.bar.n)  # through update: tqdm's rate and ETA
        else:  # a restarted worker went back to its checkpoint
            self.bar.n = self.done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _start_poller() -> None:
    global _poller
    if _poller is not None or not _tty():
        return

    def loop() -> None:
        while True:
            time.sleep(0.5)
            with _lock:
                for b in list(_bars.values()):
                    b.poll()

    _poller = threading.Thread(target=loop, name="selfcorrect-progress", daemon=True)
    _poller.start()


def worker_spec() -> dict[str, Any] | None:
    """What a process started by the current stage needs to log there (None: stream as
    before). Pass it to the worker, which calls ``attach_worker``."""
    spec = getattr(_local, "spec", None)
    if spec is None and _process_spec is not None:  # inside a worker: its own stage
        spec = {"log": _process_spec["log"]}  # (a Tune trial's Ray Train run logs, no steps)
    return dict(spec) if spec else None


def quiet_ray_driver_logging(path: str) -> None:
    """Send the driver's Ray log records to ``path`` instead of the terminal; a line there
    names Ray's session logs, where its daemons and controllers write."""
    import ray  # noqa: F401 - sets up the "ray" logger and its console handler
    import ray.data  # noqa: F401 - configures "ray.data" (its own console handler) on import

    handler = _LazyFileHandler(path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))
    for name in ("ray", "ray.data", "ray.tune", "ray.train", "ray.serve"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
                _moved.append((lg, h))
        if name == "ray":
            lg.addHandler(handler)
            _moved.append((lg, handler))
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False  # ours replace them
    except ImportError:  # pragma: no cover - ray[data] is a dependency
        pass


class _LazyFileHandler(logging.FileHandler):
    """A FileHandler that makes its directory when the first record comes."""

    def _open(self):  # noqa: ANN202 - logging's signature
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()


def redirect_driver_stderr() -> None:
    """Quiet mode, before ``ray.init``: the driver's C-level stderr (fd 2: Ray core's own
    C++ log lines, e.g. the actor-restart notice of Ray Data's pools) goes to ``logs/ray.log``;
    Python's ``sys.stderr`` keeps writing to the terminal through a duplicate of fd 2."""
    if not quiet() or _state.get("saved_fd2") is not None:
        return
    path = os.path.join(_state["log_dir"], "ray.log")
    os.makedirs(_state["log_dir"], exist_ok=True)
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    _state["saved_fd2"] = saved
    term = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")
    _state["term_err"] = term
    if isinstance(sys.stderr, _Router):
        sys.stderr._real = term


def note_ray_session() -> None:
    """Name Ray's session log dir in ``logs/ray.log`` (its daemons' and controllers' output)."""
    if not quiet():
        return
    with contextlib.suppress(Exception):
        import ray

        d = ray._private.worker._global_node.get_session_dir_path()  # noqa: SLF001
        logging.getLogger("ray").warning("Ray's own process logs: %s/logs", d)


# ---------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------


def attach_worker(spec: dict[str, Any] | None) -> None:
    """In a process a stage started: send its stdout/stderr (fd 1 and 2, so C-level output
    too) to the stage's log. Idempotent; ``None`` (verbose) leaves the output alone."""
    global _process_spec
    if not spec or not spec.get("log"):
        return
    if _process_spec is not None and _process_spec.get("log") == spec["log"]:
        _process_spec = spec
        return
    os.makedirs(os.path.dirname(spec["log"]), exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _process_spec = spec


class Progress:
    """A worker's progress writer for its stage's bar (no-op without a progress path)."""

    def __init__(self, spec: dict[str, Any] | None) -> None:
        self.path = (spec or {}).get("progress")

    def _put(self, **rec: int) -> None:
        if self.path:
            with contextlib.suppress(OSError):
                _append(self.path, json.dumps(rec) + "\n")

    def total(self, n: int) -> None:
        self._put(total=int(n))

    def done(self, n: int) -> None:
        self._put(done=int(n))

    def add(self, n: int = 1) -> None:
        self._put(add=int(n))


# Known-harmless warnings, silenced where they are logged. Ray's ``worker_process_setup_hook``
# (``rayjobs.common.init_ray``) runs ``quiet_worker_logging`` in every process of the job, Ray
# Train's controller and its detached placement-group cleaner included. A logger filter, not
# only a level: Ray Train's controller re-runs ``dictConfig``, which resets child levels.
HARMLESS: dict[str, tuple[int, str | None]] = {
    # logger: (drop records below this level, or (if a prefix is given) records starting so)
    # Polls the state API every second; an instance without the dashboard (ours: embedded,
    # include_dashboard=False) has none, so each poll warned (475 lines per tiny run).
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": (logging.ERROR, None),
    # The autoscaling hint of a fixed-size local cluster timing out on a busy CPU: a warning
    # with a full traceback per training run; the resources are requested all the same.
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client": (
        logging.ERROR,
        None,
    ),
    # DeepSpeed's accelerator notice ("Setting accelerator to CPU. If you have GPU ..."), once
    # per training worker; other DeepSpeed warnings still show.
    "DeepSpeed": (logging.WARNING, "Setting accelerator to CPU"),
}


class _Harmless(logging.Filter):
    def __init__(self, below: int, prefix: str | None) -> None:
        super().__init__()
        self.below, self.prefix = below, prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if self.prefix is not None:
            return not str(record.msg).startswith(self.prefix)
        return record.levelno >= self.below


def quiet_worker_logging() -> None:
    """Ray ``worker_process_setup_hook``: filter the ``HARMLESS`` records out."""
    for name, (below, prefix) in HARMLESS.items():
        lg = logging.getLogger(name)
        if not any(isinstance(f, _Harmless) for f in lg.filters):
            lg.addFilter(_Harmless(below, prefix))
