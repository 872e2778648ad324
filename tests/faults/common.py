"""Shared by the multi-node fault scenarios: a private ``ray.cluster_utils.Cluster`` on loopback.

Each scenario script runs in its own process (the pytest process already holds a ``ray.init``)
with its own ``RAY_TMPDIR``, so it can neither join nor disturb another Ray instance on the
machine. Scenarios exit 0 on success and raise (non-zero exit) with a message on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = str(Path(__file__).resolve().parents[2])
sys.path.insert(0, REPO)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.pop("RAY_ADDRESS", None)  # never join someone else's cluster
# One token for every process of this cluster: ~/.ray/auth_token is shared with (and may be
# regenerated or removed by) any other Ray user on the machine.
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
# A raylet waits 15s for its (Python) dashboard agent and then dies; on a loaded 2-core
# machine the agent can take longer to import, so give it a minute.
os.environ.setdefault("RAY_agent_register_timeout_ms", "60000")


def start_cluster(worker_cpus: list[int], head_cpus: int = 0) -> Any:
    """A head (no CPUs by default: it only hosts the driver side) plus one raylet per entry."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=False)
    _retry(lambda: cluster.add_node(num_cpus=head_cpus, include_dashboard=False), "head")
    for n in worker_cpus:
        _retry(lambda n=n: cluster.add_node(num_cpus=n), "worker node")
    env = {"env_vars": {"DS_ACCELERATOR": "cpu", "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}}
    ray.init(address=cluster.address, runtime_env=env, log_to_driver=False)
    cluster.wait_for_nodes()
    return cluster


def _retry(start: Callable[[], Any], what: str, attempts: int = 3) -> Any:
    """Ray gives a raylet 30s (hard-coded) to register; on a loaded 2-core machine a start
    can miss that, so try again rather than fail the scenario on start-up."""
    for i in range(attempts):
        try:
            return start()
        except Exception as e:
            if i == attempts - 1:
                raise
            print(f"[faults] starting the {what} failed ({e}); retrying", flush=True)
            time.sleep(5)
    return None


def node_by_id(cluster: Any, node_id: str) -> Any:
    for node in cluster.worker_nodes:
        if node.node_id == node_id:
            return node
    raise AssertionError(f"node {node_id} is not a worker node of this cluster (the head?)")


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 300.0) -> Any:
    """Poll until ``cond()`` is truthy; fail naming ``what`` after ``timeout`` seconds."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = cond()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def read_marker(path: str) -> dict[str, Any] | None:
    return json.loads(Path(path).read_text()) if os.path.exists(path) else None


def smoke_config(overrides: list[str]) -> Any:
    from selfcorrect.config import load_config

    base = ["tasks=[multiplication]"]
    return load_config(os.path.join(REPO, "configs", "smoke.yaml"), base + overrides)


def workdir() -> str:
    return sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="faults-")


def write_data(cfg: Any, out: str) -> None:
    from rayjobs import data
    from rayjobs.common import JobContext

    data.run(JobContext(cfg, out))


def shutdown(cluster: Any) -> None:
    """Disconnect and stop every node; on a failed scenario (a Ray call still running in a
    thread), kill the nodes' processes outright so nothing outlives the script."""
    import ray

    ray.shutdown()
    try:
        cluster.shutdown()
    except Exception:
        for node in cluster.list_all_nodes():
            with contextlib.suppress(Exception):
                node.kill_all_processes(check_alive=False, allow_graceful=False)
