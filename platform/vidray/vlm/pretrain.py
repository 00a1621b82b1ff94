"""`vidray pretrain`: VLM pre-training on Ray Train from the cached S3D + text feature sets."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

from vidray.config import ConfigError, dump_yaml, flatten
from vidray.feature_store.store import digest, open_version
from vidray.train.config import PretrainConfig
from vidray.train.loop import MLflowRun, fit, load_checkpoint
from vidray.vlm.data import examples_dataset
from vidray.vlm.system import build_system

EXPERIMENT = "vidray-pretrain"


def run_name(cfg: PretrainConfig) -> str:
    """Stable for the same config, so rerunning the same command resumes the same run."""
    return cfg.train.run_name or "vlm-pretrain-" + digest(dataclasses.asdict(cfg))[:10]


def run_pretrain(cfg: PretrainConfig, say=print) -> dict[str, Any]:
    import mlflow
    import ray

    for key in ("features", "text"):
        if not getattr(cfg.data, key):
            raise ConfigError(f"data.{key}", "is required: the URI of a committed feature-set version "
                              "(see `vidray features ls ROOT`)")
    features, text = open_version(cfg.data.features), open_version(cfg.data.text)  # clear errors first
    if not ray.is_initialized():
        ray.init()
    name = run_name(cfg)
    tags = {"job": "pretrain", "feature_set.s3d": features.uri, "feature_set.text": text.uri,
            "ray_job_id": ray.get_runtime_context().get_job_id()}
    tracker = partial(MLflowRun, cfg.mlflow.resolved_uri(), cfg.mlflow.experiment or EXPERIMENT,
                      name, flatten(cfg), tags)
    say(f"pretrain run '{name}': checkpoints under {cfg.train.storage_path}/{name}")
    dataset = examples_dataset(cfg.data, cfg.model.max_video_tokens, seed=cfg.train.seed)
    result = fit(cfg, build_system, dataset, tracker, name, cfg.train.storage_path)
    checkpoint = result.checkpoint.path if result.checkpoint else None
    metrics = dict(result.metrics or {})
    if result.checkpoint:  # the checkpoint is authoritative (a rerun of a finished run reports nothing)
        with result.checkpoint.as_directory() as directory:
            metrics["step"] = load_checkpoint(directory)["step"]

    # The driver adds what only it knows once training is done: the final checkpoint and config.
    if cfg.mlflow.resolved_uri():
        mlflow.set_tracking_uri(cfg.mlflow.resolved_uri())
    experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment or EXPERIMENT)
    (run,) = mlflow.search_runs([experiment.experiment_id], output_format="list", max_results=1,
                                filter_string=f"tags.`vidray.run_name` = '{name}'")
    client = mlflow.MlflowClient()
    client.set_tag(run.info.run_id, "checkpoint_uri", str(checkpoint))
    client.log_text(run.info.run_id, dump_yaml(cfg), "config.yaml")
    say(f"pretrain '{name}' done at step {metrics.get('step')}: loss {metrics.get('loss', float('nan')):.4f}; "
        f"checkpoint {checkpoint}; MLflow run {run.info.run_id}")
    return {"run_name": name, "checkpoint": checkpoint, "mlflow_run_id": run.info.run_id,
            "metrics": metrics}
