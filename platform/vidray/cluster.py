"""Submitting vidray jobs to a Ray cluster, and which environment reaches them how.

A job's runtime env (``env_vars``, ``working_dir``) is job metadata: anyone who can list the
cluster's jobs reads it, and the working dir is uploaded as a package to the cluster's storage.
So settings that are not secret travel with the job (:data:`FORWARDED_ENV`), and credentials
(:data:`SECRET_ENV`) reach the nodes from their own environment only (an instance role, a
Kubernetes Secret, the cluster launcher's env file; infra/). The manifests in infra/ follow the
same two lists (tests/test_infra.py).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
from typing import Callable

from vidray import notes
from vidray.config import ConfigError, redact

# Where a job logs and stores: forwarded from the submitting shell into the job's runtime env.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "VIDRAY_STORAGE_RETRY_S", "VIDRAY_MLFLOW_FLUSH_S", "VIDRAY_PROGRESS_S")
# Credentials: never in a runtime env, a working dir, MLflow params or a checkpoint.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def verbose() -> bool:
    """``vidray --verbose``: Ray's, Ray Data's and Tune's own output in full."""
    return os.environ.get("VIDRAY_VERBOSE") == "1"


def quiet_libraries() -> None:
    """Ray Data's and MLflow's loggers at WARNING, in this process and (through the environment)
    in the workers, whether or not they are imported yet."""

    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # read when ray.data is imported
    logging.getLogger("ray.data").setLevel(os.environ["RAY_DATA_LOG_LEVEL"])  # if it already was
    # Its sqlite set-up, "creating experiment": MLflow sets its logger's level when it is first
    # imported (INFO unless MLFLOW_LOGGING_LEVEL says otherwise); a demo imports it after Ray is up.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])  # if it already was


class WithoutRayNoise:
    """A text stream passing on all but Ray's known-benign driver warnings. Ray prints the
    messages its raylets address to the driver on ``sys.stdout`` whatever ``log_to_driver`` says;
    on a small machine running Ray Data and Ray Train side by side, "N PYTHON worker processes have
    been started ... the maximum expected startup concurrency" is one of them, every job, with
    nothing for the user to do. Other raylet messages (a worker killed for memory, ...) still show."""

    NOISE = ("PYTHON worker processes have been started on node",)

    def __init__(self, stream):
        self.stream, self._dropped = stream, False

    def write(self, text: str) -> int:
        if any(noise in text for noise in self.NOISE):
            self._dropped = True
            return len(text)
        if self._dropped and text == "\n":  # print() writes the line's end apart
            self._dropped = False
            return len(text)
        self._dropped = False
        return self.stream.write(text)

    def __getattr__(self, name: str):  # flush, isatty, fileno, encoding: the stream's own
        return getattr(self.stream, name)


def init_ray(**kwargs) -> None:
    """``ray.init(**kwargs)``, keeping the process's SIGTERM handler and, unless :func:`verbose`,
    Ray's own output to warnings.

    Why the handler: ray.init installs a native one that aborts the driver on SIGTERM, so no
    ``finally`` runs and what the job started (the demo's local S3 and MLflow servers, a local
    Ray) outlives it. The `vidray` command turns SIGTERM into an exception that unwinds.
    Why quiet: of a demo's 349 terminal lines, 37 were ours; the rest were Ray Data's INFO lines
    and progress bars, Ray Train's controller and workers, and Ray's start-up. Forwarding the
    workers' logs at WARNING does not help: Ray Train and Ray Data print much of it. So workers'
    logs stay in their files, and what a worker must tell the user reaches the driver as a
    :func:`vidray.notes.note`; training's progress comes through :mod:`vidray.train.progress`. Ray Data's
    progress bars show on a terminal only (in a pipe they are INFO lines).
    """

    import ray

    if not verbose():
        quiet_libraries()
        kwargs.setdefault("log_to_driver", False)
        kwargs.setdefault("logging_level", logging.WARNING)
        if not isinstance(sys.stdout, WithoutRayNoise):
            sys.stdout = WithoutRayNoise(sys.stdout)
    notes.in_driver()
    keep = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if keep else None
    ray.init(**kwargs)
    if keep and handler is not None:
        signal.signal(signal.SIGTERM, handler)
    if not kwargs.get("log_to_driver", True):
        notes.start()


def ray_job_id() -> str:
    """The id `ray job logs` and `ray job stop` take: a submitted job's submission id (its
    driver's own Ray job id, 02000000-like, is not one they accept), else the driver's job id."""

    import ray

    config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return config.get("metadata", {}).get("job_submission_id") or ray.get_runtime_context().get_job_id()


def command_line() -> str:
    """This process's command as the user typed it (credentials masked): MLflow's Source."""

    program = os.path.basename(sys.argv[0])
    words = ["vidray", *sys.argv[1:]] if program in ("vidray", "cli.py", "__main__.py") else sys.argv
    return redact(shlex.join(words))


def job_runtime_env(working_dir: str | None, env: dict[str, str] | None = None) -> dict:
    """The runtime env of a submitted job: ``working_dir`` (uploaded; .gitignore'd files stay
    behind) and the :data:`FORWARDED_ENV` values set in ``env`` (default: this process's)."""
    env = os.environ if env is None else env
    runtime_env: dict = {"env_vars": {k: env[k] for k in FORWARDED_ENV if env.get(k)}}
    if working_dir:
        if not os.path.isdir(working_dir):
            raise ConfigError("--working-dir", f"{working_dir} is not a directory")
        runtime_env["working_dir"] = working_dir
    return runtime_env


def check_no_secrets(runtime_env: dict) -> None:
    """Refuse a runtime env that would publish a credential in the job's metadata."""
    leaked = sorted(set(runtime_env.get("env_vars", {})) & set(SECRET_ENV))
    if leaked:
        raise ConfigError("runtime_env.env_vars", f"{', '.join(leaked)} would be readable by anyone who can "
                          "list the cluster's jobs: give the nodes their credentials instead (instance role, "
                          "Kubernetes Secret; see infra/)")


def submit(command: list[str], address: str, working_dir: str | None = ".", wait: bool = True,
           timeout_s: float | None = None, submission_id: str | None = None,
           say: Callable[[str], None] = print) -> dict:
    """Submit ``vidray <command>`` to the cluster at ``address`` (the dashboard URL, e.g.
    http://127.0.0.1:8265); with ``wait``, stream its log until it ends. Returns the job id and
    its status (SUCCEEDED, FAILED or STOPPED once finished)."""
    if not command:
        raise ConfigError("command", "nothing to run: give a vidray subcommand, e.g. "
                          "`vidray submit -- pretrain configs/demo/pretrain.yaml ...`")
    runtime_env = job_runtime_env(working_dir)
    check_no_secrets(runtime_env)
    try:
        client = _client(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError("--address", f"no Ray job server at {address} ({err}); start one with "
                          "`ray start --head` or open a tunnel with `ray dashboard CLUSTER.yaml`") from None
    entrypoint = shlex.join(["vidray", *command])
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                               metadata={"submitted_by": "vidray submit"})
    say(f"submitted {job_id} to {address}: {entrypoint}")
    if not wait:
        return {"job_id": job_id, "status": str(client.get_job_status(job_id).value)}
    return {"job_id": job_id, "status": wait_for(client, job_id, timeout_s, say)}


def _client(address: str):
    """A job client for ``address`` itself: Ray lets RAY_API_SERVER_ADDRESS (then RAY_ADDRESS)
    override the address a client is given, so a stale variable would send the job to another
    cluster without a word."""
    from ray.job_submission import JobSubmissionClient

    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(address)
    finally:
        os.environ.update(saved)


def wait_for(client, job_id: str, timeout_s: float | None = None, say: Callable[[str], None] = print) -> str:
    """Poll ``job_id`` until it ends, printing new log lines; returns its final status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    shown = 0
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        for line in logs[shown:].splitlines():
            say(line)
        shown = len(logs)
        if status in TERMINAL:
            say(f"job {job_id}: {status}")
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f} s "
                               f"(`ray job stop {job_id}` to stop it)")
        time.sleep(1.0)
