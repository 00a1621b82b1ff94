"""Faults a week-long job meets, caused for real against jobs submitted to the session's Ray
cluster: the S3 endpoint answering 503 and then going away mid-extraction (the job waits and
commits every video once, quarantining none), staying away (a clear error, no committed version,
a rerun finishes it), and the MLflow server going away mid-training (training goes on, every
metric arrives once, the run ends FINISHED).

The endpoint's clients talk to it through a TCP front (tests/faults.py) that is taken down and
brought back: moto keeps its objects in memory, so restarting moto itself would lose them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid

import pytest

from conftest import REPO
from faults import TcpFront
from vidray import storage
from vidray.cluster import _client, submit
from vidray.data.manifest import read_manifest
from vidray.data.synth import SynthConfig, synthesize
from vidray.feature_store import store

VIDEOS = 12


@pytest.fixture(scope="module")
def corpus(stack):
    root = f"s3://{stack.bucket}/faults-corpus"
    synthesize(root, SynthConfig(videos=VIDEOS, seed=21, min_seconds=2.0, max_seconds=3.0, workers=2),
               progress=False)
    return {"manifest": storage.join(root, "manifest.parquet"),
            "ids": set(read_manifest(storage.join(root, "manifest.parquet"))["video_id"].to_pylist())}


@pytest.fixture
def jobs(ray_cluster, monkeypatch):
    """A client of the session cluster's job server (token auth, as Ray's local clusters use)."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    return _client(os.environ["RAY_API_SERVER_ADDRESS"])


def _submit(command: list[str], **env: str) -> str:
    """Submit ``vidray COMMAND`` with ``env`` in its runtime env (as `vidray submit` forwards it
    from the submitting shell); the nodes keep the credentials."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        return submit(command, os.environ["RAY_API_SERVER_ADDRESS"], working_dir=None, wait=False,
                      say=lambda m: None)["job_id"]


def _wait_until(condition, timeout_s: float, what: str, jobs=None, job_id: str | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        logs = jobs.get_job_logs(job_id)[-3000:] if jobs else ""
        assert time.monotonic() < deadline, f"no {what} after {timeout_s:.0f} s\n{logs}"
        if jobs is not None:
            assert str(jobs.get_job_status(job_id).value) in ("PENDING", "RUNNING"), f"ended before {what}\n{logs}"
        time.sleep(0.2)


def _end(jobs, job_id: str, timeout_s: float = 400) -> tuple[str, str]:
    deadline = time.monotonic() + timeout_s
    while (status := str(jobs.get_job_status(job_id).value)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, jobs.get_job_logs(job_id)[-3000:]
        time.sleep(1.0)
    return status, jobs.get_job_logs(job_id)


def _parts(root: str) -> list[str]:
    fs, path = storage.filesystem(root)
    return fs.glob(f"{path}/frames/*/part-*.parquet")


def _extract_config(tmp_path, corpus, root: str) -> str:
    preset = tmp_path / "extract.yaml"
    preset.write_text(f"manifest: {corpus['manifest']}\nroot: {root}\nextractor: frames\n"
                      "frames: {num_frames: 8, size: 64}\nvideos_per_part: 1\nnum_workers: 1\n")
    return str(preset)


def _check_exactly_once(root: str, ids: set[str]) -> store.FeatureSet:
    (entry,) = store.list_sets(root)
    assert entry["committed"] and store.validate(entry["uri"])["ok"]
    feature_set = store.open_version(entry["uri"])
    keys = [(r["video_id"], r["clip_index"]) for uri in feature_set.part_uris
            for r in store.read_parquet(uri, columns=["video_id", "clip_index"]).to_pylist()]
    assert len(keys) == len(set(keys)) and {k[0] for k in keys} == ids
    return feature_set


@contextlib.contextmanager
def _front(port: int):
    front = TcpFront(port).up()
    try:
        yield front
    finally:
        front.down()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


@pytest.mark.heavy
@pytest.mark.timeout(600)
def test_extraction_waits_out_an_s3_outage_and_commits_every_video_once(jobs, corpus, stack, tmp_path):
    root = f"s3://{stack.bucket}/faults-{uuid.uuid4().hex[:8]}"
    with _front(_port(stack.env["AWS_ENDPOINT_URL"])) as s3:
        job_id = _submit(["extract", _extract_config(tmp_path, corpus, root)], AWS_ENDPOINT_URL=s3.url)
        _wait_until(lambda: _parts(root), 240, "first part", jobs, job_id)
        # Mid-job: 503 SlowDown for a while, then nothing listening at all, for longer than the
        # S3 clients' own retries last (about 10 s), then back.
        s3.errors()
        time.sleep(4)
        s3.down()
        time.sleep(20)
        assert str(jobs.get_job_status(job_id).value) == "RUNNING", jobs.get_job_logs(job_id)[-3000:]
        s3.up()
        status, logs = _end(jobs, job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "storage unreachable" in logs and "try 2 in" in logs, "the outage never reached the job"
    # Every video once; a video the job could not fetch during the outage was waited for, not quarantined.
    feature_set = _check_exactly_once(root, corpus["ids"])
    assert feature_set.manifest["quarantined"] == 0 and feature_set.quarantine().num_rows == 0


@pytest.mark.heavy
@pytest.mark.timeout(600)
def test_storage_that_stays_down_fails_the_job_clearly_and_a_rerun_completes_it(jobs, corpus, stack, tmp_path):
    root = f"s3://{stack.bucket}/faults-{uuid.uuid4().hex[:8]}"
    preset = _extract_config(tmp_path, corpus, root)
    with _front(_port(stack.env["AWS_ENDPOINT_URL"])) as s3:
        job_id = _submit(["extract", preset], AWS_ENDPOINT_URL=s3.url, VIDRAY_STORAGE_RETRY_S="8")
        _wait_until(lambda: _parts(root), 240, "first part", jobs, job_id)
        s3.down()
        status, logs = _end(jobs, job_id)
        assert status == "FAILED", logs[-4000:]
        # One line naming what it could not reach, the endpoint and what to do.
        (line,) = [line for line in logs.splitlines() if line.startswith("vidray extract: StorageUnreachable")]
        assert "storage unreachable for 8 s" in line and s3.url in line and "stays uncommitted" in line, line
        assert "then rerun" in line
        # No partial version: nothing a reader would open.
        (entry,) = store.list_sets(root)
        assert not entry["committed"]
        written = len(_parts(root))
        assert 1 <= written < VIDEOS

        s3.up()
        again = _submit(["extract", preset], AWS_ENDPOINT_URL=s3.url)
        status, logs = _end(jobs, again)
    assert status == "SUCCEEDED", logs[-4000:]
    assert f"{written} of {VIDEOS} parts already written" in logs
    report = json.loads(logs[logs.index("{\n"):].split("\n}")[0] + "\n}")
    assert report["skipped_parts"] == written and report["extracted_videos"] == VIDEOS - written
    _check_exactly_once(root, corpus["ids"])


@pytest.mark.heavy
@pytest.mark.timeout(600)
def test_training_goes_on_while_mlflow_is_down_and_every_metric_arrives_once(jobs, feature_sets, stack, tmp_path):
    import mlflow

    steps, experiment = 150, f"faults-{uuid.uuid4().hex[:8]}"
    storage_path = str(tmp_path / "runs")
    with _front(_port(stack.env["MLFLOW_TRACKING_URI"])) as tracking:
        job_id = _submit(["pretrain", os.path.join(REPO, "configs", "demo", "pretrain.yaml"),
                          f"data.features={feature_sets['s3d']}", f"data.text={feature_sets['text']}",
                          "data.clips_per_video=32", f"train.steps={steps}", "train.batch_size=8",
                          "model.text_backbone=null", "optim.lr=1e-3",  # the tiny BERT: the preset's MiniLM is slow here
                          "train.checkpoint_every=10", "train.log_every=10", "optim.warmup_steps=5",
                          f"train.storage_path={storage_path}", f"mlflow.experiment={experiment}",
                          f"mlflow.tracking_uri={tracking.url}"])
        client = mlflow.MlflowClient()  # straight to the server, not through the front

        def logged() -> list:
            found = mlflow.get_experiment_by_name(experiment)
            runs = client.search_runs([found.experiment_id]) if found else []
            return client.get_metric_history(runs[0].info.run_id, "loss") if runs else []
        _wait_until(lambda: len(logged()) >= 5, 300, "5 logged steps", jobs, job_id)
        tracking.down()
        down_at = len(logged())

        def checkpoints() -> list[str]:
            return sorted(n for r in os.listdir(storage_path) for n in os.listdir(os.path.join(storage_path, r))
                          if re.fullmatch(r"checkpoint_\d{8}", n)) if os.path.isdir(storage_path) else []
        # Training goes on without its tracking server: checkpoints well past the last logged step.
        _wait_until(lambda: checkpoints() and int(checkpoints()[-1][11:]) >= down_at + 30, 300,
                    "training progress while MLflow is down", jobs, job_id)
        assert len(logged()) == down_at
        time.sleep(3)
        tracking.up()
        status, logs = _end(jobs, job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "is not answering" in logs and "answers again" in logs, logs[-4000:]
    history = logged()
    assert sorted(m.step for m in history) == list(range(1, steps + 1))  # each step once
    (run,) = client.search_runs([mlflow.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint_uri"].endswith(f"checkpoint_{steps:08d}")

