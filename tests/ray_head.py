"""A real, token-authenticated Ray head on loopback for `ray job submit` tests.

The head is the test's own: separate --temp-dir, free ports, its own process group,
stopped by signalling that group (never a blanket `ray stop`, which would take down every
other Ray instance on the machine). Ray 2.60 token authentication is on: RAY_AUTH_MODE=token
and a fresh RAY_AUTH_TOKEN in the environment of both `ray start` and `ray job submit` (the
CLI sends it as a bearer token; the job's driver inherits it from the head's processes).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

BIN = os.path.dirname(sys.executable)
RAY = os.path.join(BIN, "ray")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        PATH=BIN + os.pathsep + env.get("PATH", ""),  # the job's `python` is this venv's
        DS_ACCELERATOR="cpu",
        RAY_TRAIN_V2_ENABLED="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        RAY_USAGE_STATS_ENABLED="0",
        # `ray start` gives its dashboard 60 s by default, then exits: too short for a head
        # started beside other work on 2 cores (the suite's own Ray instance, a `tiny` run).
        RAY_DASHBOARD_STARTUP_TIMEOUT_S="300",
    )
    return env


@contextmanager
def local_head(num_cpus: int = 2) -> Iterator[tuple[str, dict[str, str]]]:
    """Start `ray start --head --block` in its own process group; yield (dashboard URL, env)."""
    token = secrets.token_hex(32)
    env = _env(token)
    gcs, dash, client, agent, agent_grpc, metrics, rte = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="rsc-", dir="/tmp")  # short: Unix socket path limit
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rte}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log = open(os.path.join(temp_dir, "ray-start.log"), "w")
    proc = subprocess.Popen(
        cmd, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 300  # a loaded machine (CI beside other work) starts slowly
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {open(log.name).read()[-3000:]}")
            try:
                req = urllib.request.Request(
                    f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}
                )
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"dashboard not up in 300 s: {open(log.name).read()[-3000:]}")
            time.sleep(1)
        yield url, env
    finally:
        # Stop exactly this cluster: SIGTERM to our process group (the blocking `ray start`
        # drains and kills the processes it started), then SIGKILL whatever is left.
        pgid = proc.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        time.sleep(1)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(url: str, env: dict[str, str], entrypoint: list[str], cwd: str) -> str:
    """`ray job submit --working-dir .` from ``cwd``, waiting for the job; asserts that Ray
    reports it succeeded and returns what the CLI printed (the job's own output included)."""
    sid = f"selfcorrect-test-{secrets.token_hex(4)}"
    cmd = [RAY, "job", "submit", "--address", url, "--submission-id", sid]
    cmd += ["--working-dir", ".", "--", *entrypoint]
    t0 = time.time()
    while True:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
        logs = proc.stdout + proc.stderr
        # The head answers before its dashboard agent has registered (slow on a loaded
        # machine); Ray's own answer is "please try again later": nothing was submitted.
        if "No available agent to submit job" not in logs or time.time() - t0 > 300:
            break
        time.sleep(5)
    assert proc.returncode == 0, logs[-5000:]
    status = subprocess.run(
        [RAY, "job", "status", "--address", url, sid],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "succeeded" in (status.stdout + status.stderr).lower(), status.stdout + status.stderr
    return logs
