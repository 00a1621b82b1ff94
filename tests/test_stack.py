"""`vidray stack up|status|down`: real processes, real HTTP, and down stops only what up started."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import urllib.request

from conftest import REPO
from vidray import stack as local_stack


def vidray(*args):
    return subprocess.run([sys.executable, "-m", "vidray.jobs.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=180)


def test_stack_up_status_down_through_the_cli(tmp_path, stack):
    directory = str(tmp_path / "stack")
    try:
        _up_status_down(directory, stack)
    finally:  # never leak servers when an assertion fails half-way
        local_stack.down(directory)


def _up_status_down(directory, stack):
    up = vidray("stack", "up", "--dir", directory, "--bucket", "bucket-one")
    assert up.returncode == 0, up.stderr
    env = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines())
    assert set(env) >= {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                        "MLFLOW_TRACKING_URI"}
    assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    # The hint names this stack's dir: `vidray stack env` alone would look in the default one.
    assert f'eval "$(vidray stack env --dir {directory})"' in up.stderr
    info = local_stack.load(directory)
    pids = {name: s.pid for name, s in info.services.items()}

    # Real HTTP: MLflow answers its health check and its REST API; the bucket exists on S3.
    with urllib.request.urlopen(env["MLFLOW_TRACKING_URI"] + "/health", timeout=5) as resp:
        assert resp.status == 200
    req = urllib.request.Request(env["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search",
                                 data=json.dumps({"max_results": 5}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert "experiments" in json.loads(resp.read())
    import s3fs

    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
    assert "bucket-one" in fs.ls("")
    fs.pipe("bucket-one/corpus/videos/v0.mp4", b"not really a video")

    status = vidray("stack", "status", "--dir", directory)
    assert status.returncode == 0 and status.stdout.count("healthy") == 2

    again = vidray("stack", "up", "--dir", directory)  # idempotent: reuses the healthy stack
    assert again.returncode == 0 and local_stack.load(directory).services["s3"].pid == pids["s3"]

    down = vidray("stack", "down", "--dir", directory)
    assert down.returncode == 0 and "s3" in down.stdout and "mlflow" in down.stdout
    for pid in pids.values():
        assert not local_stack._alive(pid)
    assert vidray("stack", "status", "--dir", directory).returncode == 1
    # moto keeps objects in memory: `down` saved them, the next `up` puts them back.
    saved = pathlib.Path(directory) / "s3" / "bucket-one" / "corpus" / "videos" / "v0.mp4"
    assert saved.read_bytes() == b"not really a video"
    back = vidray("stack", "up", "--dir", directory, "--bucket", "bucket-one")
    assert back.returncode == 0, back.stderr
    url = local_stack.load(directory).services["s3"].url
    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": url})
    assert fs.cat("bucket-one/corpus/videos/v0.mp4") == b"not really a video"
    assert vidray("stack", "down", "--dir", directory).returncode == 0
    # The session's own stack (another directory) is untouched.
    assert all(s["healthy"] for s in local_stack.status(stack.directory).values())


def test_down_never_signals_a_process_it_did_not_start(tmp_path):
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        fake = local_stack.StackInfo(directory=str(tmp_path), bucket="x", services={
            "s3": local_stack.Service("s3", bystander.pid, 1, "http://127.0.0.1:1", str(tmp_path / "log"))})
        local_stack._save(fake)
        assert local_stack.down(str(tmp_path)) == []
        assert bystander.poll() is None  # still running: its cmdline is not moto's
    finally:
        bystander.kill()
        bystander.wait()


def test_status_of_a_directory_without_a_stack(tmp_path):
    assert local_stack.status(str(tmp_path)) == {}
    proc = vidray("stack", "env", "--dir", str(tmp_path))
    assert proc.returncode == 1 and "vidray stack up" in proc.stderr
