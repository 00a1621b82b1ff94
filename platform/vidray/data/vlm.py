"""Training examples for VLM from the cached feature sets: S3D seconds + caption token ids.

An example (REFERENCE.md): pick a random centre caption, grow the span to neighbouring captions
until the text reaches a random length in [min_text_tokens, max_text_tokens] (or the span reaches
``max_span_s``); its video is the S3D features of seconds floor(start)..ceil(end), capped at
the model's ``max_video_tokens``. ``clips_per_video`` examples are drawn per video per epoch.

Rows hold numpy arrays of varying length; :func:`collate` pads them into the batch contract of
:mod:`vidray.models.vlm` (text ends with [SEP], then [PAD]).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vidray.config import ConfigError
from vidray.config.train import FinetuneConfig
from vidray.config.vlm import DataConfig, ModelConfig
from vidray.data.adapters import label_vocabulary, per_second_labels, read_action_segments
from vidray.data.manifest import read_manifest, split_videos
from vidray.objectives.masking import IGNORE_INDEX


def grow_span(captions: list[dict], centre: int, target_tokens: int, max_span_s: float) -> tuple[int, int]:
    """Indices [lo, hi] of captions around ``centre`` whose ids reach ``target_tokens``."""
    lo = hi = centre
    tokens = len(captions[centre]["input_ids"])
    while tokens < target_tokens:
        grew = False
        for side in (-1, 1):
            i = lo - 1 if side < 0 else hi + 1
            if 0 <= i < len(captions) and tokens < target_tokens:
                span = max(captions[hi]["end"], captions[i]["end"]) - min(captions[lo]["start"], captions[i]["start"])
                if span <= max_span_s:
                    lo, hi = min(lo, i), max(hi, i)
                    tokens += len(captions[i]["input_ids"])
                    grew = True
        if not grew:
            break
    return lo, hi


def examples_of_video(features: np.ndarray, captions: list[dict], rng: np.random.Generator,
                      cfg: DataConfig, max_video_tokens: int) -> list[dict]:
    """``cfg.clips_per_video`` examples of one video (features [seconds, dim], timed captions)."""
    timed = [c for c in captions if c["start"] is not None and c["end"] is not None]
    if not timed or len(features) == 0:
        return []
    out = []
    for _ in range(cfg.clips_per_video):
        target = int(rng.integers(cfg.min_text_tokens, cfg.max_text_tokens + 1))
        lo, hi = grow_span(timed, int(rng.integers(len(timed))), target, cfg.max_span_s)
        ids = [i for c in timed[lo:hi + 1] for i in c["input_ids"]][:cfg.max_text_tokens]
        first, last = seconds_of_span(timed[lo]["start"], timed[hi]["end"], len(features))
        video = features[first:last][:max_video_tokens]
        out.append({"video": np.asarray(video, np.float32), "text_ids": np.asarray(ids, np.int64)})
    return out


def seconds_of_span(start: float, end: float, num_seconds: int) -> tuple[int, int]:
    """S3D seconds ``[first, last)`` of a span: floor(start)..ceil(end), at least one second, inside
    the video's ``num_seconds`` features."""
    first = min(int(math.floor(start)), num_seconds - 1)
    return first, max(first + 1, min(int(math.ceil(end)), num_seconds))


def clip_examples_of_video(video_id: str, features: np.ndarray, captions: list[dict],
                           max_video_tokens: int, max_text_tokens: int) -> list[dict]:
    """One fine-tuning example per timed caption (a clip): its seconds of video and its ids.
    ``clip_index`` is the caption's index in the video, as in the clip pipeline."""
    out = []
    for index, caption in enumerate(captions):
        if caption["start"] is None or caption["end"] is None or len(features) == 0:
            continue
        first, last = seconds_of_span(caption["start"], caption["end"], len(features))
        out.append({"video_id": video_id, "clip_index": index, "start": float(caption["start"]),
                    "end": float(caption["end"]), "caption": caption["text"],
                    "video": np.asarray(features[first:last][:max_video_tokens], np.float32),
                    "text_ids": np.asarray(caption["input_ids"][:max_text_tokens], np.int64)})
    return out


def segment_windows(video_id: str, features: np.ndarray, labels: np.ndarray, window: int,
                    stride: int) -> list[dict]:
    """Sliding windows over a video's seconds (``window`` long, every ``stride``; the last one
    ends at the video's end) with their per-second labels; ``first`` is the window's first second."""
    starts = list(range(0, max(len(features) - window, 0) + 1, stride))
    if starts[-1] + window < len(features):
        starts.append(len(features) - window)
    return [{"video_id": video_id, "first": s, "video": np.asarray(features[s:s + window], np.float32),
             "labels": np.asarray(labels[s:s + window], np.int64)} for s in starts]


def collate(examples: dict, max_video_tokens: int, max_text_tokens: int, sep_id: int,
            pad_id: int = 0) -> dict:
    """Pad a batch of examples (numpy dict from Ray Data) into model tensors, to the batch's longest
    video and text (at most ``max_video_tokens`` / ``max_text_tokens``), not to those maxima:
    padded slots are masked out and the text keeps its positions whatever the video's padding
    (:func:`vidray.models.vlm.position_ids`), so the model computes what it would on fully padded
    rows, on fewer slots (a demo pre-training batch: 68 slots on average instead of 96)."""
    import torch

    dim = examples["video"][0].shape[-1]
    videos = [np.asarray(v, np.float32).reshape(-1, dim) for v in examples["video"]]
    texts = [np.asarray(t, np.int64)[:max_text_tokens] for t in examples["text_ids"]]
    batch = len(videos)
    lv = max(1, min(max_video_tokens, max(len(v) for v in videos)))
    lt = max(len(t) for t in texts) + 1  # + the final [SEP]
    video = torch.zeros(batch, lv, dim)
    video_mask = torch.zeros(batch, lv, dtype=torch.bool)
    text_ids = torch.full((batch, lt), pad_id, dtype=torch.long)
    text_mask = torch.zeros(batch, lt, dtype=torch.bool)
    for b, (v, t) in enumerate(zip(videos, texts)):
        v = v[:lv]
        video[b, :len(v)] = torch.from_numpy(v)
        video_mask[b, :len(v)] = True
        text_ids[b, :len(t)] = torch.from_numpy(t)
        text_ids[b, len(t)] = sep_id
        text_mask[b, :len(t) + 1] = True
    return {"video": video, "video_mask": video_mask, "text_ids": text_ids, "text_mask": text_mask}


def _video_seed(seed: int, epoch: int, video_id: str) -> int:
    return zlib.crc32(f"{seed}:{epoch}:{video_id}".encode())


def _to_examples(batch: pa.Table, text: pa.Table, cfg: DataConfig, max_video_tokens: int,
                 seed: int, epoch: int) -> dict:
    index = pc.index_in(batch["video_id"], value_set=text["video_id"]).to_pylist()
    videos, texts = [], []
    for row, t in zip(batch.to_pylist(), index):
        if t is None:
            continue
        features = np.asarray(row["features"], np.float32)
        captions = text["captions"][t].as_py()
        rng = np.random.default_rng(_video_seed(seed, epoch, row["video_id"]))
        for ex in examples_of_video(features, captions, rng, cfg, max_video_tokens):
            videos.append(ex["video"])
            texts.append(ex["text_ids"])
    return {"video": _ragged(videos), "text_ids": _ragged(texts)}


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def text_table(text_uri: str, manifest_uri: str = "", split: str = "") -> pa.Table:
    """``video_id, captions`` of a committed text set, restricted to a manifest split if given.
    The text set is small (ids of captions): it is read whole and broadcast to the Ray tasks."""
    from vidray.feature_store import store

    table = pa.concat_tables([store.read_parquet(u, ["video_id", "captions"])
                              for u in store.open_version(text_uri).part_uris])
    if manifest_uri:

        keep = read_manifest(manifest_uri)
        keep = keep.filter(pc.equal(keep["split"], split))["video_id"]
        table = table.filter(pc.is_in(table["video_id"], value_set=keep))
    return table


def with_video_dim(cfg, features_uri: str):
    """A copy of the job config ``cfg`` whose ``model.video_dim`` is the width of the feature set
    at ``features_uri`` (its manifest's ``dims``: 512 for S3D, 1280 for image2d); a set value
    that disagrees is refused. A copy, so the caller's config (and the run name hashed from a
    resolved one) does not change under it."""
    from vidray.feature_store import store

    width = store.open_version(features_uri).manifest.get("dims", {}).get("features")
    if width is None:
        raise ConfigError("data.features", f"{features_uri} is not a per-second video feature set "
                          "(no 'features' width in its manifest); use an s3d or image2d set")
    if cfg.model.video_dim not in (None, width):
        raise ConfigError("model.video_dim", f"is {cfg.model.video_dim} but {features_uri} holds "
                          f"{width}-wide features; leave it null to take the set's width")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, video_dim=width))


def examples_dataset(cfg: DataConfig, max_video_tokens: int, seed: int = 0, epoch: int = 0):
    """A Ray Dataset of training examples (columns ``video``, ``text_ids``)."""
    from vidray.feature_store import store

    text = text_table(cfg.text, cfg.manifest, cfg.split)
    ds = store.open_dataset(cfg.features, columns=["video_id", "features"])
    return ds.map_batches(_to_examples, batch_format="pyarrow", batch_size=4,
                          fn_kwargs={"text": text, "cfg": cfg, "max_video_tokens": max_video_tokens,
                                     "seed": seed, "epoch": epoch})


# --- fine-tuning examples (retrieval and captioning clips, segmentation windows) -----------------

def segment_classes(labels_uri: str) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Segments per video and the label vocabulary of a COIN-format file."""

    if not labels_uri:
        raise ConfigError("data.labels", "is required for action_segmentation: a COIN-format "
                          "annotation file (the synthetic corpus writes coin.json)")
    segments = read_action_segments(labels_uri).segments
    return segments, label_vocabulary(segments)


def text_budget(model: ModelConfig) -> int:
    """Text tokens a clip may carry: the sequence minus [CLS], the video slots and two [SEP]."""
    return model.max_seq_len - model.max_video_tokens - 3


def collate_windows(examples: dict, window: int) -> dict:
    """Pad windows of seconds (and their labels) into ``video, video_mask, labels``."""
    import torch

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
