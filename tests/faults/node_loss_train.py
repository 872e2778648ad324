"""Fault scenario: the node running the Ray Train worker is removed mid-training.

Cluster: a CPU-less head + two 1-CPU worker nodes. The one training worker stops at step 6
(after the step-4 checkpoint) and the test removes its node. ``FailureConfig`` must restart
the worker group on the surviving node, resume at step 4 and finish all 10 steps.

    python tests/faults/node_loss_train.py [WORKDIR]
"""

from __future__ import annotations

import json
import os
import threading
import time

from common import (
    node_by_id,
    read_marker,
    shutdown,
    smoke_config,
    start_cluster,
    wait_for,
    workdir,
    write_data,
)


def main() -> None:
    out = workdir()
    cfg = smoke_config(
        [
            "train.num_workers=1",
            "train.cpus_per_worker=1",
            "train.zero_stage=0",
            "train.max_steps=10",
            "train.checkpoint_every=4",
            "train.log_every=2",
            "train.max_failures=2",
        ]
    )
    write_data(cfg, out)
    cluster = start_cluster([1, 1])
    try:
        from rayjobs import train

        marker = os.path.join(out, "hung")
        model_dir = os.path.join(out, "model")
        result: dict = {}

        def fit() -> None:
            try:
                result["last"] = train.train_one(
                    cfg,
                    "multiplication",
                    "ft",
                    model_dir,
                    train_path=train.data_path(out, "multiplication"),
                    crash={"rank": 0, "step": 6, "marker": marker, "mode": "hang"},
                )
            except BaseException as e:  # reported by the main thread
                result["error"] = e

        t = threading.Thread(target=fit, daemon=True)
        t.start()
        info = wait_for(lambda: read_marker(marker), "the training worker to reach step 6")
        time.sleep(5)  # let the controller register the step-4 checkpoint the worker reported
        victim = node_by_id(cluster, info["node_id"])
        cluster.remove_node(victim, allow_graceful=False)
        print(f"[faults] removed node {info['node_id'][:12]} (the training worker's)", flush=True)
        t.join(timeout=420)
        assert not t.is_alive(), "training did not finish within 420s after the node was removed"
        if "error" in result:
            raise AssertionError(f"training failed after losing a node: {result['error']!r}")
        assert result["last"]["step"] == 10, result["last"]
        state = json.load(open(os.path.join(model_dir, "train_state.json")))
        assert state["resumed_at"] == [4], f"expected one resume at step 4, got {state}"
        hist = json.load(open(os.path.join(model_dir, "metrics.json")))
        steps = [h["step"] for h in hist]
        assert steps == [2, 4, 6, 8, 10], f"steps lost or repeated: {steps}"
        assert os.path.exists(os.path.join(model_dir, "model.safetensors"))
        print("[faults] node_loss_train: OK", flush=True)
    finally:
        shutdown(cluster)


if __name__ == "__main__":
    main()
