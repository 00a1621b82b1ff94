"""The split extraction pipeline of the per-second sets (s3d, image2d): CPU decode tasks feed
network actors in one Ray Data pipeline; the driver puts each video back together and writes the parts.

    videos of the pending shards -> decode (Ray Data tasks, one CPU each: a video's one-second
    windows, seconds_per_batch at a time) -> network (an actor pool: one actor per GPU, or
    actors_per_gpu) -> driver (a video's batches in order, a shard's videos) -> quarantine
    file, then part

In the fused pipeline (`extract.ShardWorker`) each actor decodes and runs its network in turn,
so a GPU waits while its actor decodes. Here decoding runs on every CPU of the cluster at once
and the GPUs run the network only. The price: windows cross Ray's object store (S3D at 224 px
and 30 fps: 4.5 MB a second of video; Ray Data's backpressure bounds how many are in flight),
and the features come to the driver (1 KB a second for S3D, 2.5 KB for EfficientNet-Lite),
which writes a shard's part once all its videos are in.

Exactly once as in the fused pipeline: a part is written only when every video of its shard has
its last batch (or an error: quarantined); a batch seen twice (a task run again after a lost
node) is dropped by its (video, index); the part's existence marks the shard done for a rerun.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Iterator

import numpy as np
import pyarrow as pa

from vidray import storage
from vidray.config import from_dict
from vidray.data.quarantine import quarantine_record
from vidray.feature_store import store
from vidray.feature_store.extractors import EXTRACTORS, per_second_table

# One row per batch of windows; ``windows`` holds ``count`` windows (uint8, C order) and is
# empty on the row that reports a video's error.
DECODED_SCHEMA = pa.schema([("shard", pa.int64()), ("video_id", pa.string()), ("index", pa.int32()),
                            ("count", pa.int32()), ("last", pa.bool_()), ("error", pa.string()),
                            ("unreachable", pa.bool_()), ("windows", pa.large_binary())])


def _extractor(name: str, settings: dict):
    """(the extractor's class, its config) from what a task or actor is handed."""
    config_cls, extractor_cls = EXTRACTORS[name]
    return extractor_cls, from_dict(config_cls, settings)


# --- decode: Ray Data tasks ------------------------------------------------------------------

def decode_videos(batch: pa.Table, name: str, settings: dict) -> Iterator[pa.Table]:
    """The decode stage: each video of ``batch`` as rows of windows, a batch of them at a time
    (a generator, so one batch is in memory, not the video)."""
    extractor_cls, cfg = _extractor(name, settings)
    for shard, video in zip(batch["shard"].to_pylist(), batch["video"].to_pylist()):
        video = json.loads(video)
        for row in _decoded(shard, video, extractor_cls.window_batches(cfg, video["uri"])):
            yield pa.Table.from_pylist([row], schema=DECODED_SCHEMA)


def _decoded(shard: int, video: dict, batches: Iterator[np.ndarray]) -> Iterator[dict]:
    """A video's batches as rows, the last one marked (held back until the next one shows there is
    none); a video that fails ends with a row that says why, whatever came before it."""
    row = {"shard": shard, "video_id": video["video_id"], "error": "", "unreachable": False}
    held, index = None, 0
    try:
        # Wait for storage that does not answer before decoding (a decode error is quarantined).
        storage.call_with_retries(lambda: storage.exists(video["uri"]), video["uri"])
        for windows in batches:
            if held is not None:
                yield held
            held = {**row, "index": index, "count": len(windows), "last": False,
                    "windows": np.ascontiguousarray(windows).tobytes()}
            index += 1
        if held is None:
            raise ValueError("no frames to make a one-second window of")
    except Exception as err:  # noqa: BLE001 - the video is quarantined (or the run stops), not the job
        yield {**row, "index": index, "count": 0, "last": True, "windows": b"",
               "error": quarantine_record(video, err)["error"],
               "unreachable": storage.is_remote(video["uri"]) and storage.is_unreachable(err)}
        return
    yield {**held, "last": True}


# --- network: an actor pool --------------------------------------------------------------------

class NetworkWorker:
    """The network stage: an extractor's network, built once per actor, turning batches of
    windows into features (L2-normalised fp16, as the fused pipeline writes them)."""

    def __init__(self, name: str, settings: dict, use_gpu: bool, cpus: int):
        import torch

        torch.set_num_threads(max(1, cpus))
        extractor_cls, cfg = _extractor(name, settings)
        self.extractor = extractor_cls(cfg, "cuda" if use_gpu else "cpu")
        self.shape = self.extractor.window_shape(cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        features = []
        for count, data in zip(batch["count"].to_pylist(), batch["windows"].to_pylist()):
            if count == 0:
                features.append(b"")
                continue
            windows = np.frombuffer(data, np.uint8).reshape(count, *self.shape)
            features.append(self.extractor.features(windows).tobytes())
        return batch.drop_columns(["windows"]).append_column("features", pa.array(features, pa.binary()))


# --- driver: videos and parts ------------------------------------------------------------------

class Assembler:
    """Collects the network's rows into videos and videos into shards; a shard whose every video
    is in (its features, or its error) is returned once, ready to write."""

    def __init__(self, pending: list[tuple[int, list[dict]]], dim: int):
        self.dim = dim
        self.videos = {v["video_id"]: v for _, videos in pending for v in videos}
        self.waiting = {shard: {v["video_id"] for v in videos} for shard, videos in pending}
        self.order = {shard: [v["video_id"] for v in videos] for shard, videos in pending}
        self.batches: dict[str, dict[int, np.ndarray]] = {}
        self.ends: dict[str, int] = {}        # video -> index of its last batch
        self.finished: dict[str, dict] = {}   # video -> its row, or its quarantine record

    def add(self, row: dict) -> list[int]:
        """Take one row of the network; returns the shards it completed (each once)."""
        video = row["video_id"]
        if video in self.finished:                       # a duplicate, or a batch after an error
            return []
        if row["error"]:
            self.finished[video] = {"quarantine": quarantine_record(self.videos[video], row["error"])}
        else:
            self.batches.setdefault(video, {}).setdefault(row["index"], np.frombuffer(
                row["features"], np.float16).reshape(row["count"], self.dim))
            if row["last"]:
                self.ends[video] = row["index"]
            have = self.batches[video]
            if video not in self.ends or len(have) < self.ends[video] + 1:
                return []
            features = np.concatenate([have[i] for i in range(self.ends[video] + 1)])
            self.finished[video] = {"row": {"video_id": video, "num_seconds": len(features),
                                            "features": features}}
            del self.batches[video]
        shard = row["shard"]
        self.waiting[shard].discard(video)
        return [shard] if not self.waiting[shard] else []

    def shard(self, shard: int) -> tuple[list[dict], list[dict]]:
        """(feature rows, quarantine records) of a completed shard, in its videos' order."""
        done = [self.finished.pop(v) for v in self.order[shard]]
        return [d["row"] for d in done if "row" in d], [d["quarantine"] for d in done if "quarantine" in d]


def shard_summaries(name: str, settings, version: str, pending: list[tuple[int, list[dict]]], workers: int,
                    use_gpu: bool, actors_per_gpu: int) -> Iterator[dict]:
    """Extract ``pending`` shards of the ``name`` extractor (config ``settings``) into ``version``
    through the split pipeline (see the module); yields each shard's summary once its part is
    written, as the fused pipeline's actors do (``extract.follow`` shows them)."""
    import ray

    dim = EXTRACTORS[name][1].output_dim(settings)
    settings = asdict(settings)
    items = pa.table({"shard": [s for s, videos in pending for _ in videos],
                      "video": [json.dumps(v, default=str) for _, videos in pending for v in videos]})
    cpus = int(ray.cluster_resources().get("CPU", 1))
    ds = (ray.data.from_arrow(items).repartition(max(1, min(items.num_rows, cpus * 4)))
          .map_batches(decode_videos, batch_format="pyarrow", batch_size=1, num_cpus=1,
                       fn_kwargs={"name": name, "settings": settings})
          .map_batches(NetworkWorker, batch_format="pyarrow", batch_size=1,
                       compute=ray.data.ActorPoolStrategy(size=workers),
                       fn_constructor_kwargs={"name": name, "settings": settings, "use_gpu": use_gpu, "cpus": 1},
                       num_gpus=1 / actors_per_gpu if use_gpu else 0, num_cpus=1))
    ds.context.op_resource_reservation_enabled = False  # as in clips.video_blocks: decode needs the CPUs
    assembler = Assembler(pending, dim)
    for row in ds.iter_rows():
        if row["unreachable"]:
            yield {"shard": row["shard"], "videos": 0, "quarantined": 0, "unreachable": row["error"]}
            return
        for shard in assembler.add(row):
            rows, records = assembler.shard(shard)
            storage.call_with_retries(lambda: store.write_shard(version, shard, per_second_table(rows, dim), records),
                                      version)
            yield {"shard": shard, "videos": len(assembler.order[shard]), "quarantined": len(records),
                   "unreachable": ""}
