"""What every job shares: the command line, Ray start-up, the run manifest and stage skipping."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from selfcorrect import console, io, runlock
from selfcorrect.config import Config, ConfigError, describe, dump_config, load_config

# Bad input a user fixes (a config key or value, a missing or corrupt input file, a missing
# model directory): one line naming the problem and the fix, exit code 2, no traceback.
USER_ERRORS = (ConfigError, FileNotFoundError, io.CorruptFileError)


def job_main(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a job's ``main(argv)`` so bad input ends it with one line and exit code 2.

    Everything else (a bug, a failed Ray job) still raises with its traceback;
    ``SELFCORRECT_TRACEBACK=1`` shows the traceback of bad input too.
    """

    @functools.wraps(fn)
    def wrapper(argv: list[str] | None = None) -> Any:
        try:
            return fn(argv)
        except USER_ERRORS as e:
            if os.environ.get("SELFCORRECT_TRACEBACK"):
                raise
            msg = " ".join(str(e).split()) or type(e).__name__
            print(f"error: {msg}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        finally:
            console.reset()  # a job run in-process (tests, notebooks) leaves no routing behind

    return wrapper


MANIFEST = "manifest.json"


@dataclass
class JobContext:
    cfg: Config
    output_dir: str
    overwrite: bool = False

    def path(self, *parts: str) -> str:
        return io.join(self.output_dir, *parts)


def parse_args(description: str, argv: list[str] | None = None, *, lock: bool = True) -> JobContext:
    """The job's flags and config; then (``lock``) the output dir's run lock
    (``hold_output_dir``), so a job writes nothing before it owns the directory."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", default=None, help="YAML preset, e.g. configs/tiny.yaml")
    ap.add_argument(
        "--output-dir", default=None, help="local dir or pyarrow URI (default runs/<name>)"
    )
    ap.add_argument(
        "--overwrite", action="store_true", help="replace results of a different config"
    )
    ap.add_argument("--help-config", action="store_true", help="list every config key and exit")
    ap.add_argument(
        "--verbose",
        action="store_true",
        help="stream Ray's and the workers' output to the terminal (default: <output-dir>/logs/)",
    )
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    args = ap.parse_args(argv)
    if args.help_config:
        print("\n".join(describe()))
        sys.exit(0)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        ap.exit(2, f"config error: {e}\n")
    out = args.output_dir or os.path.join("runs", cfg.name)
    # Ray workers run in their own working directory: local paths must be absolute.
    if not io.is_uri(out):
        out = os.path.abspath(out)
    ctx = JobContext(cfg, out, args.overwrite)
    if lock:
        hold_output_dir(ctx)
    console.configure(out, verbose=args.verbose)
    return ctx


def hold_output_dir(ctx: JobContext) -> None:
    """Own the output dir for the life of this driver (``selfcorrect.runlock``): a second
    driver on it exits 2 with one line naming the holder. Reentrant within a process."""
    try:
        note = runlock.acquire(ctx.output_dir)
    except runlock.OutputDirBusy as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if note:
        print(note, flush=True)


def init_ray(cfg: Config) -> None:
    """Connect to the cluster named by config / RAY_ADDRESS, or start an embedded local one."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # Every process of the job silences Ray's known-harmless warnings where they are logged.
    env: dict[str, Any] = {"worker_process_setup_hook": console.quiet_worker_logging}
    # Ray Train's print patch tees a worker's print to its stdout *and* the root logger,
    # whose console handler prints it again: every training line came twice. Off (0),
    # print is print; set the variable to 1 to have it back.
    env_vars = {"RAY_TRAIN_ENABLE_PRINT_PATCH": os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")}
    if os.environ.get("DS_ACCELERATOR"):
        env_vars["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    env["env_vars"] = env_vars
    # Quiet (a job's default): the workers write to the stage logs, not through the driver.
    to_driver = not console.quiet()
    console.redirect_driver_stderr()  # quiet: Ray core's C++ lines in the driver -> ray.log
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=to_driver)
        console.note_ray_session()
        return
    # An embedded instance is one machine that nobody preempts: Ray Train's preemption
    # watcher and 2 s health-check poll only add ~4 s to each of the ~20 training runs of
    # the tiny preset (19 -> 15 s for a 5-step run). Set either variable to override.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            ray.init(
                num_cpus=cfg.ray.num_cpus,
                runtime_env=env,
                include_dashboard=False,
                log_to_driver=to_driver,
            )
            console.note_ray_session()
            return
        except Exception as e:
            # Ray gives a new raylet a fixed 30 s to register; a busy machine can miss that.
            if "timed out during startup" not in str(e) or attempt == START_ATTEMPTS:
                raise
            print(
                f"[ray] the embedded Ray instance did not start in time (attempt {attempt} of "
                f"{START_ATTEMPTS}, machine busy?); stopping its processes and retrying",
                flush=True,
            )
            ray.shutdown()
            _kill_own_ray_daemons()
            time.sleep(5)


START_ATTEMPTS = 3


def _kill_own_ray_daemons() -> None:
    """Kill the Ray daemons (GCS, raylet, agents) this process started in a failed start."""
    try:
        import psutil
    except ImportError:  # Ray depends on psutil; without it a retry may leave them running
        return
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "/ray/" in " ".join(child.cmdline()):  # gcs_server, raylet, ray's agents
                child.kill()


# ---------------------------------------------------------------------------
# Manifest: stage -> status, config hash, artifacts, timings.
# ---------------------------------------------------------------------------


def read_manifest(ctx: JobContext) -> dict[str, Any]:
    p = ctx.path(MANIFEST)
    return io.read_json(p) if io.exists(p) else {"stages": {}}


def write_manifest(ctx: JobContext, manifest: dict[str, Any]) -> None:
    io.write_json(ctx.path(MANIFEST), manifest)


_MANIFEST_LOCK = threading.Lock()  # the pipeline runs tasks in threads of one driver


def update_manifest(ctx: JobContext, change: Callable[[dict[str, Any]], None]) -> None:
    """Read, change and write the manifest as one step, so concurrent stages lose no record."""
    with _MANIFEST_LOCK:
        manifest = read_manifest(ctx)
        change(manifest)
        write_manifest(ctx, manifest)


def stage_done(ctx: JobContext, key: str, config_hash: str) -> bool:
    st = read_manifest(ctx)["stages"].get(key)
    return bool(
        st
        and st.get("status") == "done"
        and st.get("config_hash") == config_hash
        and all(io.exists(ctx.path(a)) for a in st.get("artifacts", []))
    )


def record_stage(ctx: JobContext, key: str, rec: dict[str, Any]) -> None:
    """Set one stage's manifest record (stages whose runs another driver call makes, e.g.
    the models of one training chain)."""

    def record(m: dict[str, Any]) -> None:
        m["stages"][key] = rec

    update_manifest(ctx, record)


@contextlib.contextmanager
def stage(ctx: JobContext, key: str, config_hash: str) -> Iterator[dict[str, Any]]:
    """Record a stage in the manifest: running -> done (with artifacts and seconds) or failed.

    The body fills ``rec['artifacts']`` with paths relative to the output dir.
    """
    rec: dict[str, Any] = {
        "status": "running",
        "config_hash": config_hash,
        "artifacts": [],
        "started": time.time(),
    }

    def record(m: dict[str, Any]) -> None:
        m["stages"][key] = rec

    update_manifest(ctx, record)
    t0 = time.time()
    try:
        yield rec
    except BaseException:
        rec.update(status="failed", seconds=round(time.time() - t0, 2))
        update_manifest(ctx, record)
        raise
    rec.update(status="done", seconds=round(time.time() - t0, 2), finished=time.time())
    update_manifest(ctx, record)


def run_stage(
    ctx: JobContext, key: str, config_hash: str, fn: Callable[[dict[str, Any]], None]
) -> bool:
    """Run ``fn(rec)`` unless the manifest says this stage is done with the same config.

    Returns True if it ran.
    """
    if stage_done(ctx, key, config_hash):
        console.note(f"[skip] {key}: outputs exist for this config")
        return False
    # Quiet mode: the stage's output (and its workers') goes to logs/<key>.log, with a bar.
    with console.stage_scope(key), stage(ctx, key, config_hash) as rec:
        fn(rec)
    return True


@contextlib.contextmanager
def stages_in_one_pass(
    ctx: JobContext, hashes: dict[str, str], scope: str
) -> Iterator[dict[str, dict[str, Any]]]:
    """Several stages one pass produces (a task's harvest splits, its eval models): yields
    key -> manifest record for those not done with the same config (empty: nothing to do),
    each recorded running, then done or failed with the pass. Quiet mode logs the pass to
    ``logs/<scope>.log``."""
    pending = {}
    for key, config_hash in hashes.items():
        if stage_done(ctx, key, config_hash):
            console.note(f"[skip] {key}: outputs exist for this config")
        else:
            pending[key] = config_hash
    if not pending:
        yield {}
        return
    with console.stage_scope(scope), contextlib.ExitStack() as stack:
        yield {k: stack.enter_context(stage(ctx, k, h)) for k, h in pending.items()}


def save_resolved_config(ctx: JobContext) -> None:
    """Write config.yaml; refuse to mix results of a different experiment unless --overwrite."""
    p = ctx.path("config.yaml")
    new = dump_config(ctx.cfg)
    if io.exists(p) and not ctx.overwrite:
        import yaml

        old = yaml.safe_load(io.read_bytes(p).decode())
        old_core = {k: old.get(k) for k in ("seed", "tasks", "multiplication", "sudoku", "data")}
        new_core = {k: ctx.cfg.to_dict()[k] for k in old_core}
        if old_core != new_core:
            raise ConfigError(
                f"{ctx.output_dir} holds results of a different experiment (seed, tasks or data "
                "differ); choose another --output-dir or pass --overwrite to replace them"
            )
    io.write_text(p, new)
