"""Jobs submitted to a real Ray cluster's job server, as on a cluster: `ray job submit
--working-dir .` runs `vidray pretrain` to SUCCEEDED with its checkpoint on the S3 endpoint and
its MLflow run; a job stopped mid-run (`ray job stop`) and submitted again through `vidray submit`
resumes from its last checkpoint and ends at the same step count as an uninterrupted run. The
runtime env carries no credential: the nodes' own environment does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest

from conftest import REPO
from vidray.cluster import SECRET_ENV, check_no_secrets, job_runtime_env
from vidray.config import ConfigError
from vidray.stack import free_port

BIN = os.path.dirname(sys.executable)


def test_a_jobs_runtime_env_forwards_settings_and_never_credentials(tmp_path):
    env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_ENDPOINT_URL": "http://s3:9000",
           "AWS_SECRET_ACCESS_KEY": "s3cret", "MLFLOW_TRACKING_PASSWORD": "pw", "HOME": "/root"}
    runtime_env = job_runtime_env(str(tmp_path), env)
    assert runtime_env == {"working_dir": str(tmp_path), "env_vars": {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_ENDPOINT_URL": "http://s3:9000"}}
    check_no_secrets(runtime_env)
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY"):
        check_no_secrets({"env_vars": {"AWS_SECRET_ACCESS_KEY": "s3cret"}})
    with pytest.raises(ConfigError, match="--working-dir"):
        job_runtime_env(str(tmp_path / "missing"), env)


def test_submit_without_a_command_or_a_job_server_says_what_to_do():
    out = subprocess.run([sys.executable, "-m", "vidray.jobs.cli", "submit", "--address", "http://127.0.0.1:9"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "nothing to run" in out.stderr
    # The address given is the one used, even where RAY_API_SERVER_ADDRESS names a live job server
    # (in a full session it does; Ray would let it win).
    out = subprocess.run([sys.executable, "-m", "vidray.jobs.cli", "submit", "--address",
                          f"http://127.0.0.1:{free_port()}", "--", "pretrain", "--help"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no Ray job server" in out.stderr and "ray start --head" in out.stderr


@pytest.fixture(scope="module")
def ray_head(ray_cluster):
    """The job server of the session's local Ray cluster (a head on 127.0.0.1 with its dashboard
    on a free port; conftest). Its processes hold the local S3 endpoint's keys and the MLflow URI
    in their environment, as a cluster node gets them from its role and Secret.

    Not a second head from `ray start --head`: a session keeps to one Ray cluster."""
    address = os.environ["RAY_API_SERVER_ADDRESS"]
    # Clients of a token-authenticated cluster (Ray's default for local clusters) need the mode
    # set; the token is the one `ray.init()` wrote to ~/.ray/auth_token.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": BIN + os.pathsep + os.environ["PATH"]}
    env.pop("RAY_ADDRESS", None)
    _ray(["job", "list", "--address", address], env)
    return {"address": address, "env": env}


def _ray(args: list[str], env: dict, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([os.path.join(BIN, "ray"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=180)
    assert not check or out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out


def _status(head: dict, job_id: str) -> str:
    out = _ray(["job", "status", job_id, "--address", head["address"]], head["env"])
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)  # without colours
    # "Status for job 'ID': RUNNING" while it runs, "Job 'ID' succeeded" once it ended.
    found = re.findall(r"Status for job '[^']+': (\w+)|Job '[^']+' (?:was )?(succeeded|failed|stopped)", text)
    assert found, text[-2000:]
    running, ended = found[-1]
    return (running or ended).upper()


def _logs(head: dict, job_id: str) -> str:
    return _ray(["job", "logs", job_id, "--address", head["address"]], head["env"]).stdout


def _wait(head: dict, job_id: str, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    while (status := _status(head, job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"{job_id} still {status}:\n{_logs(head, job_id)[-3000:]}"
        time.sleep(1.0)
    return status


def _pretrain_args(feature_sets, storage: str, steps: int) -> list[str]:
    return ["pretrain", "configs/demo/pretrain.yaml", f"data.features={feature_sets['s3d']}",
            f"data.text={feature_sets['text']}", "data.clips_per_video=32", f"train.steps={steps}",
            "train.batch_size=8", "train.checkpoint_every=10", "train.log_every=5", "optim.warmup_steps=5",
            "model.text_backbone=null", "optim.lr=1e-3",  # the tiny BERT: the preset's MiniLM is slow here
            f"train.storage_path={storage}", "mlflow.experiment=test-job-submit"]


def _glob(pattern: str) -> list[str]:
    from vidray import storage

    fs, path = storage.filesystem(pattern)
    fs.invalidate_cache()  # s3fs caches listings
    return fs.glob(path)


def _read_snapshot(storage_path: str) -> str:
    """Ray Train's checkpoint-manager snapshot of the one run under ``storage_path``, or ''."""
    from vidray import storage

    found = _glob(f"{storage_path}/*/checkpoint_manager_snapshot.json")
    return storage.read_bytes("s3://" + found[0]).decode() if found else ""


def _run_named(experiment: str, run_name: str):
    import mlflow

    (run,) = mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name(experiment).experiment_id],
        filter_string=f"tags.`vidray.run_name` = '{run_name}'")
    return run


def documented_submit() -> list[str]:
    """Step 4 of docs/cluster.md's "Run on a cluster", one command a line (continuations joined,
    comments dropped)."""
    text = open(os.path.join(REPO, "docs", "cluster.md")).read()
    block = text.split("**4. Submit jobs**", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


# What the documented pre-training needs to fit a CPU test: the paper preset is BERT-base on 8 GPUs.
CPU_SCALE = ["model.flavour=tiny", "model.text_backbone=null", "train.use_gpu=false", "train.num_workers=1",
             "train.batch_size=8", "train.steps=10", "train.checkpoint_every=10", "train.log_every=5",
             "optim.warmup_steps=5", "optim.lr=1e-3", "data.clips_per_video=32", "mlflow.experiment=test-job-submit"]


@pytest.mark.heavy
@pytest.mark.timeout(900)
def test_the_documented_ray_job_submit_runs_pretrain_to_s3_and_mlflow(ray_head, feature_sets, stack):
    """docs/cluster.md's step 4 as written, in a shell: its exports, then its `ray job submit`
    with the placeholders filled (this head, this MLflow, these sets) and CPU_SCALE appended."""
    import mlflow

    from vidray import storage

    storage_path = f"s3://{stack.bucket}/jobs-{uuid.uuid4().hex[:8]}"
    lines = documented_submit()
    exports = [line for line in lines if line.startswith("export ")]
    (submit,) = [line for line in lines if line.startswith("ray job submit")]
    filled = {"http://127.0.0.1:8265": ray_head["address"],
              "http://mlflow.example.internal:5000": stack.env["MLFLOW_TRACKING_URI"],
              "data.features=s3://...": f"data.features={feature_sets['s3d']}",
              "data.text=s3://...": f"data.text={feature_sets['text']}",
              "data.manifest=s3://.../manifest.parquet": f"data.manifest={feature_sets['manifest']}",
              "train.storage_path=s3://vidray-runs/runs": f"train.storage_path={storage_path}"}
    script = "\n".join([*exports, submit + " " + " ".join(CPU_SCALE)])
    for placeholder, value in filled.items():
        assert placeholder in script, f"docs/cluster.md no longer says {placeholder!r}: update this test"
        script = script.replace(placeholder, value)
    env = {k: v for k, v in ray_head["env"].items() if k not in ("RAY_AUTH_MODE", "MLFLOW_TRACKING_URI")}
    out = subprocess.run(["bash", "-euc", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    job_id = re.search(r"Job '(raysubmit_\w+)' submitted successfully", out.stdout + out.stderr).group(1)
    logs = _logs(ray_head, job_id)
    assert _status(ray_head, job_id) == "SUCCEEDED", logs[-4000:]
    report = json.loads(logs[logs.rindex('{\n  "run_name"'):].split("\n}\n")[0] + "\n}")
    assert report["metrics"]["step"] == 10
    # What the job printed (after Ray's own lines about starting it): its progress lines once each,
    # no tqdm cursor codes, none of Ray's INFO lines.
    printed = logs[logs.index("Running entrypoint for job"):]
    progress = [line for line in printed.splitlines() if re.match(r"pretrain \S+: step \d+/10 ", line)]
    assert progress and progress[-1].startswith(f"pretrain {report['run_name']}: step 10/10")
    assert len(progress) == len(set(progress)) and "\x1b[A" not in printed and " INFO " not in printed, printed
    checkpoint = report["checkpoint"]
    assert checkpoint.startswith(storage_path) and storage.exists(storage.join(checkpoint, "state.pt"))
    client = mlflow.MlflowClient()
    run = client.get_run(report["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint_uri"] == checkpoint
    # Tagged with the id `ray job logs` and `ray job stop` take (the driver's own is 02000000-like).
    assert run.data.tags["ray_job_id"] == job_id and len(client.get_metric_history(run.info.run_id, "loss")) == 10
    # Nothing secret is in the job's metadata (its runtime env among it).
    listed = _ray(["job", "list", "--address", ray_head["address"]], ray_head["env"]).stdout
    (details,) = [d for d in listed.split("JobDetails(") if f"submission_id='{job_id}'" in d]
    assert "runtime_env" in details and not any(name in details for name in SECRET_ENV), details


@pytest.mark.heavy
@pytest.mark.timeout(900)
def test_a_stopped_job_submitted_again_resumes_from_its_last_checkpoint(ray_head, feature_sets, stack, monkeypatch):
    import mlflow

    from vidray.cluster import _client

    steps = 120  # the stop must land before the end: a CI run once went from step 10 to 40 during it
    storage_path = f"s3://{stack.bucket}/jobs-{uuid.uuid4().hex[:8]}"
    submit = [sys.executable, "-m", "vidray.jobs.cli", "submit", "--address", ray_head["address"]]
    args = ["--", *_pretrain_args(feature_sets, storage_path, steps=steps)]
    first = subprocess.run(submit + ["--no-wait"] + args, cwd=REPO, env=ray_head["env"], capture_output=True,
                           text=True, timeout=180)
    assert first.returncode == 0, first.stderr[-3000:]
    job_id = json.loads(first.stdout)["job_id"]
    # Stop the whole job (driver and Train workers) once a checkpoint is on S3. An in-process
    # client polls and stops within a second; the `ray` CLI takes seconds per call.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    client = _client(ray_head["address"])
    deadline = time.monotonic() + 300
    # Ray Train resumes from the checkpoints its snapshot lists, written after each upload: a
    # stop between the upload and the snapshot resumes from the checkpoint before (a CI run once
    # stopped there, on the first one, and went from step 0).
    while "checkpoint_0" not in _read_snapshot(storage_path):
        assert time.monotonic() < deadline and str(client.get_job_status(job_id).value) in ("PENDING", "RUNNING"), \
            client.get_job_logs(job_id)[-3000:]
        time.sleep(0.2)
    client.stop_job(job_id)
    assert _wait(ray_head, job_id) == "STOPPED"
    assert not _glob(f"{storage_path}/*/checkpoint_{steps:08d}"), "stopped too late to test a resume"

    # Under load, as it failed once: another Ray started on the machine in Ray's shared temp dir
    # rewrites /tmp/ray/ray_current_cluster, through which a job's driver resolved its cluster, so
    # the resubmitted job's tasks went to the other cluster and could not fetch its working dir.
    # Our cluster keeps a temp dir of its own (vidray.train.job.start_local_ray).
    bystander = subprocess.Popen([sys.executable, "-c", "import sys, ray; ray.init(address=\"local\", num_cpus=1, include_dashboard=False); "
                                  "print('up', flush=True); sys.stdin.read(); ray.shutdown()"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")})
    try:
        assert bystander.stdout.readline().strip() == "up"
        again = subprocess.run(submit + args, cwd=REPO, env=ray_head["env"], capture_output=True, text=True,
                               timeout=600)
    finally:
        bystander.communicate(timeout=120)  # stdin closed: it shuts its cluster down and exits
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert json.loads(again.stdout)["status"] == "SUCCEEDED"
    (run_dir,) = {os.path.dirname(p) for p in _glob(f"{storage_path}/*/checkpoint_*")}
    run = _run_named("test-job-submit", os.path.basename(run_dir))
    # One MLflow run across both jobs; every step logged, the same count as an uninterrupted run.
    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")}
    assert logged == set(range(1, steps + 1))
    assert run.data.tags["checkpoint_uri"].endswith(f"checkpoint_{steps:08d}")
    # Its log, streamed by `vidray submit`, shows where the second job started.
    resumed = re.search(rf"training from step (\d+) to {steps}", again.stderr)
    assert resumed and int(resumed.group(1)) in range(10, steps, 10), again.stderr[-3000:]
