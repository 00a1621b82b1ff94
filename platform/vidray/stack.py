"""The embedded local stack: an S3-compatible endpoint and an MLflow tracking server on 127.0.0.1.

`vidray stack up` starts both as background processes (moto in server mode, `mlflow server` with a
sqlite backend and an artifact root under the stack directory, absolute paths), creates the
bucket, and records pids and ports in ``<dir>/stack.json``. `down` stops exactly the processes it
started; `status` health-checks them over HTTP. The test suite uses the same functions as its
session fixture, so what the tests exercise is what users run.

On a real cluster none of this runs: point ``AWS_ENDPOINT_URL``/credentials at real S3 and
``MLFLOW_TRACKING_URI`` at the team's server instead.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field


HOST = "127.0.0.1"
# moto accepts any credentials; these are not secrets, just what the local endpoint is told.
LOCAL_KEY_ID = "vidray-local"
LOCAL_SECRET = "vidray-local-secret"
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".vidray", "stack")


class StackError(RuntimeError):
    """A local service failed to start or stop; the message names it and where its log is."""


@dataclass
class Service:
    name: str
    pid: int
    port: int
    url: str
    log: str


@dataclass
class StackInfo:
    directory: str
    bucket: str
    services: dict[str, Service] = field(default_factory=dict)
    persist: bool = False  # the bucket's objects saved to <directory>/s3/ by `down`, put back by `up`

    @property
    def env(self) -> dict[str, str]:
        """The environment that points vidray (and boto/s3fs/mlflow) at this stack."""
        return {
            "AWS_ENDPOINT_URL": self.services["s3"].url,
            "AWS_ACCESS_KEY_ID": LOCAL_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": LOCAL_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_TRACKING_URI": self.services["mlflow"].url,
            "VIDRAY_BUCKET": f"s3://{self.bucket}",
        }

    def export_lines(self) -> str:
        return "\n".join(f"export {k}={v}" for k, v in self.env.items())


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _state_path(directory: str) -> str:
    return os.path.join(directory, "stack.json")


def load(directory: str = DEFAULT_DIR) -> StackInfo | None:
    """The stack recorded in ``directory``, or None when none was started there."""
    try:
        with open(_state_path(directory)) as f:
            raw = json.load(f)
    except FileNotFoundError:
        return None
    services = {k: Service(**v) for k, v in raw["services"].items()}
    return StackInfo(directory=raw["directory"], bucket=raw["bucket"], services=services,
                     persist=raw.get("persist", False))


def _save(info: StackInfo) -> None:
    with open(_state_path(info.directory), "w") as f:
        json.dump(asdict(info), f, indent=2)


def _spawn(name: str, argv: list[str], directory: str, port: int, url: str, env: dict | None = None) -> Service:
    log = os.path.join(directory, f"{name}.log")
    with open(log, "ab") as out:
        # A new session so `down` can stop the server's worker processes with it.
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=directory,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    with open(os.path.join(directory, f"{name}.pid"), "w") as f:
        f.write(str(proc.pid))
    return Service(name=name, pid=proc.pid, port=port, url=url, log=log)


def _healthy(service: Service) -> bool:
    path = "/health" if service.name == "mlflow" else "/moto-api/"
    try:
        with urllib.request.urlopen(service.url + path, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_healthy(service: Service, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _healthy(service):
            return
        if not _alive(service.pid):
            break
        time.sleep(0.25)
    tail = open(service.log, errors="replace").read()[-1500:]
    raise StackError(f"{service.name} did not become healthy at {service.url} "
                     f"(log {service.log}):\n{tail}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _is_ours(service: Service) -> bool:
    """Guard against pid reuse: only signal a process whose command line is the one we started."""
    try:
        with open(f"/proc/{service.pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
    except OSError:
        return _alive(service.pid)  # no /proc (macOS): trust the pid file
    return ("moto" if service.name == "s3" else "mlflow") in cmdline


def _s3_client(info: StackInfo):
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3", endpoint_url=info.services["s3"].url, region_name="us-east-1",
        aws_access_key_id=LOCAL_KEY_ID, aws_secret_access_key=LOCAL_SECRET)


def _create_bucket(info: StackInfo) -> None:
    client = _s3_client(info)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if info.bucket not in existing:
        client.create_bucket(Bucket=info.bucket)


def saved_objects_dir(info: StackInfo) -> str:
    return os.path.join(info.directory, "s3", info.bucket)


def save_objects(info: StackInfo) -> int:
    """Copy every object of the bucket to :func:`saved_objects_dir` (replacing the last copy);
    returns how many. Why: moto keeps objects in memory, and a stopped stack would lose them."""

    client, target = _s3_client(info), saved_objects_dir(info)
    partial = target + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=info.bucket):
        for item in page.get("Contents", []):
            if item["Key"].endswith("/"):  # a folder marker: folders come back with their files
                continue
            path = os.path.join(partial, item["Key"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as out:
                shutil.copyfileobj(client.get_object(Bucket=info.bucket, Key=item["Key"])["Body"], out)
            count += 1
    shutil.rmtree(target, ignore_errors=True)
    os.rename(partial, target)  # the old copy is replaced only by a whole new one
    return count


def restore_objects(info: StackInfo) -> int:
    """Put the objects :func:`save_objects` saved back into the bucket; returns how many."""
    client, source = _s3_client(info), saved_objects_dir(info)
    count = 0
    for folder, _, files in os.walk(source):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as body:
                client.put_object(Bucket=info.bucket, Key=os.path.relpath(path, source).replace(os.sep, "/"),
                                  Body=body)
            count += 1
    return count


def up(directory: str = DEFAULT_DIR, bucket: str = "vidray", timeout_s: float = 90.0,
       mlflow_dir: str | None = None, persist: bool = False) -> StackInfo:
    """Start the S3 endpoint and the MLflow server (or return the healthy ones already running).

    State, pids and logs go to ``directory``; the MLflow sqlite database and artifacts to
    ``mlflow_dir`` (default: ``directory``), so they outlive the stack. The S3 endpoint keeps its
    objects in memory: with ``persist``, `down` saves them under ``directory/s3/`` and `up` puts
    them back (`vidray stack` and the demo; a test session's stack starts empty every time).
    """
    directory = os.path.abspath(directory)
    mlflow_dir = os.path.abspath(mlflow_dir or directory)
    os.makedirs(directory, exist_ok=True)
    current = load(directory)
    if current and all(_healthy(s) for s in current.services.values()):
        return current
    if current:
        down(directory)
    s3_port, mlflow_port = free_port(), free_port()
    artifacts = os.path.join(mlflow_dir, "artifacts")
    os.makedirs(artifacts, exist_ok=True)
    info = StackInfo(directory=directory, bucket=bucket, persist=persist)
    info.services["s3"] = _spawn(
        "s3", [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(s3_port)],
        directory, s3_port, f"http://{HOST}:{s3_port}")
    info.services["mlflow"] = _spawn(
        "mlflow",
        [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(mlflow_port),
         "--workers", "1",
         "--backend-store-uri", f"sqlite:///{os.path.join(mlflow_dir, 'mlflow.db')}",
         "--artifacts-destination", artifacts],
        directory, mlflow_port, f"http://{HOST}:{mlflow_port}",
        # MLflow 3's server jobs (GenAI scorers, trace roll-ups) start seven huey consumers with
        # 47 worker threads; tracking runs needs none of them, and on 2 cores they slow its start.
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    _save(info)
    try:
        for service in info.services.values():
            _wait_healthy(service, timeout_s)
        _create_bucket(info)
        if persist:
            restore_objects(info)
    except BaseException:  # Ctrl-C while waiting too: nothing started may outlive the call
        down(directory, save=False)  # a half-restored bucket must not replace the saved copy
        raise
    return info


def _stop(service: Service, timeout_s: float = 15.0) -> bool:
    if not _alive(service.pid) or not _is_ours(service):
        return False
    try:
        os.killpg(service.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(service.pid):
        time.sleep(0.1)
    if _alive(service.pid):
        os.killpg(service.pid, signal.SIGKILL)
    try:  # reap it when it is our own child (tests start the stack in-process)
        os.waitpid(service.pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return True


def down(directory: str = DEFAULT_DIR, save: bool = True) -> list[str]:
    """Stop the services recorded in ``directory`` (a persisting stack's objects saved first,
    unless not ``save``); returns the names of those stopped."""
    info = load(os.path.abspath(directory))
    if info is None:
        return []
    try:
        if save and info.persist and _healthy(info.services["s3"]):
            save_objects(info)  # a second Ctrl-C here leaves the last whole copy, and still stops
    finally:
        stopped = [name for name, service in info.services.items() if _stop(service)]
        for name in info.services:
            pid_file = os.path.join(info.directory, f"{name}.pid")
            if os.path.exists(pid_file):
                os.remove(pid_file)
        os.remove(_state_path(info.directory))
    return stopped


def status(directory: str = DEFAULT_DIR) -> dict[str, dict]:
    """{service: {pid, url, alive, healthy}} for the stack in ``directory`` (empty if none)."""
    info = load(os.path.abspath(directory))
    if info is None:
        return {}
    return {name: {"pid": s.pid, "url": s.url, "alive": _alive(s.pid), "healthy": _healthy(s)}
            for name, s in info.services.items()}
