"""Fault scenario: a node running a tune trial's training worker is removed mid-sweep.

Cluster: a CPU-less head + two 1-CPU worker nodes, so two trials train at once (one worker
each). Once a trial has written its first Ray Train checkpoint, the test removes a node whose
CPU is busy. The sweep must still finish: every trial done (Ray Train restarts the lost
worker from its checkpoint, or Tune retries the trial, which then resumes that checkpoint).

    python tests/faults/node_loss_tune.py [WORKDIR]
"""

from __future__ import annotations

import glob
import os
import threading

from common import shutdown, smoke_config, start_cluster, wait_for, workdir, write_data


def busy_worker_node(cluster) -> object | None:
    """A worker node with no free CPU right now (it hosts a training worker or an eval)."""
    from ray._private.state import available_resources_per_node

    free = available_resources_per_node()
    for node in cluster.worker_nodes:
        if free.get(node.node_id, {}).get("CPU", 0) < 1:
            return node
    return None


def main() -> None:
    import pyarrow.parquet as pq

    from rayjobs import tune
    from rayjobs.common import JobContext

    out = workdir()
    cfg = smoke_config(
        [
            "data.n_test=16",
            "train.num_workers=1",
            "train.cpus_per_worker=1",
            "train.zero_stage=0",
            "train.checkpoint_every=3",
            "train.max_failures=3",
            "tune.injection_rates=[0.1,0.5]",
            "tune.max_steps=12",
            "tune.eval_problems=4",
            "tune.val_examples=8",
            "eval.max_new_tokens=48",
        ]
    )
    write_data(cfg, out)
    cluster = start_cluster([1, 1])
    try:
        result: dict = {}

        def run() -> None:
            try:
                result["paths"] = tune.run(JobContext(cfg, out))
            except BaseException as e:  # reported by the main thread
                result["error"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        storage = os.path.join(out, "multiplication", "tune", "ray", "train")
        wait_for(
            lambda: glob.glob(os.path.join(storage, "*", "checkpoint_*")),
            "a trial's first Ray Train checkpoint",
        )
        victim = wait_for(lambda: busy_worker_node(cluster), "a busy worker node", timeout=60)
        assert t.is_alive(), "the sweep finished before a node could be removed"
        cluster.remove_node(victim, allow_graceful=False)
        print(f"[faults] removed node {victim.node_id[:12]} (busy with a trial)", flush=True)
        t.join(timeout=480)
        assert not t.is_alive(), "the sweep did not finish within 480s after the node was removed"
        if "error" in result:
            raise AssertionError(f"tune failed after losing a node: {result['error']!r}")
        df = pq.read_table(result["paths"][0]).to_pandas()
        assert sorted(df["injection_rate"]) == [0.1, 0.5], df
        assert (df["status"] == "done").all(), df[["injection_rate", "status", "error"]]
        print("[faults] node_loss_tune: OK", flush=True)
    finally:
        shutdown(cluster)


if __name__ == "__main__":
    main()
