"""`vidray extract`: a one-time job that caches one extractor's output as a feature-set version.

    manifest -> shards of videos (sorted by video_id) -> Ray Data actor pool (one extractor,
    model loaded once per actor; GPU actors when the cluster has GPUs) -> per shard: quarantine
    file (_quarantine/), then part file -> _manifest.json last (the commit; see store.py)

**Incremental versions.** Shards are cut where the videos' ids say (:func:`shards_of`), not by
position, and each part is keyed by its content (:func:`part_key`: the shard's source rows and
the extractor's config, weights and schema). A new version (more videos, a changed caption)
copies every part whose key an earlier committed version of the set holds, and extracts only the
shards that are new or changed.

The quarantine holds the videos that could not be read and, for the clip extractors (frames,
vq), each caption past its video's end (clipped to the end, or skipped if it starts there or
later); the manifest and the report count them as ``quarantined`` (videos), ``clips_clipped``
and ``clips_skipped``.

Each shard is decoded, extracted and written inside one actor call, so the bulky per-video data
(S3D windows, frames) streams from the decoder to the model to storage and never crosses Ray's
object store; only a small summary per shard comes back to the driver, which shows progress.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vidray import storage
from vidray.cluster import init_ray
from vidray.config import ConfigError, from_dict, missing_required, option
from vidray.data.manifest import read_manifest
from vidray.data.quarantine import conform, overrun_counts, quarantine_record
from vidray.feature_store import store
from vidray.feature_store.extractors import (EXTRACTORS, FramesExtractConfig, Image2DExtractConfig,
                                             S3DExtractConfig, TextExtractConfig, VQExtractConfig)
from vidray.feature_store.split import shard_summaries


# The extractors the split pipeline runs: a network fed one-second windows (feature_store.split).
SPLIT_EXTRACTORS = ("s3d", "image2d")


@dataclass
class ExtractConfig:
    manifest: str = option("", "source manifest.parquet (local path or s3://)", required=True)
    root: str = option("", "feature-store root; the set goes to <root>/<name>/<version>/", required=True)
    extractor: Literal["s3d", "image2d", "text", "frames", "vq"] = option("s3d", "which extractor to run")
    name: Optional[str] = option(None, "feature-set name; null = the extractor's name", name=True)
    s3d: S3DExtractConfig = field(default_factory=S3DExtractConfig)
    image2d: Image2DExtractConfig = field(default_factory=Image2DExtractConfig)
    text: TextExtractConfig = field(default_factory=TextExtractConfig)
    frames: FramesExtractConfig = field(default_factory=FramesExtractConfig)
    vq: VQExtractConfig = field(default_factory=VQExtractConfig)
    videos_per_part: int = option(16, "videos per Parquet part on average, at most twice that (a part is the "
                                  "unit of exactly-once and of reuse by later versions)", ge=1)
    split: Optional[str] = option(None, "only videos of this split; null = all")
    limit: Optional[int] = option(None, "only the first N videos by id (smoke runs)", ge=1)
    num_workers: Optional[int] = option(None, "extractor actors; null = actors_per_gpu per GPU, else one per CPU",
                                        ge=1)
    use_gpu: Optional[bool] = option(None, "GPU actors; null = when the cluster has GPUs")
    pipeline: Literal["auto", "fused", "split"] = option(
        "auto", "fused: each actor decodes its videos and runs the network in turn; split (s3d, image2d): "
        "CPU decode tasks feed the network's actors (one per GPU, or actors_per_gpu) through Ray Data, so "
        "the GPUs wait for no decoding; auto = split on GPUs, fused on CPUs")
    actors_per_gpu: int = option(1, "GPU actors sharing each GPU (each asks for 1/N of one): while one decodes "
                                 "on the CPU another runs its network", ge=1)
    ray_address: Optional[str] = option(None, "Ray cluster address; null = $RAY_ADDRESS or local")

    def validate(self) -> None:
        missing = missing_required(self)
        if missing:
            raise ConfigError(missing[0][0], "is required (a local path or s3:// URI)")
        if self.pipeline == "split" and self.extractor not in SPLIT_EXTRACTORS:
            raise ConfigError("pipeline", f"split runs the per-second extractors ({', '.join(SPLIT_EXTRACTORS)}); "
                              f"{self.extractor} has no network to feed: use fused or auto")
        rate = getattr(self.extractor_config, "fps", None)
        if rate is not None and (rate < 1 or rate != round(rate)):
            raise ConfigError(f"{self.extractor}.fps", f"is {rate}: use a whole number of frames per "
                              "second (>= 1), so every one-second window holds the same frames")

    @property
    def extractor_config(self) -> Any:
        return getattr(self, self.extractor)

    @property
    def set_name(self) -> str:
        return self.name or self.extractor


def source_videos(cfg: ExtractConfig) -> pa.Table:
    """The manifest rows to extract, sorted by video_id (which fixes the shards)."""
    table = read_manifest(cfg.manifest)
    if cfg.split:
        table = table.filter(pc.equal(table["split"], cfg.split))
    table = table.sort_by("video_id")
    if cfg.limit:
        table = table.slice(0, cfg.limit)
    ids = table["video_id"].to_pylist()
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"{cfg.manifest}: duplicate video_id {dupes}; a manifest names each video once")
    return table


# The manifest columns an extractor reads: what a set's (and a part's) content depends on.
SOURCE_COLUMNS = ("video_id", "uri", "captions", "duration_s")
# How videos are cut into parts (:func:`shards_of`); part of the version, so that an unfinished
# version of another cut is never resumed with this one.
SHARDING = "by-id-hash/v1"


def identity(cfg: ExtractConfig, videos: pa.Table) -> dict:
    """What determines the content of the set, and so its version."""
    _, extractor_cls = EXTRACTORS[cfg.extractor]
    return {
        "extractor": cfg.extractor,
        "config": asdict(cfg.extractor_config),
        "weights_digest": extractor_cls.weights_digest(cfg.extractor_config),
        "source_digest": store.digest(videos.select(list(SOURCE_COLUMNS)).to_pylist()),
        "schema_version": extractor_cls.schema_version,
        "videos_per_part": cfg.videos_per_part,
        "sharding": SHARDING,
    }


def part_key(ident: dict, videos: list[dict]) -> str:
    """The content of one part: its videos' source rows and what the extractor makes of them. Two
    versions' parts with the same key hold the same rows."""
    extractor = {k: ident[k] for k in ("extractor", "config", "weights_digest", "schema_version")}
    return store.digest({**extractor, "videos": [{k: v.get(k) for k in SOURCE_COLUMNS} for v in videos]})


class ShardWriter:
    """Builds the extractor once, then extracts and writes whole shards: in the actors of a Ray
    Data pool (:class:`ShardWorker`), or in the driver for an extractor that needs no actor."""

    def __init__(self, cfg: ExtractConfig, version: str, device: str = "cpu"):
        self.cfg, self.version = cfg, version
        _, extractor_cls = EXTRACTORS[cfg.extractor]
        self.extractor = extractor_cls(cfg.extractor_config, device)

    def write_shard(self, shard: int, videos: list[dict]) -> dict:
        """Extract and write one shard; returns its summary. Storage that does not answer is
        waited for (never a reason to quarantine a video); if it stays down the shard is left
        unwritten, for a rerun, and the summary says why (Ray's task errors lose the type)."""
        started = time.monotonic()
        rows, records, bad = [], [], 0
        try:
            for video in videos:
                try:
                    video_rows, overruns = storage.call_with_retries(lambda: self._extract(video), video["uri"])
                except storage.StorageUnreachable:
                    raise
                except Exception as err:  # noqa: BLE001 - one bad video is quarantined, not fatal
                    video_rows, overruns, bad = [], [quarantine_record(video, err)], bad + 1
                rows.extend(video_rows)
                records.extend(overruns)
            store.write_shard(self.version, shard, self.extractor.to_table(rows), records)
        except storage.StorageUnreachable as err:
            return {"shard": shard, "videos": 0, "rows": 0, "quarantined": 0, "seconds": 0.0,
                    "unreachable": str(err)}
        return {"shard": shard, "videos": len(videos), "rows": len(rows), "quarantined": bad,
                "seconds": time.monotonic() - started, "unreachable": ""}

    def _extract(self, video: dict) -> tuple[list[dict], list[dict]]:
        """One video's rows and its captions past the end (quarantine records), in a fresh list
        per call: a retry after a storage error must not repeat the failed try's records."""
        overruns: list[dict] = []
        return self.extractor.extract(video, overruns=overruns), overruns


class ShardWorker(ShardWriter):
    """A Ray actor of the pool: a :class:`ShardWriter` with its share of the node's CPUs as torch
    threads, fed one shard per call."""

    def __init__(self, cfg_dict: dict, version: str, use_gpu: bool, cpus: int):
        import torch

        torch.set_num_threads(max(1, cpus))
        super().__init__(from_dict(ExtractConfig, cfg_dict), version, "cuda" if use_gpu else "cpu")

    def __call__(self, batch: dict) -> dict:
        summaries = [self.write_shard(int(shard), json.loads(videos))
                     for shard, videos in zip(batch["shard"], batch["videos"])]
        return {k: [s[k] for s in summaries] for k in summaries[0]}


def _ends_shard(video_id: str, per_part: int) -> bool:
    return int(hashlib.sha256(video_id.encode()).hexdigest()[:12], 16) % per_part == 0


def shards_of(videos: pa.Table, per_part: int) -> list[tuple[int, list[dict]]]:
    """The videos (sorted by id) cut into shards, numbered in order: a shard ends after a video
    whose id hashes to 0 modulo ``per_part`` (one video in ``per_part``), or once it holds
    ``2 * per_part`` videos. The cuts depend on the ids around them, not on positions, so adding
    videos changes only the shards they fall into (a cut forced by the cap can move to the next
    id-chosen one) and every other shard keeps its content, and with it its part."""
    shards, current = [], []
    for row in videos.to_pylist():
        current.append(row)
        if per_part == 1 or _ends_shard(row["video_id"], per_part) or len(current) >= 2 * per_part:
            shards.append(current)
            current = []
    if current:
        shards.append(current)
    return list(enumerate(shards))


def _earlier_parts(cfg: ExtractConfig, version: str) -> dict[str, tuple[str, dict]]:
    """The parts of the set's other committed versions by content key: (version URI, part entry).
    Versions written before parts were keyed have none to give."""
    found: dict[str, tuple[str, dict]] = {}
    for uri in store.committed_versions(storage.join(cfg.root, cfg.set_name)):
        if uri.rstrip("/") != version.rstrip("/"):
            for part in store.open_version(uri).manifest["parts"]:
                if "content" in part:
                    found.setdefault(part["content"], (uri, part))
    return found


def _reuse_parts(version: str, wanted: dict[int, str], earlier: dict[str, tuple[str, dict]]) -> dict[int, str]:
    """Copy into ``version`` every wanted shard (shard -> content key) that an earlier version
    holds, quarantine file first and part last (the part marks the shard done, as when it is
    extracted); returns shard -> the version it came from."""
    sources = {shard: earlier[key] for shard, key in wanted.items() if key in earlier}

    def copy(shard: int, source: tuple[str, dict]) -> None:
        uri, part = source
        storage.copy(storage.join(uri, part["quarantine"]), storage.join(version, store.quarantine_name(shard)))
        storage.copy(storage.join(uri, part["file"]), storage.join(version, store.part_name(shard)))

    with ThreadPoolExecutor(max_workers=8) as pool:  # server-side copies: waiting, not work
        list(pool.map(lambda item: copy(*item), sources.items()))
    return {shard: os.path.basename(uri.rstrip("/")) for shard, (uri, _) in sources.items()}


def _resources(cfg: ExtractConfig) -> tuple[bool, int]:
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    use_gpu = gpus > 0 if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu and gpus == 0:
        raise ValueError("use_gpu=true but the Ray cluster has no GPUs; set use_gpu=null or false")
    workers = cfg.num_workers or (gpus * cfg.actors_per_gpu if use_gpu else cpus)
    return use_gpu, workers


def _run_pending(cfg: ExtractConfig, version: str, pending: list[tuple[int, list[dict]]],
                 progress: bool) -> None:
    import ray

    use_gpu, workers = _resources(cfg)
    if cfg.pipeline == "split" or (cfg.pipeline == "auto" and use_gpu and cfg.extractor in SPLIT_EXTRACTORS):
        # On CPUs the network's actors take half the cores; the decode tasks the rest.
        actors = cfg.num_workers or (workers if use_gpu else max(1, workers // 2))
        summaries = shard_summaries(cfg.extractor, cfg.extractor_config, version, pending, actors, use_gpu,
                                    cfg.actors_per_gpu)
        follow(cfg, version, summaries, sum(len(v) for _, v in pending), progress)
        return
    workers = min(workers, len(pending))
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // workers) if not use_gpu else 1
    items = [{"shard": shard, "videos": json.dumps(videos, default=str)} for shard, videos in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
        fn_constructor_kwargs={"cfg_dict": asdict(cfg), "version": version, "use_gpu": use_gpu,
                               "cpus": cpus},
        num_gpus=1 / cfg.actors_per_gpu if use_gpu else 0, num_cpus=1 if use_gpu else cpus)
    follow(cfg, version, ds.iter_rows(), sum(len(v) for _, v in pending), progress)


def _run_in_driver(cfg: ExtractConfig, version: str, pending: list[tuple[int, list[dict]]],
                   progress: bool) -> None:
    """The shards one after the other in this process, for an extractor with ``runs_in_driver``
    (text: a tokenizer does in a second what an actor pool takes ten to start); no Ray at all."""
    writer = ShardWriter(cfg, version)
    follow(cfg, version, (writer.write_shard(shard, videos) for shard, videos in pending),
            sum(len(v) for _, v in pending), progress)


def follow(cfg: ExtractConfig, version: str, summaries, total: int, progress: bool) -> None:
    """Show the shards' summaries (``shard``, ``videos``, ``quarantined``, ``unreachable``) as they
    come; stop at the first that could not reach storage."""
    from tqdm import tqdm

    # disable=None: a bar on a terminal only (in a pipe or a job's log its redraws are noise)
    with tqdm(total=total, unit="video", desc=f"extract {cfg.extractor}", disable=None if progress else True) as bar:
        for summary in summaries:
            if summary["unreachable"]:  # stop here: every other shard would wait out the same outage
                raise storage.StorageUnreachable(f"{summary['unreachable']}; {version} stays uncommitted")
            bar.update(summary["videos"])
            bar.set_postfix(quarantined=summary["quarantined"], refresh=False)


def _quarantine_counts(version: str, shards: list) -> dict[str, int]:
    """Whole videos quarantined and captions clipped / skipped, from the shards' quarantine files
    (small: a few records per shard), which may come from an earlier, interrupted run."""
    tables = [conform(store.read_parquet(storage.join(version, store.quarantine_name(shard))))
              for shard, _ in shards]  # conformed first: an older run's files have no clip_index
    return overrun_counts(pa.concat_tables(tables))


def _manifest(cfg: ExtractConfig, ident: dict, version: str, shards: list, extractor_cls,
              keys: dict[int, str], reused: dict[int, str]) -> dict:
    parts = []
    for shard, videos in shards:
        fs, path = storage.arrow_filesystem(storage.join(version, store.part_name(shard)))
        parts.append({"file": store.part_name(shard), "quarantine": store.quarantine_name(shard),
                      "videos": len(videos), "rows": pq.read_metadata(path, filesystem=fs).num_rows,
                      "content": keys[shard],
                      **({"reused_from": reused[shard]} if shard in reused else {})})
    fs, path = storage.arrow_filesystem(storage.join(version, parts[0]["file"]))
    schema = pq.read_schema(path, filesystem=fs)
    dims = {c: schema.field(c).type.value_type.list_size for c in schema.names
            if pa.types.is_list(schema.field(c).type)
            and pa.types.is_fixed_size_list(schema.field(c).type.value_type)}
    return {
        "name": cfg.set_name, "version": os.path.basename(version), "extractor": cfg.extractor,
        "identity": ident, "config": asdict(cfg.extractor_config),
        "weights_digest": ident["weights_digest"],
        "source_manifest": {"uri": cfg.manifest, "digest": ident["source_digest"],
                            "split": cfg.split, "limit": cfg.limit},
        "key": extractor_cls.key, "dims": dims,
        # What readers must know about the values (the vq set: codebook size and region grid).
        "info": extractor_cls.info(cfg.extractor_config) if hasattr(extractor_cls, "info") else {},
        "schema": schema.to_string(show_schema_metadata=False),
        "schema_ipc": schema.serialize().to_pybytes().hex(),
        "parts": parts, "quarantine_files": [store.quarantine_name(s) for s, _ in shards],
        "rows": sum(p["rows"] for p in parts), "videos": sum(p["videos"] for p in parts),
        "reused_parts": len(reused), "reused_videos": sum(p["videos"] for p in parts if "reused_from" in p),
        **_quarantine_counts(version, shards), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _counts(manifest: dict) -> dict:
    """What the report says of the quarantine (versions before the caption counts have none)."""
    return {"quarantined": manifest["quarantined"], "clips_clipped": manifest.get("clips_clipped", 0),
            "clips_skipped": manifest.get("clips_skipped", 0)}


def run_extract(cfg: ExtractConfig, progress: bool = True, say=print) -> dict:
    """Extract (or finish extracting) the feature set of ``cfg``; returns a report."""
    import ray

    started = time.monotonic()
    _, extractor_cls = EXTRACTORS[cfg.extractor]
    if cfg.extractor == "s3d" and cfg.s3d.weights and not storage.exists(cfg.s3d.weights):
        raise FileNotFoundError(f"s3d.weights: {cfg.s3d.weights}: no such file or object")
    videos = source_videos(cfg)
    if videos.num_rows == 0:
        raise ValueError(f"{cfg.manifest}: no videos to extract (check split/limit)")
    ident = identity(cfg, videos)
    version = store.version_uri(cfg.root, cfg.set_name, store.version_id(ident))
    report = {"uri": version, "videos": videos.num_rows}
    if store.is_committed(version):
        manifest = store.open_version(version).manifest
        say(f"nothing to do: {version} is already committed ({manifest['rows']} rows, "
            f"{manifest['quarantined']} quarantined)")
        return {**report, "extracted_videos": 0, "rows": manifest["rows"], **_counts(manifest),
                "skipped_parts": len(manifest["parts"]), "reused_parts": 0, "reused_videos": 0}

    shards = shards_of(videos, cfg.videos_per_part)
    done = store.done_shards(version)
    if done:
        say(f"resuming {version}: {len(done)} of {len(shards)} parts already written")
    keys = {shard: part_key(ident, rows) for shard, rows in shards}
    wanted = {shard: key for shard, key in keys.items() if shard not in done}
    reused = _reuse_parts(version, wanted, _earlier_parts(cfg, version)) if wanted else {}
    if reused:
        say(f"{version}: reusing {len(reused)} of {len(shards)} parts from "
            f"{', '.join(sorted(set(reused.values())))}, whose videos and extractor are the same")
    pending = [(s, v) for s, v in shards if s not in done and s not in reused]
    if pending and getattr(extractor_cls, "runs_in_driver", False):
        _run_in_driver(cfg, version, pending, progress)
    elif pending:
        if not ray.is_initialized():
            init_ray(address=cfg.ray_address)
        _run_pending(cfg, version, pending, progress)
    missing = {s for s, _ in shards} - store.done_shards(version)
    if missing:
        raise RuntimeError(f"{version}: parts {sorted(missing)[:10]} were not written; rerun to finish")
    manifest = storage.call_with_retries(
        lambda: _manifest(cfg, ident, version, shards, extractor_cls, keys, reused), version)
    feature_set = store.commit(version, manifest)
    seconds = time.monotonic() - started
    extracted = sum(len(v) for _, v in pending)
    manifest = feature_set.manifest
    say(f"committed {version}: {manifest['rows']} rows from {manifest['videos']} videos "
        f"({manifest['quarantined']} quarantined; captions past the end: {manifest['clips_clipped']} "
        f"clipped, {manifest['clips_skipped']} skipped) in {seconds:.1f} s")
    return {**report, "extracted_videos": extracted, "rows": manifest["rows"], **_counts(manifest),
            "skipped_parts": len(done), "reused_parts": len(reused), "reused_videos": manifest["reused_videos"],
            "seconds": round(seconds, 2),
            "videos_per_s": round(extracted / seconds, 2) if seconds and extracted else None}
