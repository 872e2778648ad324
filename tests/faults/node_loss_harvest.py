"""Fault scenario: a node running a harvest generation actor is removed mid-harvest.

Cluster: a CPU-less head + three 1-CPU worker nodes; the harvest uses a pool of two actors.
One actor stops on its first batch and the test removes its node. Ray Data must restart the
actor on the spare node and re-run its batches: the output has every (problem, sample)
exactly once and equals a clean harvest of the same model (greedy decoding).

    python tests/faults/node_loss_harvest.py [WORKDIR]
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter

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


def hang_once_actor(marker: str) -> type:
    """A GenerationActor that stops making progress on the first batch any actor sees."""
    from selfcorrect.generation import GenerationActor

    class HangOnceActor(GenerationActor):
        def __call__(self, batch):
            import ray

            try:  # the claim file stays: exactly one actor, once, ever hangs
                os.close(os.open(marker + ".claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return super().__call__(batch)
            node = ray.get_runtime_context().get_node_id()
            with open(marker + ".tmp", "w") as f:
                json.dump({"node_id": node, "pid": os.getpid()}, f)
            os.replace(marker + ".tmp", marker)
            while True:  # until the test removes this actor's node
                time.sleep(1.0)

    return HangOnceActor


def main() -> None:
    import pyarrow.parquet as pq

    from rayjobs.harvest import harvest
    from selfcorrect.models import build_model, save_model

    out = workdir()
    cfg = smoke_config(
        [
            "harvest.batch_size=8",
            "harvest.num_actors=2",
            "harvest.max_problems=32",
            "harvest.max_new_tokens=48",
            "harvest.splits=[test]",
            "data.n_test=32",
        ]
    )
    write_data(cfg, out)
    model_dir = os.path.join(out, "multiplication", "models", "ft")
    model, tok = build_model(cfg.model.preset, cfg.model.max_length, seed=cfg.seed)
    save_model(model, tok, model_dir)
    cluster = start_cluster([1, 1, 1])
    try:
        clean = harvest(cfg, "multiplication", model_dir, "ft", "test", out)
        marker = os.path.join(out, "hung")
        result: dict = {}

        def run() -> None:
            try:
                result["summary"] = harvest(
                    cfg,
                    "multiplication",
                    model_dir,
                    "faulty",
                    "test",
                    out,
                    actor_cls=hang_once_actor(marker),
                )
            except BaseException as e:  # reported by the main thread
                result["error"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        info = wait_for(lambda: read_marker(marker), "a generation actor to take a batch")
        cluster.remove_node(node_by_id(cluster, info["node_id"]), allow_graceful=False)
        print(f"[faults] removed node {info['node_id'][:12]} (a generation actor's)", flush=True)
        t.join(timeout=300)
        assert not t.is_alive(), "harvest did not finish within 300s after the node was removed"
        if "error" in result:
            raise AssertionError(f"harvest failed after losing a node: {result['error']!r}")

        def tables(summary: dict) -> tuple:
            return tuple(pq.read_table(os.path.join(out, a)) for a in summary["artifacts"])

        errors, outcomes = tables(result["summary"])
        clean_errors, clean_outcomes = tables(clean)
        pairs = Counter(
            zip(
                outcomes.column("problem_id").to_pylist(),
                outcomes.column("sample_index").to_pylist(),
                strict=True,
            )
        )
        assert len(pairs) == 32 and set(pairs.values()) == {1}, f"not every problem once: {pairs}"
        ids = errors.column("error_id").to_pylist()
        assert len(ids) == len(set(ids)), "duplicate error records"
        assert outcomes.drop(["model"]).equals(clean_outcomes.drop(["model"])), "outcomes differ"
        for col in ("problem_id", "step_index", "wrong_step", "gold_step"):
            assert errors.column(col).equals(clean_errors.column(col)), f"errors differ in {col}"
        print(f"[faults] node_loss_harvest: OK ({errors.num_rows} errors)", flush=True)
    finally:
        shutdown(cluster)


if __name__ == "__main__":
    main()
