"""`vidray pretrain`: VLM pre-training on Ray Train from the cached S3D + text feature sets."""

from __future__ import annotations

import dataclasses
from typing import Any

from vidray.config import ConfigError
from vidray.feature_store.store import digest, open_version
from vidray.train.config import PretrainConfig
from vidray.train.job import run_training
from vidray.vlm.data import examples_dataset
from vidray.vlm.system import build_system

EXPERIMENT = "vidray-pretrain"


def run_name(cfg: PretrainConfig) -> str:
    """Stable for the same config, so rerunning the same command resumes the same run."""
    return cfg.train.run_name or "vlm-pretrain-" + digest(dataclasses.asdict(cfg))[:10]


def run_pretrain(cfg: PretrainConfig, say=print) -> dict[str, Any]:
    for key in ("features", "text"):
        if not getattr(cfg.data, key):
            raise ConfigError(f"data.{key}", "is required: the URI of a committed feature-set version "
                              "(see `vidray features ls ROOT`)")
    features, text = open_version(cfg.data.features), open_version(cfg.data.text)  # clear errors first
    return run_training(cfg, job="pretrain", experiment=cfg.mlflow.experiment or EXPERIMENT,
                        run_name=run_name(cfg), build_system=build_system,
                        make_dataset=lambda: examples_dataset(cfg.data, cfg.model.max_video_tokens,
                                                              seed=cfg.train.seed),
                        tags={"feature_set.s3d": features.uri, "feature_set.text": text.uri}, say=say)
