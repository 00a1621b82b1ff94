"""`vidray pretrain`: VLM pre-training on Ray Train from the cached S3D + text feature sets."""

from __future__ import annotations

import dataclasses
from typing import Any

from vidray.config import ConfigError
from vidray.config.train import PretrainConfig
from vidray.data.vlm import examples_dataset, with_video_dim
from vidray.feature_store.store import open_version
from vidray.train.job import run_name, run_training
from vidray.train.vlm_system import build_system

EXPERIMENT = "vidray-pretrain"


def run_pretrain(cfg: PretrainConfig, say=print, tags: dict | None = None, callbacks: tuple = ()) -> dict[str, Any]:
    """Pre-train; ``tags`` go on the MLflow run, ``callbacks`` to Ray Train (a sweep's trial
    passes its parent run and Tune's report callback)."""
    for key in ("features", "text"):
        if not getattr(cfg.data, key):
            raise ConfigError(f"data.{key}", "is required: the URI of a committed feature-set version "
                              "(see `vidray features ls ROOT`)")
    if cfg.train.val_every and not cfg.data.manifest:
        raise ConfigError("data.manifest", "is required with train.val_every > 0: it names the videos "
                          "of data.val_split")
    features, text = open_version(cfg.data.features), open_version(cfg.data.text)  # clear errors first
    cfg = with_video_dim(cfg, features.uri)
    held_out = dataclasses.replace(cfg.data, split=cfg.data.val_split)
    return run_training(cfg, job="pretrain", experiment=cfg.mlflow.experiment or EXPERIMENT,
                        run_name=run_name(cfg, "vlm", "pretrain"), build_system=build_system,
                        make_dataset=lambda: examples_dataset(cfg.data, cfg.model.max_video_tokens,
                                                              seed=cfg.train.seed),
                        make_val_dataset=lambda: examples_dataset(held_out, cfg.model.max_video_tokens,
                                                                  seed=cfg.train.seed),
                        tags={f"feature_set.{features.manifest['extractor']}": features.uri,
                              "feature_set.text": text.uri,
                              **(tags or {})},
                        callbacks=callbacks, say=say)
