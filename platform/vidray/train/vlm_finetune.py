"""`vidray finetune`: a VLM fine-tuned for one task on Ray Train (same loop as pre-training).

    vidray finetune configs/demo/finetune_retrieval.yaml init_from=runs/vlm-pretrain-.../checkpoint_00000060

The examples come from the same committed feature sets as pre-training: one clip per timed
caption (retrieval, captioning) or sliding windows of seconds with per-second labels from a
COIN-format file (action segmentation). ``init_from`` copies the VLM weights of a pre-training
checkpoint; its model config must match ``model`` (a mismatch is named key by key).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

from vidray.checkpoint import init_from
from vidray.config import ConfigError
from vidray.data.adapters import label_vocabulary, per_second_labels, read_action_segments
from vidray.data.manifest import split_videos
from vidray.data.vlm import (_ragged, clip_examples_of_video, collate, with_video_dim, segment_windows,
                             text_table)
from vidray.feature_store.store import open_version
from vidray.models.vlm import SEP_ID, build_vlm
from vidray.models.vlm_config import ModelConfig
from vidray.objectives.masking import IGNORE_INDEX
from vidray.objectives.vlm_tasks import build_task_model
from vidray.train.config import FinetuneConfig
from vidray.train.job import run_name, run_training


EXPERIMENT = "vidray-finetune"


def segment_classes(labels_uri: str) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Segments per video and the label vocabulary of a COIN-format file."""

    if not labels_uri:
        raise ConfigError("data.labels", "is required for action_segmentation: a COIN-format "
                          "annotation file (the synthetic corpus writes coin.json)")
    segments = read_action_segments(labels_uri).segments
    return segments, label_vocabulary(segments)


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


def text_budget(model: ModelConfig) -> int:
    """Text tokens a clip may carry: the sequence minus [CLS], the video slots and two [SEP]."""
    return model.max_seq_len - model.max_video_tokens - 3


def collate_windows(examples: dict, window: int) -> dict:
    """Pad windows of seconds (and their labels) into ``video, video_mask, labels``."""
    videos, labels = list(examples["video"]), list(examples["labels"])
    dim = np.asarray(videos[0]).reshape(len(videos[0]), -1).shape[-1]
    video = torch.zeros(len(videos), window, dim)
    video_mask = torch.zeros(len(videos), window, dtype=torch.bool)
    target = torch.full((len(videos), window), IGNORE_INDEX, dtype=torch.long)
    for b, (v, y) in enumerate(zip(videos, labels)):
        v = np.asarray(v, np.float32).reshape(-1, dim)[:window]
        video[b, :len(v)] = torch.from_numpy(v)
        video_mask[b, :len(v)] = True
        target[b, :len(v)] = torch.from_numpy(np.asarray(y, np.int64)[:len(v)])
    return {"video": video, "video_mask": video_mask, "labels": target}


# --- examples ----------------------------------------------------------------------------------

def video_rows(batch: pa.Table, captions: dict[str, list] | None = None,
               keep: set[str] | None = None) -> Iterator[tuple[str, np.ndarray, list[dict]]]:
    """(video_id, S3D features [seconds, dim], its captions) of each feature row; only videos in
    ``keep`` (if given) and, when ``captions`` is given, only videos that have captions there."""
    for row in batch.to_pylist():
        video_id = row["video_id"]
        if (keep is not None and video_id not in keep) or (captions is not None and video_id not in captions):
            continue
        features = np.asarray(row["features"], np.float32).reshape(len(row["features"]), -1)
        yield video_id, features, (captions or {}).get(video_id, [])


def captions_by_video(text_uri: str, manifest: str = "", split: str = "") -> dict[str, list]:
    """Captions with ids of a committed text set (of one manifest split if given), per video."""
    table = text_table(text_uri, manifest, split)
    return dict(zip(table["video_id"].to_pylist(), table["captions"].to_pylist()))


def task_examples(task: str, rows, *, max_video_tokens: int, max_text_tokens: int,
                  segments: dict | None = None, classes: dict | None = None, stride: int = 16) -> list[dict]:
    """The examples of ``task`` from :func:`video_rows`."""

    out: list[dict] = []
    for video_id, features, captions in rows:
        if task == "action_segmentation":
            if video_id in segments:
                labels = per_second_labels(segments[video_id], len(features), classes, IGNORE_INDEX)
                out.extend(segment_windows(video_id, features, labels, max_video_tokens, stride))
        else:
            out.extend(clip_examples_of_video(video_id, features, captions, max_video_tokens, max_text_tokens))
    return out


def _to_task_examples(batch: pa.Table, captions: dict | None, keep: set | None, task: str,
                      kwargs: dict) -> dict:
    examples = task_examples(task, video_rows(batch, captions, keep), **kwargs)
    keys = ("video", "labels") if task == "action_segmentation" else ("video", "text_ids")
    return {k: _ragged([e[k] for e in examples]) for k in keys}


def example_kwargs(cfg: FinetuneConfig, labels: str | None = None) -> dict:
    kwargs = {"max_video_tokens": cfg.model.max_video_tokens, "max_text_tokens": text_budget(cfg.model),
              "stride": cfg.data.segment_stride}
    if cfg.task == "action_segmentation":
        kwargs["segments"], kwargs["classes"] = segment_classes(labels or cfg.data.labels)
    return kwargs


def finetune_dataset(cfg: FinetuneConfig):
    """A Ray Dataset of the task's examples from the committed feature sets."""
    from vidray.feature_store import store

    ds = store.open_dataset(cfg.data.features, columns=["video_id", "features"])
    keep = split_videos(cfg.data.manifest, cfg.data.split)
    captions = (None if cfg.task == "action_segmentation"
                else captions_by_video(cfg.data.text, cfg.data.manifest, cfg.data.split))
    return ds.map_batches(_to_task_examples, batch_format="pyarrow", batch_size=8,
                          fn_kwargs={"captions": captions, "keep": keep, "task": cfg.task,
                                     "kwargs": example_kwargs(cfg)})


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
