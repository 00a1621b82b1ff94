"""Feature extraction on the local S3 endpoint: exactly once, resumable after a real kill,
versioned by content, readable with plain pyarrow, rows equal to a direct computation."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from videogen import broken_videos, write_overrunning_video
from vidray import storage
from vidray.config import ConfigError, load_config
from vidray.data.manifest import manifest_table, read_manifest, write_manifest
from vidray.data.quarantine import QUARANTINE_SCHEMA
from vidray.data.synth import SynthConfig, synthesize
from vidray.data.video import iter_clips
from vidray.feature_store import store
from vidray.feature_store.extract import ExtractConfig, run_extract
from vidray.feature_store.extractors import (FramesExtractConfig, FramesExtractor,
                                             TextExtractor, decode_jpeg)

BAD = ["zero_byte", "truncated", "no_captions"]


@pytest.fixture(scope="module")
def corpus(stack, tmp_path_factory):
    """Six synthetic videos on S3 plus a zero-byte, a truncated and a caption-less video."""
    root = f"s3://{stack.bucket}/fs-corpus"
    synthesize(root, SynthConfig(videos=6, seed=5, min_seconds=2.0, max_seconds=3.0, workers=2),
               progress=False)
    rows = read_manifest(storage.join(root, "manifest.parquet")).to_pylist()
    bad = broken_videos(tmp_path_factory.mktemp("bad"))
    storage.write_bytes(storage.join(root, "bad", "zero.mp4"), bad["zero_byte"])
    storage.write_bytes(storage.join(root, "bad", "cut.mp4"), bad["truncated"])
    storage.write_bytes(storage.join(root, "bad", "nocap.mp4"), bad["good"])
    caption = [{"start": 0.0, "end": 1.0, "text": "a thing moves"}]
    rows += [{"video_id": "zero_byte", "uri": storage.join(root, "bad", "zero.mp4"), "captions": caption},
             {"video_id": "truncated", "uri": storage.join(root, "bad", "cut.mp4"), "captions": caption},
             {"video_id": "no_captions", "uri": storage.join(root, "bad", "nocap.mp4"), "captions": []}]
    manifest = storage.join(root, "mixed.parquet")
    write_manifest(manifest_table(rows), manifest)
    return {"manifest": manifest, "rows": rows, "good": [r for r in rows if r["video_id"] not in BAD]}


def read_rows(feature_set: store.FeatureSet) -> list[dict]:
    return [row for uri in feature_set.part_uris for row in store.read_parquet(uri).to_pylist()]


def test_text_extract_validate_rerun_is_a_no_op(ray_cluster, corpus, s3_uri):
    cfg = ExtractConfig(manifest=corpus["manifest"], root=s3_uri, extractor="text", videos_per_part=3)
    first = run_extract(cfg, progress=False)
    assert first["extracted_videos"] == 9 and first["rows"] == 8 and first["quarantined"] == 1

    feature_set = store.open_version(first["uri"])
    assert store.validate(first["uri"])["ok"]
    quarantine = feature_set.quarantine().to_pylist()
    assert [q["video_id"] for q in quarantine] == ["no_captions"] and "no captions" in quarantine[0]["error"]

    # Rows equal a direct, non-Ray computation of the same extractor.
    direct = TextExtractor(cfg.text)
    by_id = {r["video_id"]: r for r in read_rows(feature_set)}
    assert len(by_id) == 8
    for video in corpus["rows"]:
        if video["video_id"] != "no_captions":
            assert by_id[video["video_id"]] == direct.extract(video)[0]
    assert by_id["zero_byte"]["captions"][0]["input_ids"] == direct.tokenizer(
        "a thing moves", add_special_tokens=False)["input_ids"]

    again = run_extract(cfg, progress=False)
    assert again["uri"] == first["uri"] and again["extracted_videos"] == 0


def test_frames_quarantine_versions_and_direct_equality(ray_cluster, corpus, s3_uri):
    base = ExtractConfig(manifest=corpus["manifest"], root=s3_uri, extractor="frames",
                         frames=FramesExtractConfig(num_frames=3, size=32), videos_per_part=4)
    report = run_extract(base, progress=False)
    feature_set = store.open_version(report["uri"])
    assert sorted(q["video_id"] for q in feature_set.quarantine().to_pylist()) == ["truncated", "zero_byte"]
    rows = read_rows(feature_set)
    keys = [(r["video_id"], r["clip_index"]) for r in rows]
    assert max(collections.Counter(keys).values()) == 1
    expected = {(v["video_id"], i) for v in corpus["rows"] if v["video_id"] not in ("zero_byte", "truncated")
                for i in range(max(1, len(v["captions"])))}
    assert set(keys) == expected

    # Direct computation: the same clips sampled without Ray, JPEG round trip within tolerance.
    video = corpus["good"][0]
    direct = list(iter_clips(video["uri"], [(c["start"], c["end"]) for c in video["captions"]], 3, size=32))
    stored = sorted((r for r in rows if r["video_id"] == video["video_id"]), key=lambda r: r["clip_index"])
    for row, clip in zip(stored, direct):
        assert row["timestamps"] == clip.timestamps.tolist()
        frames = np.stack([decode_jpeg(j) for j in row["jpeg"]])
        assert frames.shape == clip.frames.shape
        assert np.abs(frames.astype(int) - clip.frames).mean() < 6  # JPEG q90
    assert FramesExtractor(base.frames).extract(video)[0]["jpeg"] == stored[0]["jpeg"]

    # A different config is a different version; the old one stays committed and valid.
    changed = ExtractConfig(**{**base.__dict__, "frames": FramesExtractConfig(num_frames=2, size=32)})
    other = run_extract(changed, progress=False)
    assert other["uri"] != report["uri"]
    assert store.validate(report["uri"])["ok"] and store.validate(other["uri"])["ok"]
    listed = {(e["name"], e["version"]) for e in store.list_sets(s3_uri) if e["committed"]}
    assert len(listed) == 2


def test_frames_set_keeps_the_good_clips_of_a_video_whose_captions_overrun(ray_cluster, corpus, s3_uri,
                                                                           tmp_path):
    """Issue 18: one ASR caption past the end of a 79.5 s video quarantined the whole video."""
    path, captions = write_overrunning_video(tmp_path / "asr.mp4")
    uri = storage.join(s3_uri, "videos", "asr.mp4")
    storage.write_bytes(uri, open(path, "rb").read())
    truncated = next(r for r in corpus["rows"] if r["video_id"] == "truncated")
    manifest = storage.join(s3_uri, "manifest.parquet")
    write_manifest(manifest_table([{"video_id": "asr", "uri": uri, "captions": captions}, truncated]), manifest)
    cfg = ExtractConfig(manifest=manifest, root=storage.join(s3_uri, "features"), extractor="frames",
                        frames=FramesExtractConfig(num_frames=2, size=16))
    report = run_extract(cfg, progress=False)

    feature_set = store.open_version(report["uri"])
    counts = {k: feature_set.manifest[k] for k in ("rows", "quarantined", "clips_clipped", "clips_skipped")}
    assert counts == {"rows": 3, "quarantined": 1, "clips_clipped": 1, "clips_skipped": 1}
    assert {k: report[k] for k in counts} == counts
    rows = sorted(read_rows(feature_set), key=lambda r: r["clip_index"])
    assert [(r["clip_index"], r["start_s"], r["end_s"]) for r in rows] == [
        (0, 0.0, 20.0), (1, 20.0, 40.0), (2, 40.0, 79.5)]
    quarantine = {(q["video_id"], q["clip_index"]): q["error"] for q in feature_set.quarantine().to_pylist()}
    assert set(quarantine) == {("truncated", None), ("asr", 2), ("asr", 3)}
    assert quarantine[("asr", 2)].endswith("(79.5 s): clipped to [40.0, 79.5)")
    assert quarantine[("asr", 3)].startswith("span [80.0, 84.0) starts at or after the video's end (79.5 s)")
    assert store.validate(report["uri"])["ok"]


def test_version_folder_reads_as_a_dataset_of_its_rows_alone(ray_cluster, corpus, s3_uri):
    """Issue 18: pyarrow's dataset discovery on a version folder counted the quarantine's rows."""
    cfg = ExtractConfig(manifest=corpus["manifest"], root=s3_uri, extractor="frames",
                        frames=FramesExtractConfig(num_frames=2, size=16), videos_per_part=4)
    report = run_extract(cfg, progress=False)
    feature_set = store.open_version(report["uri"])
    assert feature_set.manifest["quarantined"] == 2  # truncated, zero_byte: the quarantine is not empty

    fs, path = storage.arrow_filesystem(report["uri"])
    table = pq.read_table(path, filesystem=fs)
    assert table.num_rows == feature_set.manifest["rows"] == len(read_rows(feature_set))
    assert table.schema.names == store.read_parquet(feature_set.part_uris[0]).schema.names
    assert pads.dataset(path, filesystem=fs, format="parquet").count_rows() == feature_set.manifest["rows"]
    # The quarantine is still the feature set's, in its own folder.
    assert all("/_quarantine/" in u for u in feature_set.quarantine_uris)
    assert sorted(q["video_id"] for q in feature_set.quarantine().to_pylist()) == ["truncated", "zero_byte"]


def test_quarantine_of_an_older_version_at_the_top_level_still_reads(tmp_path):
    """Versions written before the _quarantine/ folder list their quarantine files at the top
    level, without clip_index (every record was a whole video)."""
    version = str(tmp_path / "frames" / "v-000000000000")
    old = pa.table({"video_id": ["bad"], "uri": ["s3://b/bad.mp4"], "error": ["VideoDecodeError: x"]})
    store.write_table_atomically(old, os.path.join(version, "quarantine-00000.parquet"))
    store.commit(version, {"parts": [], "quarantine_files": ["quarantine-00000.parquet"]})
    quarantine = store.open_version(version).quarantine()
    assert quarantine.schema.equals(QUARANTINE_SCHEMA)
    assert quarantine.to_pylist() == [{"video_id": "bad", "uri": "s3://b/bad.mp4", "clip_index": None,
                                       "error": "VideoDecodeError: x"}]


def test_parts_read_with_plain_pyarrow(ray_cluster, corpus, tmp_path):
    cfg = ExtractConfig(manifest=corpus["manifest"], root=str(tmp_path), extractor="text", limit=4)
    uri = run_extract(cfg, progress=False)["uri"]
    code = ("import glob, json, sys, pyarrow.parquet as pq\n"
            "parts = sorted(glob.glob(sys.argv[1] + '/part-*.parquet'))\n"
            "t = pq.read_table(parts)\n"
            "print(json.dumps([t.num_rows, str(t.schema.field('captions').type)]))\n")
    out = subprocess.run([sys.executable, "-I", "-c", code, uri], capture_output=True, text=True, check=True)
    rows, caption_type = json.loads(out.stdout)
    assert rows == 3  # the first four ids by name include 'no_captions', quarantined
    assert "input_ids: list<element: int32>" in caption_type


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.heavy
def test_killed_extraction_resumes_exactly_once(ray_cluster, corpus, tmp_path, s3_uri):
    """A real SIGKILL of the `vidray extract` driver mid-way, then a rerun of the same command."""
    address = ray_cluster.get_runtime_context().gcs_address
    preset = tmp_path / "extract.yaml"
    preset.write_text(f"manifest: {corpus['manifest']}\nroot: {s3_uri}\nextractor: frames\n"
                      f"frames: {{num_frames: 8, size: 160}}\nvideos_per_part: 1\nnum_workers: 1\n"
                      f"ray_address: '{address}'\n")
    cfg = load_config(ExtractConfig, str(preset))
    command = [sys.executable, "-m", "vidray.jobs.cli", "extract", str(preset)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        def some_parts_written():
            versions = store.list_sets(cfg.root) if storage.exists(cfg.root) else []
            return bool(versions) and len(store.done_shards(versions[0]["uri"])) >= 1
        _wait_for(some_parts_written, 240, "the first part")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (entry,) = store.list_sets(cfg.root)
    assert not entry["committed"], "the job finished before the kill; the test proves nothing"
    # Parts are small, so on a fast machine every part may be on storage before the kill lands;
    # the commit is then what the rerun has left to do, and it must still extract nothing twice.
    written = store.done_shards(entry["uri"])
    assert 1 <= len(written) <= 9

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(written)} of 9 parts already written" in rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["uri"] == entry["uri"] and report["skipped_parts"] == len(written)

    feature_set = store.open_version(entry["uri"])
    assert store.validate(entry["uri"])["ok"]
    rows = read_rows(feature_set)
    keys = [(r["video_id"], r["clip_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == feature_set.manifest["rows"]
    assert {k[0] for k in keys} == {v["video_id"] for v in corpus["rows"]} - {"zero_byte", "truncated"}
    assert sorted(q["video_id"] for q in feature_set.quarantine().to_pylist()) == ["truncated", "zero_byte"]
    # Stray temporary files of the killed run are never listed as parts.
    assert all(p["file"].startswith("part-") for p in feature_set.manifest["parts"])


def test_open_join_cli_and_validate_catches_damage(ray_cluster, corpus, tmp_path):
    cfg = ExtractConfig(manifest=corpus["manifest"], root=str(tmp_path), extractor="text", videos_per_part=4)
    uri = run_extract(cfg, progress=False)["uri"]

    ds = store.open_dataset(uri, columns=["video_id"])
    assert ds.schema().names == ["video_id"] and ds.count() == 8
    joined = store.with_manifest_columns(store.open_dataset(uri), corpus["manifest"], ("split",))
    rows = joined.take_all()
    assert len(rows) == 8 and all(r["split"] in ("train", "val", "test") for r in rows)

    def vidray(*args):
        return subprocess.run([sys.executable, "-m", "vidray.jobs.cli", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    listing = vidray("features", "ls", str(tmp_path))
    assert listing.returncode == 0 and "text" in listing.stdout and "8 rows" in listing.stdout
    shown = vidray("features", "show", uri)
    assert shown.returncode == 0 and "no_captions: ValueError: no captions" in shown.stdout
    assert vidray("features", "validate", uri).returncode == 0

    # Damage: a part duplicated under its own name's rows -> counts and duplicate keys are caught.
    feature_set = store.open_version(uri)
    # Two parts with rows (a part whose videos were all quarantined has none).
    first, second = [u for p, u in zip(feature_set.manifest["parts"], feature_set.part_uris) if p["rows"]][:2]
    table = pq.read_table(first)
    pq.write_table(pq.read_table(second).slice(0, 1).cast(table.schema), second)
    pq.write_table(pa_concat(table, table.slice(0, 1)), first)
    report = vidray("features", "validate", uri)
    assert report.returncode == 1
    problems = json.loads(report.stdout)["problems"]
    assert any("duplicate key" in p for p in problems)
    assert any("rows, manifest says" in p for p in problems)

    missing = vidray("features", "show", str(tmp_path / "text" / "v-000000000000"))
    assert missing.returncode == 1 and "not a committed feature-set version" in missing.stderr
    # The set's folder instead of a version: the error names the versions to choose from.
    folder = vidray("features", "show", str(tmp_path / "text"))
    assert folder.returncode == 1 and "is a feature set, not one of its versions" in folder.stderr
    assert uri in folder.stderr


def pa_concat(*tables):
    import pyarrow as pa

    return pa.concat_tables(tables)


def test_s3d_features_equal_a_direct_computation(ray_cluster, corpus, tmp_path):
    from vidray.feature_store.extractors import S3DExtractConfig, S3DExtractor

    s3d = S3DExtractConfig(flavour="tiny", size=64, seconds_per_batch=4)
    cfg = ExtractConfig(manifest=corpus["manifest"], root=str(tmp_path), extractor="s3d", s3d=s3d,
                        limit=5, videos_per_part=2)
    report = run_extract(cfg, progress=False)
    feature_set = store.open_version(report["uri"])
    assert feature_set.manifest["weights_digest"] == "random-init(seed=0, bn-calibrated)"
    assert feature_set.manifest["dims"] == {"features": 512}
    assert store.validate(report["uri"])["ok"]
    rows = {r["video_id"]: r for r in read_rows(feature_set)}
    videos = {v["video_id"]: v for v in corpus["rows"]}
    direct = S3DExtractor(s3d)
    good = [v for v in rows if v not in BAD]
    assert len(good) >= 2
    for video_id in good:
        expected = direct.embed(videos[video_id]["uri"])
        got = np.array(rows[video_id]["features"], dtype=np.float16)
        assert got.shape == expected.shape == (rows[video_id]["num_seconds"], 512)
        assert got.shape[0] == int(np.ceil(videos[video_id]["duration_s"] - 1e-9))
        np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(np.linalg.norm(got.astype(np.float32), axis=1), 1.0, atol=2e-3)
    # On disk: the fp16 features without a dictionary (their values rarely repeat, so one only
    # added an index to each: 1.23x raw), so a part stays near the raw size; ids keep theirs.
    raw, on_disk = 0, 0
    for uri in feature_set.part_uris:
        part = pq.ParquetFile(uri)
        columns = {part.metadata.row_group(0).column(i).path_in_schema: part.metadata.row_group(0).column(i)
                   for i in range(part.metadata.num_columns)}
        features = columns["features.list.element.list.element"]
        assert "RLE_DICTIONARY" not in features.encodings and "RLE_DICTIONARY" in columns["video_id"].encodings
        raw += sum(part.read(columns=["num_seconds"])["num_seconds"].to_pylist()) * 512 * 2
        on_disk += os.path.getsize(uri)
    assert on_disk < raw + 4096 * len(feature_set.part_uris), (on_disk, raw)


def test_split_pipeline_writes_the_set_the_fused_one_does(ray_cluster, corpus, tmp_path):
    """Decode tasks feeding network actors give the same version, byte for byte, as actors that
    decode and run the network in turn: same rows, same quarantine, same manifest counts."""
    from vidray.feature_store.extractors import S3DExtractConfig

    s3d = S3DExtractConfig(flavour="tiny", size=32, seconds_per_batch=1)  # several batches a video
    sets = {}
    for pipeline in ("fused", "split"):
        cfg = ExtractConfig(manifest=corpus["manifest"], root=str(tmp_path / pipeline), extractor="s3d", s3d=s3d,
                            videos_per_part=2, pipeline=pipeline)
        report = run_extract(cfg, progress=False)
        assert report["extracted_videos"] == len(corpus["rows"])
        sets[pipeline] = store.open_version(report["uri"])
    fused, split = sets["fused"], sets["split"]
    assert fused.manifest["version"] == split.manifest["version"]   # the pipeline is not content
    assert store.validate(split.uri)["ok"]
    for key in ("rows", "videos", "quarantined", "dims"):
        assert split.manifest[key] == fused.manifest[key], key
    assert [p["content"] for p in split.manifest["parts"]] == [p["content"] for p in fused.manifest["parts"]]
    for a, b in zip(fused.part_uris, split.part_uris):
        assert store.read_parquet(a).equals(store.read_parquet(b))
    quarantined = {r["video_id"]: r["error"] for r in split.quarantine().to_pylist()}
    assert quarantined == {r["video_id"]: r["error"] for r in fused.quarantine().to_pylist()}
    assert set(quarantined) == {"zero_byte", "truncated"}


def test_split_pipeline_puts_videos_together_once_whatever_the_order():
    """The driver's side of the split pipeline: batches out of order, a batch seen twice (a task run
    again) and a video that fails after some batches; each shard comes out once, complete."""
    from vidray.feature_store.split import Assembler

    videos = [{"video_id": v, "uri": f"s3://b/{v}.mp4"} for v in ("a", "b", "c")]
    assembler = Assembler([(0, videos[:2]), (1, videos[2:])], dim=2)

    def row(video, index, count=1, last=False, error=""):
        shard = 1 if video == "c" else 0
        features = np.full((count, 2), index, np.float16).tobytes() if not error else b""
        return {"shard": shard, "video_id": video, "index": index, "count": count, "last": last,
                "error": error, "unreachable": False, "features": features}

    assert assembler.add(row("a", 1, count=2, last=True)) == []
    assert assembler.add(row("b", 0)) == []
    assert assembler.add(row("b", 1, error="VideoDecodeError: cut short")) == []
    assert assembler.add(row("a", 0)) == [0]                       # a complete, b quarantined
    assert assembler.add(row("a", 0)) == [] and assembler.add(row("b", 0)) == []   # seen again
    rows, records = assembler.shard(0)
    assert [r["video_id"] for r in rows] == ["a"] and rows[0]["num_seconds"] == 3
    assert rows[0]["features"][:, 0].tolist() == [0, 1, 1]         # batches in their order
    assert records == [{"video_id": "b", "uri": "s3://b/b.mp4", "clip_index": None,
                        "error": "VideoDecodeError: cut short"}]
    assert assembler.add(row("c", 0, last=True)) == [1]


def test_split_is_refused_for_an_extractor_without_a_network():
    with pytest.raises(ConfigError, match="pipeline.*frames has no network"):
        ExtractConfig(manifest="m.parquet", root="features", extractor="frames", pipeline="split").validate()


def test_shards_are_cut_by_id_so_added_videos_change_only_the_shards_they_fall_into():
    """Cut by the ids, not by position: 40 new ids among 1,000 change the shards they fall into
    (and a shard after one, where a cut forced by the size cap moves), every other shard stays as
    it was, so its part is reused; sizes keep to ``videos_per_part`` on average, twice at most."""
    from vidray.feature_store.extract import shards_of

    rng = np.random.default_rng(0)
    ids = sorted({f"{rng.integers(16 ** 11):011x}" for _ in range(1040)})
    new = set(rng.choice(ids, 40, replace=False).tolist())
    table = lambda chosen: pa.table({"video_id": sorted(chosen)})
    before = {tuple(r["video_id"] for r in rows) for _, rows in shards_of(table(set(ids) - new), 16)}
    after = [tuple(r["video_id"] for r in rows) for _, rows in shards_of(table(ids), 16)]
    changed = [shard not in before for shard in after]
    assert all(new & set(shard) or (i > 0 and changed[i - 1]) for i, shard in enumerate(after) if changed[i])
    assert 0 < sum(changed) < len(after)
    assert sum(len(s) for s, c in zip(after, changed) if not c) > 0.3 * len(ids)  # reused: 385 of 1,040 here
    sizes = [len(s) for s in after]
    assert max(sizes) <= 32 and 10 <= np.mean(sizes) <= 16
    assert [len(rows) for _, rows in shards_of(table(ids[:5]), 1)] == [1] * 5  # one video a part


def test_adding_videos_extracts_only_their_shards_and_reuses_the_other_parts(ray_cluster, feature_sets, s3_uri,
                                                                               tmp_path):
    """Extract 12 of 16 videos, then all 16 (the 4 added spread among the others), on S3: the new
    version copies every part whose videos did not change, extracts only the shards the new videos
    fall into, validates, holds each video once and the rows of an extraction from scratch (the
    session's text set of the same 16); the old version is untouched, byte for byte."""
    full = read_manifest(feature_sets["manifest"])
    ids = sorted(full["video_id"].to_pylist())
    added = set(ids[1::4])
    first = str(tmp_path / "first.parquet")
    write_manifest(full.filter(pc.invert(pc.is_in(full["video_id"], pa.array(sorted(added))))), first)
    cfg = ExtractConfig(manifest=first, root=s3_uri, extractor="text", videos_per_part=2)
    old = run_extract(cfg, progress=False)
    fs, path = storage.filesystem(old["uri"])
    before = {p: fs.cat(p) for p in fs.find(path)}

    said: list[str] = []
    report = run_extract(dataclasses.replace(cfg, manifest=feature_sets["manifest"]), progress=False, say=said.append)
    assert report["uri"] != old["uri"] and report["videos"] == 16
    assert report["reused_parts"] >= 1 and report["extracted_videos"] == 16 - report["reused_videos"] < 16
    assert any(f"reusing {report['reused_parts']} of " in line and os.path.basename(old["uri"]) in line for line in said)
    new = store.open_version(report["uri"])
    assert store.validate(report["uri"])["ok"] and new.manifest["reused_parts"] == report["reused_parts"]
    for part, uri in zip(new.manifest["parts"], new.part_uris):  # reused exactly where no video was added
        videos = set(store.read_parquet(uri, ["video_id"])["video_id"].to_pylist())
        assert part.get("reused_from") == (None if videos & added else os.path.basename(old["uri"])), part
    rows = sorted(read_rows(new), key=lambda r: r["video_id"])
    assert [r["video_id"] for r in rows] == ids
    assert rows == sorted(read_rows(store.open_version(feature_sets["text"])), key=lambda r: r["video_id"])
    assert {p: fs.cat(p) for p in fs.find(path)} == before


def test_text_extraction_runs_in_the_driver_without_ray(feature_sets, tmp_path):
    """A tokenizer needs no actor pool: in a fresh process, `run_extract` of the text set leaves
    Ray uninitialised, and the set equals the session's (extracted the same way)."""
    code = ("import json, sys, ray; from vidray.feature_store.extract import ExtractConfig, run_extract; "
            "r = run_extract(ExtractConfig(manifest=sys.argv[1], root=sys.argv[2], extractor='text'), progress=False, "
            "say=lambda m: None); print(json.dumps({'uri': r['uri'], 'ray': ray.is_initialized()}))")
    out = subprocess.run([sys.executable, "-c", code, feature_sets["manifest"], str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["ray"] is False
    by_id = lambda uri: sorted(read_rows(store.open_version(uri)), key=lambda r: r["video_id"])
    assert by_id(result["uri"]) == by_id(feature_sets["text"])
