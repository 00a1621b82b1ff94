"""What a training job shows on its driver: one live progress line, not Ray's own chatter; and the
MLflow tracking URI decided once, in the driver, before any work."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from vidray.config import ConfigError

LINE = re.compile(r"^pretrain (\S+): step (\d+)/30 \(\d+%\) loss \d+\.\d{4} \d+\.\d examples/s ETA (\?|\d+:\d\d:\d\d)$")


def test_the_driver_shows_each_posted_step_once(ray_cluster, monkeypatch):
    import time

    from vidray.train.progress import live_progress

    monkeypatch.setenv("VIDRAY_PROGRESS_S", "0")
    out = io.StringIO()  # not a terminal: plain lines, no bar
    with live_progress("pretrain r", 30, stream=out) as board:
        for step in (1, 2, 30):
            board.post.remote({"step": step, "loss": 8.0 - step / 10, "examples_per_s": 12.5})
            deadline = time.monotonic() + 60  # the driver reads once a second; a loaded machine is slower
            while f"step {step}/30 " not in out.getvalue() and time.monotonic() < deadline:
                time.sleep(0.1)
    lines = out.getvalue().splitlines()
    assert [int(LINE.match(line)[2]) for line in lines] == [1, 2, 30]
    assert lines[0].endswith("ETA ?") and lines[-1].endswith("ETA 0:00:00")
    assert "\x1b[" not in out.getvalue() and "\r" not in out.getvalue()


def test_a_training_job_in_a_pipe_prints_progress_lines_and_no_ray_logs(ray_cluster, feature_sets, tmp_path):
    """`vidray pretrain` as a user runs it with its output piped to a file, joined to the session's
    cluster; MLflow is given as a relative sqlite path, which Ray's workers (in Ray's session dir)
    would resolve to another file: the driver decides one absolute URI for them."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token",
           "VIDRAY_PROGRESS_S": "2"}
    command = [sys.executable, "-m", "vidray.jobs.cli", "pretrain", os.path.join(REPO, "configs/demo/pretrain.yaml"),
               f"data.features={feature_sets['s3d']}", f"data.text={feature_sets['text']}",
               "data.clips_per_video=32", "train.steps=30", "train.batch_size=8", "optim.warmup_steps=5",
               "model.text_backbone=null", f"train.storage_path={tmp_path / 'runs'}",
               "mlflow.tracking_uri=sqlite:///runs.db", "mlflow.experiment=test-progress"]
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    progress = [m for m in map(LINE.match, out.stderr.splitlines()) if m]
    steps = [int(m[2]) for m in progress]
    assert len(steps) >= 2 and steps[-1] == 30 and steps == sorted(set(steps)), out.stderr
    assert any(m[3] != "?" for m in progress)  # an ETA once the rate is known
    # Rank 0's note, sent to the driver (vidray.notes.note): the workers' own logs stay off it.
    assert "[vidray] training from step 0 to 30 on 2 worker(s)" in out.stderr
    # Nothing of Ray's own at INFO, nothing forwarded from its actors, no cursor codes.
    noise = [line for line in out.stderr.splitlines()
             if " INFO " in line or "(RayTrainWorker" in line or "(TrainController" in line or "\x1b[" in line]
    assert noise == [], "\n".join(noise[:20])
    # The run is in the driver's file (tmp_path/runs.db), where the driver found it and tagged it.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs.db'}")
    run = client.search_runs([client.get_experiment_by_name("test-progress").experiment_id])[0]
    assert run.data.tags["checkpoint_uri"].endswith("checkpoint_00000030")
    # MLflow's Source column: the command, not the Ray worker's default_worker.py.
    assert run.data.tags["mlflow.source.name"].startswith("vidray pretrain ") and "train.steps=30" in \
        run.data.tags["mlflow.source.name"]
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 30
    # The gradient norm before clipping and the one the step used (optim.grad_clip: 2.0).
    norms = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "grad_norm")}
    clipped = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "grad_norm_clipped")}
    assert set(clipped) == set(norms) and all(clipped[s] == pytest.approx(min(norms[s], 2.0)) for s in norms)
    assert "chance_acc_video" in run.data.metrics


@pytest.fixture
def own_tracking_uri(monkeypatch):
    """MLflow's process-wide tracking URI (and the variable it sets), as the session had them after."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved = utils._tracking_uri
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    yield
    mlflow.set_tracking_uri(saved)


def test_quiet_logs_hold_for_mlflow_imported_after_ray_started():
    """MLflow sets its logger to INFO when first imported: a demo imports it after `init_ray` and
    printed "INFO mlflow.tracking.fluent: Experiment ... Creating a new experiment"."""
    code = ("import logging; from vidray.cluster import quiet_libraries; quiet_libraries(); import mlflow; "
            "print(logging.getLogger('mlflow.tracking.fluent').getEffectiveLevel())")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_LOGGING_LEVEL", "VIDRAY_VERBOSE")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == 30  # logging.WARNING


def test_the_tracking_uri_is_made_absolute_and_opened_once(tmp_path, monkeypatch, own_tracking_uri):
    from vidray.tracking import decide_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert decide_tracking_uri(None, "test-decide") == f"sqlite:///{tmp_path / 'mlflow.db'}"  # MLflow's default
    uri = decide_tracking_uri("sqlite:///here.db", "test-decide")
    assert uri == f"sqlite:///{tmp_path / 'here.db'}" and (tmp_path / "here.db").exists()
    # MLflow 3 refuses a folder store: said at once by the driver, not by every retry of rank 0.
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError, match=r"mlflow.tracking_uri.*cannot use .*mlruns.*sqlite:////absolute"):
        decide_tracking_uri("mlruns", "test-decide")


def test_a_local_store_on_a_multi_node_cluster_is_refused(tmp_path, stack, own_tracking_uri):
    from vidray.tracking import decide_tracking_uri

    with pytest.raises(ConfigError, match=r"3 nodes: each would log to a store of its own.*MLFLOW_TRACKING_URI"):
        decide_tracking_uri(f"sqlite:///{tmp_path / 'x.db'}", "test-decide", nodes=3)
    server = stack.env["MLFLOW_TRACKING_URI"]  # a server every node reaches: fine on any cluster
    assert decide_tracking_uri(server, "test-decide", nodes=3) == server


def test_a_jobs_stdout_holds_its_json_report_alone(ray_cluster, feature_sets, tmp_path, capsys):
    """Ray prints to the driver's sys.stdout, looked up at each print, from its own threads (a
    raylet's "worker processes have been started" warning once landed inside `vidray finetune`'s
    JSON, under load). A thread that prints the same way while the job runs stands in for Ray: its
    lines must reach stderr and stdout must parse as the report."""
    import json
    import threading

    from vidray.jobs.cli import main

    stop, terminal = threading.Event(), sys.stdout

    def chatter():
        while not stop.is_set():
            target = sys.stdout   # what Ray's print would write to now
            if target is not terminal:  # from inside main() only: before and after it, stdout is stdout
                print("(raylet) WARNING: 8 PYTHON worker processes have been started", file=target)
            stop.wait(0.01)

    thread = threading.Thread(target=chatter, daemon=True)
    thread.start()
    try:
        # A real extraction (seconds of Ray Data: frames decodes; text would take a fraction of one
        # in the driver) for the chatter to run beside.
        rc = main(["extract", f"manifest={feature_sets['manifest']}", f"root={tmp_path}", "extractor=frames",
                   "frames.num_frames=2", "frames.size=32", "limit=2"])
    finally:
        stop.set()
        thread.join()
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    assert json.loads(captured.out)["uri"].startswith(str(tmp_path))
    assert "(raylet) WARNING" in captured.err


def test_rays_worker_startup_warning_is_dropped_and_its_other_messages_kept():
    """Ray's driver prints what its raylets address to the driver on sys.stdout, line by line
    through print() (the "(raylet)" prefix in colour); the worker-startup warning of every job on
    a small machine is dropped, the rest passes as it came."""
    from vidray.cluster import WithoutRayNoise

    out = io.StringIO()
    stream = WithoutRayNoise(out)
    print("\x1b[33m(raylet)\x1b[0m WARNING: 12 PYTHON worker processes have been started on node: 0e54 with "
          "address: 192.0.2.2, which is 6x the maximum expected startup concurrency (2).", file=stream)
    print("\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task", file=stream)
    print("", file=stream)
    assert out.getvalue() == "\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task\n\n"
    assert stream.isatty() is False and stream.getvalue() == out.getvalue()  # the rest is the stream's
