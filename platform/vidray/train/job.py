"""What every training job's driver does around :func:`vidray.train.loop.fit`: start Ray, name
the run, hand rank 0 its MLflow run, then record the final checkpoint and the config on it."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable

from vidray import storage
from vidray.checkpoint import CHECKPOINT_FILE
from vidray.cluster import command_line, init_ray, ray_job_id
from vidray.config import ConfigError, dump_yaml, flatten
from vidray.feature_store.store import digest
from vidray.stack import free_port
from vidray.tracking import alive_nodes, decide_tracking_uri, find_run
from vidray.train.loop import MLflowRun, fit, load_checkpoint
from vidray.train.progress import live_progress


def run_name(cfg: Any, prefix: str, kind: str) -> str:
    """``train.run_name``, or ``<prefix>-<kind>-<digest of the whole config>``: stable for the same
    config, so rerunning the same command resumes the same run (and names its checkpoints)."""
    return cfg.train.run_name or f"{prefix}-{kind}-" + digest(dataclasses.asdict(cfg))[:10]


CHECKPOINT_DIR = re.compile(r"checkpoint_\d{8}")  # Ray Train's folder per reported checkpoint


def finished_checkpoint(storage_path: str, run_name: str, steps: int) -> str | None:
    """The run's final checkpoint (URI) when its newest checkpoint is the one at ``steps``, else None."""
    root = storage.join(storage_path if storage.is_remote(storage_path) else os.path.abspath(storage_path), run_name)
    final = storage.join(root, f"checkpoint_{steps:08d}")
    if not storage.exists(storage.join(final, CHECKPOINT_FILE)):
        return None
    fs, path = storage.filesystem(root)
    names = [os.path.basename(p.rstrip("/")) for p in storage.reach(root, lambda: fs.ls(path, detail=False))]
    # Only checkpoint folders: Ray Train also keeps checkpoint_manager_snapshot.json beside them.
    return final if max(n for n in names if CHECKPOINT_DIR.fullmatch(n)) == f"checkpoint_{steps:08d}" else None


def ensure_ray(num_train_workers: int) -> None:
    """Join the cluster in ``RAY_ADDRESS``, or start a local one with room for Ray Data's tasks
    beside the Train workers (on a 2-core machine the default of one CPU per core lets two
    workers take every CPU, and the data tasks that feed them wait forever)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        init_ray()
    else:
        start_local_ray(num_cpus=max(os.cpu_count() or 1, num_train_workers + 2))


def start_local_ray(num_cpus: int, **kwargs) -> None:
    """``ray.init`` of a new local cluster whose State API clients know their own dashboard.

    Why: Ray Train's placement-group cleaner (an actor) asks the State API whether a stopped
    run's controller is alive. Its client finds the cluster by scanning the machine for GCS
    processes and gives up ("Found multiple active Ray instances") when another Ray runs beside
    ours (a test session's, another user's job); the stopped trial's placement group then stays
    reserved and a sweep's next trial waits forever for CPUs. ``RAY_API_SERVER_ADDRESS``, set
    before the workers start, removes the guess.
    """
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # Ray 2.60 warns at every local start that it enabled its default, token authentication.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}),
                               "RAY_API_SERVER_ADDRESS": os.environ["RAY_API_SERVER_ADDRESS"]}
    # A job submitted to this cluster has its driver find the cluster by "auto": Ray's job supervisor
    # reads <temp dir>/ray_current_cluster (written by `ray start` only), else takes any GCS process
    # of the machine. With another Ray beside ours (a test's, a user's) a resubmitted job's driver
    # joined that one, whose nodes lack the job's working dir ("Failed to download runtime_env file
    # package"). So: a temp dir of our own, holding our address.
    temp_dir = kwargs.setdefault("_temp_dir", os.path.join(tempfile.gettempdir(), "ray", f"vidray-{port}"))
    # address="local": a new cluster even if `ray start` left one that ray.init() would join.
    init_ray(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, runtime_env=runtime_env, **kwargs)
    import ray

    with open(os.path.join(temp_dir, "ray_current_cluster"), "w") as f:
        f.write(ray.get_runtime_context().gcs_address)


def repeat_for_steps(dataset, rows: int, batch_size: int, min_steps: int = 50):
    """The materialised ``dataset`` (``rows`` long) repeated until one pass holds ``min_steps`` batches.

    Why: each pass over a Ray Dataset starts a streaming split across the workers (about a second
    here); a small fine-tuning set gives one or two steps per pass, so training would spend most
    of its time starting passes. Materialising first also runs the feature-set -> examples
    transform once, not once per pass. Repeats share blocks: no data is copied.
    """
    copies = max(1, -(-min_steps * batch_size // max(rows, 1)))  # ceil
    return dataset if copies == 1 else dataset.union(*[dataset] * (copies - 1))


# MLflow metric names by phase: a fine-tuning's contrastive loss (2-4) and a pre-training's MLM loss
# (7-10) were both `loss`, so MLflow's compare charts overlaid them. Pre-training keeps the bare
# names (the sweeps' and the papers'); what Tune's schedulers read is not prefixed.
METRIC_PREFIX = {"finetune": "finetune/"}


def run_training(cfg: Any, *, job: str, experiment: str, run_name: str, build_system: Callable,
                 make_dataset: Callable, tags: dict, say: Callable[[str], None] = print,
                 make_val_dataset: Callable | None = None, callbacks: tuple = (),
                 params: dict | None = None) -> dict[str, Any]:
    """Fit ``build_system`` on ``make_dataset()`` (a Ray Dataset, made once Ray is up) under Ray
    Train, scoring ``make_val_dataset()`` every ``train.val_every`` steps; returns run name,
    checkpoint URI, MLflow run id and the final metrics (``step`` read from the checkpoint).
    ``params`` are logged beside the flattened config (e.g. the model's size figures)."""
    import mlflow

    ensure_ray(cfg.train.num_workers)
    tracking_uri = decide_tracking_uri(cfg.mlflow.resolved_uri(), experiment, alive_nodes())
    # The same command again after it finished: nothing to train, so no Ray Train start (tens of
    # seconds). A sweep's trial (callbacks) reports to Tune, so it always goes through Ray Train.
    finished = None if callbacks else finished_checkpoint(cfg.train.storage_path, run_name, cfg.train.steps)
    run = finished and find_run(tracking_uri, experiment, run_name)
    if run:
        say(f"{job} '{run_name}' finished before at step {cfg.train.steps}: reusing {finished} and MLflow run "
            f"{run.info.run_id}")
        return {"run_name": run_name, "checkpoint": finished, "mlflow_run_id": run.info.run_id,
                "metrics": {"step": cfg.train.steps}}
    # The command as its Source (MLflow would name the Ray worker's default_worker.py).
    tags = {"job": job, "ray_job_id": ray_job_id(), "mlflow.source.name": command_line(),
            "mlflow.source.type": "JOB", **tags}
    tracker = partial(MLflowRun, tracking_uri, experiment, run_name, {**flatten(cfg), **(params or {})}, tags,
                      metric_prefix=METRIC_PREFIX.get(job, ""))
    say(f"{job} run '{run_name}': checkpoints under {cfg.train.storage_path}/{run_name}")
    dataset = make_dataset().materialize()
    rows = dataset.count()
    if rows == 0:
        raise ConfigError("data", "no training examples: check data.split (and data.manifest) and that "
                          "the feature sets hold videos with timed captions")
    dataset = repeat_for_steps(dataset, rows, cfg.train.batch_size)
    val_dataset = None
    if cfg.train.val_every:
        if make_val_dataset is None:
            raise ConfigError("train.val_every", f"{job} has no held-out set to validate on; set it to 0")
        val_dataset = make_val_dataset().materialize()
        if val_dataset.count() == 0:
            raise ConfigError("data.val_split", "the held-out split has no examples (videos with timed "
                              "captions); choose another split or set train.val_every=0")
    # One live line on this driver; a sweep's trials (callbacks) run inside Tune, whose table shows them.
    with nullcontext() if callbacks else live_progress(f"{job} {run_name}", cfg.train.steps) as board:
        result = fit(cfg, build_system, dataset, tracker, run_name, cfg.train.storage_path,
                     val_dataset=val_dataset, callbacks=callbacks, progress=board)
    checkpoint = result.checkpoint.path if result.checkpoint else None
    if checkpoint and "://" not in checkpoint and cfg.train.storage_path.startswith("s3://"):
        checkpoint = "s3://" + checkpoint  # Ray reports paths inside its filesystem, scheme-less
    metrics = dict(result.metrics or {})
    if result.checkpoint:  # the checkpoint is authoritative (a rerun of a finished run reports nothing)
        with result.checkpoint.as_directory() as directory:
            metrics["step"] = load_checkpoint(directory)["step"]

    # The driver adds what only it knows once training is done: the final checkpoint and config.
    run = find_run(tracking_uri, experiment, run_name)
    client = mlflow.MlflowClient()
    client.set_tag(run.info.run_id, "checkpoint_uri", str(checkpoint))
    client.log_text(run.info.run_id, dump_yaml(cfg), "config.yaml")
    say(f"{job} '{run_name}' done at step {metrics.get('step')}: loss {metrics.get('loss', float('nan')):.4f}; "
        f"checkpoint {checkpoint}; MLflow run {run.info.run_id}")
    return {"run_name": run_name, "checkpoint": checkpoint, "mlflow_run_id": run.info.run_id,
            "metrics": metrics}
