"""The Ray Data clip pipeline: manifest -> sparsely sampled frames, one row per clip.

    manifest.parquet --(one task per block of videos)--> probe + seek-based sparse decode
        -> OUT/clips/*.parquet     clip parts only, every one of CLIPS_SCHEMA: video_id, clip_index,
                                   start_s, end_s, texts, frames (uint8 [T,H,W,3] flattened), height,
                                   width, timestamps
        -> OUT/_quarantine/*.json  one file per video with records, written from inside the tasks
        -> OUT/quarantine.parquet  video_id, uri, clip_index, error (all those records, gathered)

A clip is a timestamped caption's segment (``clip="captions"``, HowTo100M / YouCook2 / the
synthetic corpus) or the whole video (``clip="video"``, or captions without timestamps as in
WebVid and MSR-VTT, whose texts all go with the one clip). ``end_s`` is the caption's end, or
the video's duration for a whole-video clip or a clipped caption.

Captions past the end (ASR timings often overrun the file): a span that ends after the video
(by more than ``OVERRUN_TOLERANCE_S``) is clipped to its end, one that starts at or after the
end is skipped; each is a quarantine record with its ``clip_index`` and a reason naming the span,
the video's duration and what was done, and the report counts them. The video's other clips
are kept.

Errors are caught per video, not per block: a bad video becomes one quarantine record with
``clip_index`` null (its reason included) and the rest of its block goes on. Ray Data's
``max_errored_blocks`` would instead drop whole blocks of good videos silently. A video's records
are written as one small JSON file under ``OUT/_quarantine/`` from inside the task (named after
the video_id, so a retried task overwrites rather than duplicates them) and gathered into
``quarantine.parquet`` at the end; this keeps the single streaming pass over the frames, which
are far too big to materialise.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vidray import storage
from vidray.cluster import init_ray
from vidray.config import ConfigError, missing_required, option
from vidray.data import video
from vidray.data.manifest import read_manifest
from vidray.data.quarantine import (SKIPPED, gather_quarantine, overrun_counts, quarantine_record,
                                    write_quarantine)

# Every part of OUT/clips is written with this schema, so the folder reads as one table: left to
# inference, a part whose clips all had an unknown end stored end_s as type null. Plain Arrow
# types (no Ray tensor extension), so any Parquet reader gets the frames: reshape a row's to
# [len(timestamps), height, width, 3]. large_list: one video's clips can pass 2 GiB of pixels
# (a clip of 256 frames at 224 px is 38 MB), more than 32-bit list offsets address.
CLIPS_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("clip_index", pa.int32()), ("start_s", pa.float64()),
    ("end_s", pa.float64()), ("texts", pa.list_(pa.string())), ("frames", pa.large_list(pa.uint8())),
    ("height", pa.int32()), ("width", pa.int32()), ("timestamps", pa.list_(pa.float64()))])


def clip_row_frames(row: dict[str, Any]) -> np.ndarray:
    """uint8 ``[T, H, W, 3]``: a clip row's frames, as stored flat in :data:`CLIPS_SCHEMA`."""
    return np.asarray(row["frames"], np.uint8).reshape(len(row["timestamps"]), row["height"], row["width"], 3)


@dataclass
class ClipsConfig:
    manifest: str = option("", "manifest.parquet to read (local path or s3://)", required=True)
    output: str = option("", "folder or prefix for clips/ and quarantine.parquet", required=True)
    num_frames: int = option(4, "frames per clip (3 All-in-one, 4-5 LAVENDER / E-ViLM)", ge=1, le=256)
    strategy: Literal["uniform", "random"] = option(
        "uniform", "segment centres, or a random time per segment (seeded per clip)")
    size: Optional[int] = option(224, "shorter side, then centre crop size x size; null = native", ge=8)
    clip: Literal["captions", "video"] = option(
        "captions", "one clip per timestamped caption, or one clip per video")
    split: Optional[str] = option(None, "only videos of this split; null = all")
    limit: Optional[int] = option(None, "only the first N videos (smoke runs)", ge=1)
    seed: int = option(0, "seed of the random strategy")
    timeout_s: float = option(120.0, "give up on one video after this long (quarantined)", gt=0)
    overwrite: bool = option(False, "replace an existing output instead of refusing")
    ray_address: Optional[str] = option(None, "Ray cluster address; null = $RAY_ADDRESS or local")

    def validate(self) -> None:
        missing = missing_required(self)
        if missing:
            raise ConfigError(missing[0][0], "is required (a local path or s3:// URI)")


def clip_specs(captions: list[dict] | None, duration_s: float | None, mode: str) -> list[dict]:
    """The clips of one video: (start_s, end_s, texts) per clip, in caption order.

    ``end_s`` None means "to the end of the video" (resolved by the sampler from the stream).
    """
    captions = captions or []
    timed = [c for c in captions if c.get("start") is not None and c.get("end") is not None
             and c["end"] > c["start"]]
    if mode == "captions" and timed:
        return [{"start_s": float(c["start"]), "end_s": float(c["end"]), "texts": [c["text"]]}
                for c in timed]
    return [{"start_s": 0.0, "end_s": duration_s, "texts": [c["text"] for c in captions]}]


def clip_seed(seed: int, video_id: str, clip_index: int) -> int:
    """A seed that is the same in every process (Python's hash() is salted per process)."""
    return zlib.crc32(f"{seed}:{video_id}:{clip_index}".encode())


# A caption that ends this little after the video is not an overrun but rounding: the container
# states its duration in its time base (a synthetic 2.3333 s video reads as 2.3330 s), and
# annotations round too. Such a clip keeps its caption's end and is not recorded.
OVERRUN_TOLERANCE_S = 0.1


def _seconds(t: float) -> str:
    """A time for a reason: millisecond precision, always with a decimal point (80.0, 79.5)."""
    return str(round(float(t), 3))


def overrun_reason(spec: dict[str, Any], sampled) -> str:
    """Why caption ``spec`` is a quarantine record: it was clipped (``sampled`` is the
    ``SampledFrames`` of :func:`vidray.data.video.iter_clips`) or skipped (a ``SkippedSpan``)."""
    span = f"span [{_seconds(spec['start_s'])}, {_seconds(spec['end_s'])})"
    ends = f"the video's end ({_seconds(sampled.video_duration_s)} s)"
    if not isinstance(sampled, video.SkippedSpan):
        return f"{span} runs past {ends}: clipped to [{_seconds(sampled.start_s)}, {_seconds(sampled.end_s)})"
    return f"{span} starts at or after {ends}{SKIPPED}"


def _overrun_records(row: dict[str, Any], late: list[tuple]) -> list[dict]:
    return [{"video_id": row["video_id"], "uri": row["uri"], "clip_index": i,
             "error": overrun_reason(spec, sampled)} for i, spec, sampled in late]


def iter_video_clips(row: dict[str, Any], *, num_frames: int, strategy: str, size: int | None,
                     clip: str, seed: int, timeout_s: float = 120.0,
                     overruns: list[dict] | None = None) -> Iterator[dict[str, Any]]:
    """The clips of one manifest row with their frames and timestamps (one open of the video),
    one at a time: the ``frames`` extractor compresses each as it comes, so a long video's raw
    frames are never all in memory. Raises on an unreadable video.

    A caption that runs past the video's end (by more than :data:`OVERRUN_TOLERANCE_S`) is
    clipped to it (the row's ``end_s`` says so); one that starts at or after the end yields
    nothing. When the video is done, ``overruns`` (if given) gets a quarantine record for each,
    with its ``clip_index``."""
    specs = clip_specs(row.get("captions"), row.get("duration_s"), clip)
    sampled = video.iter_clips(
        row["uri"], [(s["start_s"], s["end_s"]) for s in specs], num_frames, strategy=strategy,
        size=size, timeout_s=timeout_s, past_end="skip",
        seeds=[clip_seed(seed, row["video_id"], i) for i in range(len(specs))])
    late = []
    for i, (spec, frames) in enumerate(zip(specs, sampled)):
        if isinstance(frames, video.SkippedSpan):  # starts at or after the end
            late.append((i, spec, frames))
            continue
        clipped = spec["end_s"] is not None and frames.end_s < spec["end_s"] - OVERRUN_TOLERANCE_S
        if clipped:
            late.append((i, spec, frames))
        end_s = frames.end_s if clipped or spec["end_s"] is None else spec["end_s"]
        yield {"video_id": row["video_id"], "clip_index": i, "start_s": frames.start_s, "end_s": end_s,
               "texts": spec["texts"], "frames": frames.frames, "timestamps": frames.timestamps}
    if overruns is not None:
        overruns.extend(_overrun_records(row, late))


def decode_video_clips(row: dict[str, Any], cfg: ClipsConfig) -> list[dict[str, Any]]:
    """The good clip rows of one manifest row (none if it can't be read), after writing its
    quarantine records: the whole video's failure, or each caption past its end."""
    records: list[dict] = []
    try:
        clips = list(iter_video_clips(row, num_frames=cfg.num_frames, strategy=cfg.strategy, size=cfg.size,
                                      clip=cfg.clip, seed=cfg.seed, timeout_s=cfg.timeout_s, overruns=records))
    except Exception as err:  # noqa: BLE001 - any failure of one video quarantines that video only
        clips, records = [], [quarantine_record(row, err)]
    if records:
        write_quarantine(cfg.output, row["video_id"], records)
    return clips


def clips_table(clips: list[dict[str, Any]]) -> pa.Table:
    """Clip rows as a table of :data:`CLIPS_SCHEMA`. Each clip's frames become one chunk that
    shares the numpy buffer, so the conversion copies no pixels."""
    frames = pa.chunked_array(
        [pa.LargeListArray.from_arrays(pa.array([0, c["frames"].size], pa.int64()),
                                       pa.array(c["frames"].reshape(-1), pa.uint8())) for c in clips],
        CLIPS_SCHEMA.field("frames").type)
    columns = {name: [c[name] for c in clips] for name in ("video_id", "clip_index", "start_s", "end_s", "texts")}
    return pa.table({**columns, "frames": frames,
                     "height": [c["frames"].shape[1] for c in clips],
                     "width": [c["frames"].shape[2] for c in clips],
                     "timestamps": [np.asarray(c["timestamps"], np.float64) for c in clips]},
                    schema=CLIPS_SCHEMA)


def _decode_batch(videos: pa.Table, cfg: ClipsConfig) -> Iterator[pa.Table]:
    """Ray Data map: one table of :data:`CLIPS_SCHEMA` per readable video of the batch."""
    for row in videos.to_pylist():
        clips = decode_video_clips(row, cfg)
        if clips:
            yield clips_table(clips)


def _prepare_output(cfg: ClipsConfig) -> None:
    fs, path = storage.filesystem(cfg.output)
    existing = fs.exists(path) and fs.ls(path)
    if existing and not cfg.overwrite:
        raise FileExistsError(f"{cfg.output} already holds output; pass overwrite=true to replace it")
    if existing:
        fs.rm(path, recursive=True)
    storage.makedirs(cfg.output)


def _select_videos(cfg: ClipsConfig) -> pa.Table:
    table = read_manifest(cfg.manifest)
    if cfg.split:
        table = table.filter(pc.equal(table["split"], cfg.split))
    if cfg.limit:
        table = table.slice(0, cfg.limit)
    return table


def build_clip_dataset(cfg: ClipsConfig, videos: pa.Table, parallelism: int):
    """The lazy Ray Dataset of clip rows (nothing runs until it is consumed). One video per call,
    whose clips leave as one table of the declared schema, so a task holds one video's frames."""
    return video_blocks(videos, parallelism).map_batches(
        _decode_batch, batch_format="pyarrow", batch_size=1, num_cpus=1, fn_kwargs={"cfg": cfg})


def video_blocks(videos: pa.Table, parallelism: int):
    """A Ray Dataset of manifest rows in small blocks, ready for a decoding map."""
    import ray

    # Small blocks of videos: parallelism across tasks, and a bad video costs only its own row.
    num_blocks = max(1, min(videos.num_rows, max(parallelism * 4, videos.num_rows // 8)))
    ds = ray.data.from_arrow(videos).repartition(num_blocks)
    # Ray Data reserves half of the cluster's CPUs for operators other than the busy one, so a
    # decoding map ran one task at a time on 2 CPUs (the decode benchmark: +81% over plain
    # processes). Decoding is the only operator that needs CPUs here; memory stays bounded by
    # Ray Data's object-store limit, which applies without the reservation.
    ds.context.op_resource_reservation_enabled = False
    return ds


def run_clips(cfg: ClipsConfig) -> dict[str, Any]:
    """Run the pipeline end to end; returns a report (counts, throughput, quarantine reasons)."""
    import ray

    if not ray.is_initialized():
        init_ray(address=cfg.ray_address)
    started = time.monotonic()
    videos = _select_videos(cfg)
    _prepare_output(cfg)
    parallelism = int(ray.cluster_resources().get("CPU", 1))
    clips_uri = storage.join(cfg.output, "clips")
    arrow_fs, clips_path = storage.arrow_filesystem(clips_uri)
    build_clip_dataset(cfg, videos, parallelism).write_parquet(clips_path, filesystem=arrow_fs)
    quarantine = gather_quarantine(cfg.output)
    seconds = time.monotonic() - started
    counts = overrun_counts(quarantine)
    return {
        "videos": videos.num_rows,
        "videos_ok": videos.num_rows - counts["quarantined"],
        **counts,
        "clips": count_rows(clips_uri),
        "seconds": round(seconds, 2),
        "videos_per_s": round(videos.num_rows / seconds, 2) if seconds else None,
        "clips_uri": clips_uri,
        "quarantine_uri": storage.join(cfg.output, "quarantine.parquet"),
        # Whole videos only: captions past the end are counted here, listed in quarantine.parquet.
        "quarantine_reasons": {r["video_id"]: r["error"] for r in quarantine.to_pylist()
                               if r["clip_index"] is None},
        "config": asdict(cfg),
    }


def count_rows(clips_uri: str) -> int:
    """Rows in a folder of Parquet parts, from the footers only."""
    arrow_fs, path = storage.arrow_filesystem(clips_uri)
    dataset = pq.ParquetDataset(path, filesystem=arrow_fs)
    return sum(fragment.metadata.num_rows for fragment in dataset.fragments)
