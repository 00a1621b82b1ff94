"""A multi-node Ray cluster on this machine: a head that runs no work and three worker nodes, each
its own raylet with its own CPUs and a resource naming it. Storage is the S3 endpoint only (no
path of the driver's disk), MLflow the session's server, and every job a `vidray` command joining
the cluster through RAY_ADDRESS, as on a real cluster.

- `vidray extract` runs its actors on several nodes; a node killed mid-extraction (its raylet, by
  pid) loses nothing: the job or its rerun commits every video exactly once.
- `vidray pretrain` with `train.placement=SPREAD` runs its two workers on two nodes; the node of
  one of them is killed after the first checkpoint and the run goes on from that checkpoint on
  the nodes left, its steps continuous in one MLflow run.
- `vidray sweep` runs two trials at once, whose Train workers cannot share a node; the node of one
  trial is killed after its first checkpoint: Tune starts the trial again elsewhere, it resumes
  from that checkpoint into the same MLflow run, and the sweep completes with one child per trial.

The one module with a second Ray cluster beside the session's: its shape is what it tests. It
starts in about 10 s and each node holds a few hundred MB."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import pytest

from conftest import REPO
from vidray.stack import free_port

pytestmark = pytest.mark.heavy

WORKER_NODES = ("node_a", "node_b", "node_c")


@dataclass
class Nodes:
    cluster: object                 # ray.cluster_utils.Cluster
    workers: dict                   # name -> ray._private.node.Node
    env: dict                       # a job's environment: RAY_ADDRESS and the cluster's State API
    dead: set = field(default_factory=set)  # names of the nodes killed

    def name_of(self, node_id: str) -> str:
        return next(name for name, node in self.workers.items() if node.node_id == node_id)

    def kill(self, name: str) -> None:
        """SIGKILL the node's raylet (its workers die with it), as a lost machine would."""
        os.kill(self.workers[name].all_processes["raylet"][0].process.pid, signal.SIGKILL)
        self.dead.add(name)

    def replace(self, name: str) -> None:
        """A new machine in place of a lost one, as an autoscaler would start it."""
        self.workers[f"{name}_new"] = self.cluster.add_node(num_cpus=3, object_store_memory=300 * 2**20)


@pytest.fixture(scope="module")
def nodes(stack, ray_cluster, tmp_path_factory):
    """The cluster, started beside the session's (whose driver this process stays)."""
    from ray.cluster_utils import Cluster
    from ray._private.utils import get_ray_address_file

    port = free_port()
    api = f"http://127.0.0.1:{port}"
    # The nodes' processes inherit this environment: the stack's endpoint and keys (set by the
    # stack fixture), and this cluster's State API, which Ray Train's placement-group cleaner asks.
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = api
    address_file = get_ray_address_file(None)
    previous = open(address_file).read() if os.path.exists(address_file) else None
    try:
        cluster = Cluster(initialize_head=True, connect=False, head_node_args={
            "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
            "temp_dir": str(tmp_path_factory.mktemp("ray-nodes")),
            # A lost node is declared dead after about 3 s, not Ray's default of 30.
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
        workers = {name: cluster.add_node(num_cpus=3, resources={name: 1}, object_store_memory=300 * 2**20)
                   for name in WORKER_NODES}
    finally:
        os.environ.pop("RAY_API_SERVER_ADDRESS") if saved is None else os.environ.update(RAY_API_SERVER_ADDRESS=saved)
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_API_SERVER_ADDRESS": api}
    yield Nodes(cluster, workers, env)
    cluster.shutdown()
    # Cluster() wrote its address where `ray.init()` looks first; put back what was there.
    if previous is None:
        os.path.exists(address_file) and os.remove(address_file)
    else:
        open(address_file, "w").write(previous)


def vidray(nodes: Nodes, *args: str) -> subprocess.Popen:
    """A `vidray` command on the cluster; its log goes to a file (a sweep's fills a pipe's buffer,
    and a job writing to a full pipe waits forever)."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "vidray.jobs.cli", *args], cwd=REPO, env=nodes.env,
                            stdout=subprocess.PIPE, stderr=log, text=True)
    proc.log = log
    return proc


def log_of(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, dict | None, str]:
    out, _ = proc.communicate(timeout=timeout)
    err = log_of(proc)
    if proc.returncode != 0:
        return proc.returncode, None, err
    try:
        return 0, json.loads(out), err   # a job's stdout is its JSON report alone
    except json.JSONDecodeError:
        pytest.fail(f"stdout is not the JSON report alone:\n{out}")


def ray_list(nodes: Nodes, kind: str) -> list[dict]:
    """`ray list actors|nodes` on this cluster's State API, as a person would ask it. Not
    ray.util.state from this process: connected to the session's cluster, it answered about that
    one (no actor found here in a full session)."""
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "list", kind, "--address",
                          nodes.env["RAY_API_SERVER_ADDRESS"], "--format", "json", "--detail", "--limit", "10000"],
                         env=nodes.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def actor_nodes(nodes: Nodes, class_fragment: str) -> set[str]:
    """Names of the nodes that ran actors whose class name holds ``class_fragment`` (dead or alive)."""
    workers = {node.node_id for node in nodes.workers.values()}
    return {nodes.name_of(a["node_id"]) for a in ray_list(nodes, "actors")
            if class_fragment in (a.get("class_name") or "") and a.get("node_id") in workers}


def wait_for(predicate, timeout: float, what: str, job: subprocess.Popen | None = None):
    """``predicate()`` once it is true; fails after ``timeout`` or when ``job`` has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if job is not None and job.poll() is not None:
            pytest.fail(f"the job ended (exit {job.returncode}) before {what}:\n{log_of(job)[-4000:]}")
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def corpus(stack, nodes):
    from vidray import storage
    from vidray.data.synth import SynthConfig, synthesize

    root = f"s3://{stack.bucket}/multinode"
    synthesize(root, SynthConfig(videos=24, seed=5, min_seconds=3.0, max_seconds=4.0, workers=2), progress=False)
    return {"root": root, "manifest": storage.join(root, "manifest.parquet")}


def _s3d_args(corpus: dict) -> list[str]:
    return [f"manifest={corpus['manifest']}", f"root={corpus['root']}/features", "extractor=s3d",
            "s3d.flavour=tiny", "s3d.size=32", "videos_per_part=2", "num_workers=3"]


def test_extraction_spreads_over_nodes_and_a_lost_node_loses_no_video(nodes, corpus):
    from vidray import storage
    from vidray.feature_store.store import open_version, read_parquet

    features = f"{corpus['root']}/features"
    job = vidray(nodes, "extract", *_s3d_args(corpus))
    try:
        fs, path = storage.filesystem(features)
        # Once parts are being written, kill a node that holds an extraction actor.
        wait_for(lambda: fs.glob(f"{path}/**/part-*.parquet"), 300, "the first part")
        running = wait_for(lambda: actor_nodes(nodes, "ShardWorker"), 60, "an extraction actor")
        victim = sorted(running)[0]
        assert job.poll() is None, "the extraction ended before the node went: the test proves nothing"
        nodes.kill(victim)
        code, report, err = finish(job)
    finally:
        job.kill()
    if code != 0:  # the job may fail with the node; the same command then finishes what is left
        print(f"the extraction failed with node {victim}; rerunning it:\n{err[-2000:]}")
        code, report, err = finish(vidray(nodes, "extract", *_s3d_args(corpus)))
    assert code == 0, err[-3000:]
    assert len(actor_nodes(nodes, "ShardWorker")) >= 2, "the extraction ran on one node only"

    version = open_version(report["uri"])
    ids = [i for uri in version.part_uris for i in read_parquet(uri, columns=["video_id"])["video_id"].to_pylist()]
    assert len(ids) == len(set(ids)) == version.manifest["rows"] == 24   # every video, once
    # The rerun after it (all committed) does nothing.
    code, again, err = finish(vidray(nodes, "extract", *_s3d_args(corpus)))
    assert code == 0 and again["uri"] == report["uri"], err[-3000:]
    # The node's loss: its raylet and workers are gone; Ray marked it dead.
    dead = {n["node_id"] for n in ray_list(nodes, "nodes") if n["state"] == "DEAD"}
    assert nodes.workers[victim].node_id in dead
    nodes.replace(victim)


@pytest.fixture(scope="module")
def feature_sets(nodes, corpus):
    """The s3d set (committed already when the extraction test ran: then nothing to do) and the text set."""
    uris = {}
    for extractor, args in (("s3d", _s3d_args(corpus)),
                            ("text", [f"manifest={corpus['manifest']}", f"root={corpus['root']}/features",
                                      "extractor=text"])):
        code, report, err = finish(vidray(nodes, "extract", *args))
        assert code == 0, err[-3000:]
        uris[extractor] = report["uri"]
    return uris


def test_pretraining_spreads_over_nodes_and_goes_on_after_a_lost_node(nodes, feature_sets, stack, s3_uri):
    import mlflow

    from vidray import storage

    runs = f"{s3_uri}/runs"
    job = vidray(nodes, "pretrain", f"data.features={feature_sets['s3d']}", f"data.text={feature_sets['text']}",
                 "data.clips_per_video=32", "model.flavour=tiny", "train.steps=40", "train.batch_size=8",
                 "train.num_workers=2", "train.placement=SPREAD", "train.checkpoint_every=10",
                 "train.max_failures=2", f"train.storage_path={runs}", "optim.warmup_steps=5", "optim.lr=1e-3",
                 "train.run_name=multinode", "mlflow.experiment=test-multinode")
    client = mlflow.MlflowClient(stack.env["MLFLOW_TRACKING_URI"])

    def run():
        experiment = client.get_experiment_by_name("test-multinode")
        found = experiment and client.search_runs([experiment.experiment_id],
                                                  "tags.`vidray.run_name` = 'multinode'")
        return found and "ray.worker_nodes" in found[0].data.tags and found[0]

    try:
        first = wait_for(run, 300, "the run's MLflow tags").data.tags["ray.worker_nodes"].split(",")
        started_on = [nodes.name_of(n) for n in first]
        assert len(set(started_on)) == 2, started_on   # SPREAD: one worker per node
        fs, path = storage.filesystem(runs)
        wait_for(lambda: fs.exists(f"{path}/multinode/checkpoint_00000010/state.pt"), 300, "the first checkpoint")
        victim = started_on[1]
        assert job.poll() is None, "training ended before the node went: the test proves nothing"
        nodes.kill(victim)
        code, report, err = finish(job)
    finally:
        job.kill()
    assert code == 0, err[-3000:]
    assert report["metrics"]["step"] == 40 and report["checkpoint"] == f"{runs}/multinode/checkpoint_00000040"

    finished = client.get_run(report["mlflow_run_id"])
    went_on = [nodes.name_of(n) for n in finished.data.tags["ray.worker_nodes"].split(",")]
    assert victim not in went_on and len(set(went_on)) == 2, (started_on, went_on)
    logged = client.get_metric_history(finished.info.run_id, "loss")
    # One run, continuous across the restart (steps trained again after the checkpoint log again).
    assert sorted({m.step for m in logged}) == list(range(1, 41))
    assert "workers on 2 nodes" in err
    assert finished.data.tags["checkpoint_uri"] == report["checkpoint"]
    assert finished.data.tags["feature_set.s3d"] == feature_sets["s3d"]
    assert "config.yaml" in [a.path for a in client.list_artifacts(finished.info.run_id)]

    # The same command again: the run is found finished; nothing trains, no step is logged twice.
    code, again, err = finish(vidray(nodes, *job.args[3:]))
    assert code == 0 and "finished before at step 40" in err, err[-3000:]
    assert again["mlflow_run_id"] == report["mlflow_run_id"] and again["checkpoint"] == report["checkpoint"]
    assert len(client.get_metric_history(finished.info.run_id, "loss")) == len(logged)


def test_a_sweep_runs_trials_on_several_nodes_and_a_lost_node_retries_its_trial(nodes, corpus, feature_sets, stack,
                                                                                  s3_uri, tmp_path):
    import mlflow
    import yaml

    from vidray import storage

    # Three nodes of 3 CPUs (one back in place of the node the pre-training test lost). A trial
    # holds 1 CPU and its two Train workers 2 more, packed: two trials' workers need two nodes.
    for lost in nodes.dead - {name.removesuffix("_new") for name in nodes.workers}:
        nodes.replace(lost)
    experiment, sweeps = "test-multinode-sweep", f"{s3_uri}/sweeps"
    config = tmp_path / "sweep.yaml"   # the driver's own input; the data and state are on S3
    config.write_text(yaml.safe_dump({
        "name": "spread", "storage_path": sweeps, "max_concurrent_trials": 2, "max_failures": 1,
        "space": {"objective.mmm_ratio": {"grid": [0.0, 0.5]}}, "scheduler": {"name": "none"},
        "mlflow": {"experiment": experiment},
        "pretrain": {"model": {"flavour": "tiny"},
                     "data": {"features": feature_sets["s3d"], "text": feature_sets["text"],
                              "manifest": corpus["manifest"], "clips_per_video": 32},
                     "optim": {"lr": 1e-3, "warmup_steps": 5},
                     "train": {"steps": 40, "batch_size": 8, "num_workers": 2, "checkpoint_every": 10,
                               "val_every": 20, "log_every": 10}}}))
    client = mlflow.MlflowClient(stack.env["MLFLOW_TRACKING_URI"])

    def trials():
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id], "tags.job = 'sweep-trial'") if found else []
        return runs if len(runs) == 2 and all("ray.worker_nodes" in r.data.tags for r in runs) else None

    fs, path = storage.filesystem(sweeps)
    job = vidray(nodes, "sweep", str(config))
    try:
        running = wait_for(trials, 300, "two trials training", job)
        held = {r.data.tags["vidray.run_name"]: r.data.tags for r in running}
        workers = {nodes.name_of(n) for tags in held.values() for n in tags["ray.worker_nodes"].split(",")}
        assert len(workers) >= 2, held    # trials run side by side on different nodes
        first = wait_for(lambda: [name for name in held if fs.exists(f"{path}/spread/train/{name}/checkpoint_00000010/state.pt")],
                         300, "a trial's first checkpoint", job)[0]
        victim = nodes.name_of(held[first]["ray.trial_node"])
        assert job.poll() is None, "the sweep ended before the node went: the test proves nothing"
        nodes.kill(victim)
        nodes.replace(victim)
        code, report, err = finish(job, timeout=900)
    finally:
        job.kill()
    assert code == 0, err[-4000:]
    assert [t["status"] for t in report["trials"]] == ["done", "done"], report["trials"]
    children = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                  "tags.job = 'sweep-trial'")
    assert len(children) == 2   # the retried trial went on in its own run, not a new one
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags
        steps = {m.step for m in client.get_metric_history(child.info.run_id, "loss")}
        assert steps == set(range(1, 41)), sorted(steps)
    retried = next(c for c in children if c.data.tags["vidray.run_name"] == first)
    assert nodes.name_of(retried.data.tags["ray.trial_node"]) != victim   # started again elsewhere
