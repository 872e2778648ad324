"""Open a run's MLflow store in the real MLflow UI, in headless Chromium, and check what it shows.

    .venv/bin/python scripts/mlflow_ui_check.py runs/smoke [--out mlflow-ui-check]

Why a browser: the store can be right while the UI shows nothing (a wrong artifact root, an
experiment the UI opens in its GenAI view, runs nested under a parent it cannot find). This
starts ``mlflow ui`` on the run's store, renders pages with Chromium (``apt install chromium``;
``$CHROMIUM`` names another binary), and checks the rendered text against the store read
through the MLflow client:

* the experiment's runs page lists the pipeline's parent run and the number of runs in it;
* each checked child run's page (trained models first) shows its parent and its metrics,
  by name.

Screenshots of every checked page are saved under ``--out``. Exit code 0 when every check
passes, 1 when one fails (the failing page's text is printed), 2 on bad input. Not part of CI:
it needs Chromium and about a minute for the UI server to start on 2 cores.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def store_uri(run_dir: str) -> str:
    """The embedded store of a run directory (see README, "Experiment tracking")."""
    db = os.path.join(os.path.abspath(run_dir), "mlruns", "mlflow.db")
    if not os.path.exists(db):
        raise SystemExit(
            f"error: no MLflow store at {db}; run the pipeline with tracking on "
            "(tracking.backend=mlflow, the default) into that directory first"
        )
    return f"sqlite:///{db}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"error: the MLflow UI did not answer {url} within {seconds:.0f}s")


def chromium() -> str:
    exe = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        raise SystemExit(
            "error: no Chromium found; install it (Debian/Ubuntu: apt install chromium) "
            "or name the binary in $CHROMIUM"
        )
    return exe


def render(url: str, screenshot: str) -> str:
    """The page's visible text after its JavaScript ran; saves a screenshot on the way."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={profile}",
            "--window-size=1600,1100",
            "--virtual-time-budget=20000",
            f"--screenshot={screenshot}",
            "--dump-dom",
            url,
        ]
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout
    dom = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run_dir", help="a pipeline output directory with tracking on")
    ap.add_argument("--out", default="mlflow-ui-check", help="where the screenshots go")
    ap.add_argument("--runs", type=int, default=3, help="child runs to open and check")
    args = ap.parse_args(argv)

    from mlflow import MlflowClient

    uri = store_uri(args.run_dir)
    client = MlflowClient(uri)
    experiments = client.search_experiments()
    if not experiments:
        raise SystemExit(f"error: the store {uri} holds no experiment")
    exp = experiments[0]
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    # Trained models first (their loss curve is what a researcher opens), then any other child.
    children = sorted(
        (r for r in runs if "mlflow.parentRunId" in r.data.tags and r.data.metrics),
        key=lambda r: ("loss" not in r.data.metrics, r.info.run_name),
    )
    if not parents or not children:
        raise SystemExit(f"error: experiment {exp.name!r} has no parent run or no child metrics")
    os.makedirs(args.out, exist_ok=True)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    mlflow_cli = os.path.join(os.path.dirname(sys.executable), "mlflow")
    server = subprocess.Popen(
        [mlflow_cli, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1"]
        + ["--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    failures: list[str] = []
    try:
        wait_for(f"{base}/health", 240)
        pages = [
            (
                "runs",
                f"{base}/#/experiments/{exp.experiment_id}/runs",
                [p.info.run_name for p in parents] + [f"{len(runs)} matching runs"],
            )
        ]
        for r in children[: args.runs]:
            metric = "loss" if "loss" in r.data.metrics else sorted(r.data.metrics)[0]
            parent = next(
                (
                    p.info.run_name
                    for p in runs
                    if p.info.run_id == r.data.tags["mlflow.parentRunId"]
                ),
                "",
            )
            pages.append(
                (
                    re.sub(r"[^A-Za-z0-9]+", "-", r.info.run_name),
                    f"{base}/#/experiments/{exp.experiment_id}/runs/{r.info.run_id}",
                    # The UI leaves some values out of its count (NaN), so no exact count.
                    [r.info.run_name, "Metrics (", metric, parent],
                )
            )
        for name, url, expected in pages:
            shot = os.path.join(args.out, f"{name}.png")
            text = render(url, shot)
            missing = [e for e in expected if e and e not in text]
            status = "ok" if not missing else f"MISSING {missing}"
            print(f"{name}: {url} -> {shot}: {status}")
            if missing:
                failures.append(f"{name}: {missing}\n  page text: {text[:1500]}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(
        f"{len(pages) - len(failures)}/{len(pages)} pages show what the store holds "
        f"(experiment {exp.name!r}, {len(runs)} runs); screenshots in {args.out}"
    )
    for f in failures:
        print(f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
