"""`vidray finetune`: a VLM fine-tuned for one task on Ray Train (same loop as pre-training).

    vidray finetune configs/demo/finetune_retrieval.yaml init_from=runs/vlm-pretrain-.../checkpoint_00000060

The examples come from the same committed feature sets as pre-training: one clip per timed
caption (retrieval, captioning) or sliding windows of seconds with per-second labels from a
COIN-format file (action segmentation). ``init_from`` copies the VLM weights of a pre-training
checkpoint; its model config must match ``model`` (a mismatch is named key by key).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from vidray.checkpoint import init_from
from vidray.config import ConfigError
from vidray.config.train import FinetuneConfig
from vidray.data.vlm import collate, collate_windows, finetune_dataset, segment_classes, text_budget, with_video_dim
from vidray.feature_store.store import open_version
from vidray.models.vlm import SEP_ID, build_vlm
from vidray.objectives.vlm_tasks import build_task_model
from vidray.train.job import run_name, run_training

EXPERIMENT = "vidray-finetune"


class FinetuneSystem:
    """What the training loop needs: ``model``, ``collate`` and ``training_step``."""

    def __init__(self, cfg: FinetuneConfig, device: torch.device):
        vlm = build_vlm(cfg.model, load_backbone=not cfg.init_from)
        if cfg.init_from:
            init_from(vlm, cfg.init_from, cfg.model, prefix="vlm.")
        classes = segment_classes(cfg.data.labels)[1] if cfg.task == "action_segmentation" else {}
        self.model = build_task_model(cfg.task, vlm, len(classes)).to(device)
        self.collate = (partial(collate_windows, window=cfg.model.max_video_tokens)
                        if cfg.task == "action_segmentation" else
                        partial(collate, max_video_tokens=cfg.model.max_video_tokens,
                                max_text_tokens=text_budget(cfg.model), sep_id=SEP_ID))

    def training_step(self, batch: dict):
        return self.model(**batch)


def build_system(cfg: FinetuneConfig, device) -> FinetuneSystem:
    return FinetuneSystem(cfg, device)


def check_data(cfg: FinetuneConfig) -> dict[str, str]:
    """Fail early, naming the key, when a feature set or label file is missing."""
    needed = ["features"] + ([] if cfg.task == "action_segmentation" else ["text"])
    for key in needed:
        if not getattr(cfg.data, key):
            raise ConfigError(f"data.{key}", "is required: the URI of a committed feature-set version "
                              "(see `vidray features ls ROOT`)")
    # Tagged by extractor (feature_set.s3d, feature_set.image2d, feature_set.text): what was read.
    sets = [open_version(getattr(cfg.data, key)) for key in needed]
    tags = {f"feature_set.{s.manifest['extractor']}": s.uri for s in sets}
    if cfg.task == "action_segmentation":
        segment_classes(cfg.data.labels)
    return tags


def run_finetune(cfg: FinetuneConfig, say=print, tags: dict | None = None) -> dict[str, Any]:
    """Fine-tune; ``tags`` go on the MLflow run (a sweep's trial nests it under its own run)."""
    data_tags = check_data(cfg)
    cfg = with_video_dim(cfg, cfg.data.features)
    tags = {**data_tags, "task": cfg.task, "init_from": str(cfg.init_from), **(tags or {})}
    report = run_training(cfg, job="finetune", experiment=cfg.mlflow.experiment or EXPERIMENT,
                          run_name=run_name(cfg, "vlm", cfg.task), build_system=build_system,
                          make_dataset=lambda: finetune_dataset(cfg), tags=tags, say=say)
    return {**report, "task": cfg.task}
