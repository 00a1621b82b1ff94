"""The bad-input corpus through the real jobs: every kind of bad input gets a quarantine row with
its reason or one clear message naming it, and every good item is still processed exactly once.

    kind                      job              outcome
    zero-byte object          extract, clips   quarantined: "empty object (0 bytes)"
    truncated MP4             extract, clips   quarantined: "invalid or truncated video data"
    not a video (text)        extract, clips   quarantined: "not a video"
    audio only                extract, clips   quarantined: "no video stream"
    unsupported codec         extract, clips   quarantined: "no decoder for its video codec"
    huge dimensions           extract, clips   quarantined: "larger than 8K UHD"
    missing object            extract, clips   quarantined: "no such file or object"
    1-frame video             extract          processed: its one frame repeated
    caption missing / empty   extract (text)   quarantined: "no captions"
    path-escaping video id    clips / adapt    quarantine file stays in the output / row skipped
    malformed annotation row  adapt            row skipped, file:line and reason on stderr
    duplicate video_id        adapt / extract  later row skipped / job refused naming the ids
    non-UTF-8 annotations     adapt            exit 1: "not UTF-8 text (... at byte N)"
    bad config value          extract          exit 2 naming the key and what it takes
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from videogen import broken_videos, write_audio_only, write_video
from vidray import storage
from vidray.data.clips import ClipsConfig, run_clips
from vidray.data.manifest import manifest_table, read_manifest, write_manifest
from vidray.data.synth import SynthConfig, synthesize
from vidray.feature_store import store
from vidray.feature_store.extract import ExtractConfig, run_extract
from vidray.feature_store.extractors import FramesExtractConfig

# kind -> what its quarantine row says
QUARANTINED = {
    "zero_byte": r"empty object \(0 bytes\)",
    "truncated": r"invalid or truncated video data",
    "not_a_video": r"not a video",
    "audio_only": r"no video stream",
    "unsupported_codec": r"no decoder for its video codec",
    "huge_dims": r"8192x4352 are larger than 8K UHD",
    "missing_object": r"no such file or object",
}
ESCAPING_ID = "../../outside"


def _vidray(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vidray.jobs.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def corpus(stack, tmp_path_factory):
    """Three good synthetic videos on S3 and one object (or absence) per bad kind, in one manifest."""
    root = f"s3://{stack.bucket}/bad-inputs"
    local = tmp_path_factory.mktemp("bad-inputs")
    synthesize(root, SynthConfig(videos=3, seed=8, min_seconds=2.0, max_seconds=3.0, workers=2), progress=False)
    good = read_manifest(storage.join(root, "manifest.parquet")).to_pylist()
    broken = broken_videos(local)
    real = os.path.join(local, "real.mp4")
    objects = {
        "zero_byte": broken["zero_byte"], "truncated": broken["truncated"], "not_a_video": broken["not_a_video"],
        "audio_only": open(write_audio_only(local / "audio.mp4"), "rb").read(),
        # The sample entry renamed to a codec FFmpeg has never heard of.
        "unsupported_codec": open(real, "rb").read().replace(b"avc1", b"zzz1"),
        "huge_dims": open(write_video(local / "huge.mp4", num_frames=2, width=8192, height=4352), "rb").read(),
        "one_frame": open(write_video(local / "one.mp4", num_frames=1), "rb").read(),
        "no_captions": broken["good"], "empty_caption": broken["good"],
    }
    caption = [{"start": 0.0, "end": 1.0, "text": "something moves"}]
    captions = {"no_captions": [], "empty_caption": [{"start": 0.0, "end": 1.0, "text": "  "}]}
    rows = list(good)
    for kind, data in objects.items():
        uri = storage.join(root, "bad", f"{kind}.mp4")
        storage.write_bytes(uri, data)
        rows.append({"video_id": kind, "uri": uri, "captions": captions.get(kind, caption)})
    rows.append({"video_id": "missing_object", "uri": storage.join(root, "bad", "gone.mp4"), "captions": caption})
    rows.append({"video_id": ESCAPING_ID, "uri": storage.join(root, "bad", "zero_byte.mp4"), "captions": caption})
    manifest = storage.join(root, "mixed.parquet")
    write_manifest(manifest_table(rows), manifest)
    return {"manifest": manifest, "good": {r["video_id"] for r in good}, "root": root, "local": local}


def _quarantine(feature_set: store.FeatureSet) -> dict[str, str]:
    """The reasons of the videos quarantined whole (not of captions past a video's end)."""
    return {q["video_id"]: q["error"] for q in feature_set.quarantine().to_pylist() if q["clip_index"] is None}


# The 1-frame video lasts 1/24 s: its caption's 0-1 s span runs past the end.
ONE_FRAME_CLIPPED = "span [0.0, 1.0) runs past the video's end (0.042 s): clipped to [0.0, 0.042)"


def _video_ids(feature_set: store.FeatureSet) -> list[str]:
    return [v for uri in feature_set.part_uris for v in store.read_parquet(uri, ["video_id"])["video_id"].to_pylist()]


def test_frames_extraction_quarantines_each_bad_video_with_its_reason(ray_cluster, corpus, s3_uri):
    report = run_extract(ExtractConfig(manifest=corpus["manifest"], root=s3_uri, extractor="frames",
                                       frames=FramesExtractConfig(num_frames=4, size=32), videos_per_part=4), progress=False)
    feature_set = store.open_version(report["uri"])
    quarantine = _quarantine(feature_set)
    assert set(quarantine) == set(QUARANTINED) | {ESCAPING_ID}
    for kind, reason in QUARANTINED.items():
        assert re.search(reason, quarantine[kind]), (kind, quarantine[kind])
        assert quarantine[kind].startswith("VideoDecodeError: s3://")  # names the object
    # Every readable video once: the good ones, the 1-frame one and those without captions (frames
    # need none; the text set and training drop them).
    ids = _video_ids(feature_set)
    assert sorted(set(ids)) == sorted(corpus["good"] | {"one_frame", "no_captions", "empty_caption"})
    assert report["quarantined"] == len(QUARANTINED) + 1 and store.validate(report["uri"])["ok"]
    (one,) = [r for uri in feature_set.part_uris for r in store.read_parquet(uri).to_pylist()
              if r["video_id"] == "one_frame"]
    assert len(one["jpeg"]) == 4 and len(set(one["timestamps"])) == 1  # its one frame, repeated
    captions = [(q["video_id"], q["clip_index"], q["error"]) for q in feature_set.quarantine().to_pylist()
                if q["clip_index"] is not None]
    assert captions == [("one_frame", 0, ONE_FRAME_CLIPPED)] and report["clips_clipped"] == 1


def test_text_extraction_quarantines_missing_and_empty_captions(ray_cluster, corpus, s3_uri):
    report = run_extract(ExtractConfig(manifest=corpus["manifest"], root=s3_uri, extractor="text"), progress=False)
    quarantine = _quarantine(store.open_version(report["uri"]))
    assert set(quarantine) == {"no_captions", "empty_caption"}
    assert all("no captions" in reason for reason in quarantine.values())


def test_clips_job_quarantines_inside_its_output_whatever_the_video_id(ray_cluster, corpus, s3_uri):
    report = run_clips(ClipsConfig(manifest=corpus["manifest"], output=s3_uri, num_frames=4, size=32))
    fs, path = storage.filesystem(s3_uri)
    # One file per video, holding that video's records.
    records = [r for p in fs.glob(f"{path}/_quarantine/*.json") for r in json.loads(fs.cat(p))]
    videos = [r for r in records if r["clip_index"] is None]
    assert {r["video_id"] for r in videos} == set(QUARANTINED) | {ESCAPING_ID}
    assert report["quarantined"] == len(videos)
    assert [(r["video_id"], r["error"]) for r in records if r["clip_index"] is not None] == [
        ("one_frame", ONE_FRAME_CLIPPED)]
    # Its record sits in the output's _quarantine/ like any other, and nothing anywhere else in
    # the bucket is named after where "../../outside" points.
    bucket = path.split("/", 1)[0]
    assert not [p for p in fs.find(bucket) if "outside" in p and f"{path}/_quarantine/" not in p]


def test_a_manifest_naming_a_video_twice_is_refused(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Written by another tool: our own writer refuses duplicates (ManifestError).
    table = read_manifest(corpus["manifest"])
    rows = table.to_pylist()
    doubled = str(tmp_path / "doubled.parquet")
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), doubled)
    out = _vidray("extract", f"manifest={doubled}", f"root={tmp_path / 'fs'}", "extractor=text")
    assert out.returncode == 1 and f"duplicate video_id ['{rows[0]['video_id']}']" in out.stderr
    assert not os.path.exists(tmp_path / "fs")  # refused before anything was written


def test_bad_annotation_rows_are_skipped_and_named_and_a_non_utf8_file_is_refused(tmp_path):
    csv = tmp_path / "webvid.csv"
    csv.write_bytes(
        b"videoid,contentUrl,duration,page_idx,page_dir,name\n"
        b"1,u,PT00H00M05S,0,000001_000050,A dog runs\n"
        b"2,u,PT00H00M05S,0,000001_000050\n"                 # malformed: a field short
        b"3,u,PT00H00M05S,0,000001_000050,   \n"             # empty caption
        b"1,u,PT00H00M05S,0,000001_000050,A dog runs again\n"  # duplicate video id
        b"../../etc,u,PT00H00M05S,0,000001_000050,Escape\n"  # a path, not an id
        b"4,u,PT00H00M05S,0,000001_000050,A cat sits\n")
    out = _vidray("adapt", "webvid", str(csv), "--videos", "s3://bucket/videos", "--out", str(tmp_path / "m.parquet"))
    assert out.returncode == 0, out.stderr
    skipped = [line for line in out.stderr.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 4 and all("webvid.csv:" in line for line in skipped), skipped
    for line_no, reason in ((3, "field"), (4, "name"), (5, "duplicate video id '1'"), (6, "videoid")):
        assert any(f":{line_no}" in line and reason in line for line in skipped), (line_no, skipped)
    assert sorted(read_manifest(str(tmp_path / "m.parquet"))["video_id"].to_pylist()) == ["1", "4"]

    csv.write_bytes(b"videoid,contentUrl,duration,page_idx,page_dir,name\n1,u,PT5S,0,d,caf\xe9 latte\n")
    out = _vidray("adapt", "webvid", str(csv), "--videos", "s3://bucket/videos", "--out", str(tmp_path / "n.parquet"))
    assert out.returncode == 1 and "not UTF-8 text" in out.stderr and "webvid.csv" in out.stderr
    assert not os.path.exists(tmp_path / "n.parquet")


@pytest.mark.parametrize("override, key", [("videos_per_part=0", "videos_per_part"),
                                           ("extractor=s4d", "extractor"),
                                           ("frames.size=large", "frames.size")])
def test_a_bad_config_value_exits_2_naming_the_key(override, key, tmp_path):
    out = _vidray("extract", "manifest=m.parquet", f"root={tmp_path}", override)
    assert out.returncode == 2 and key in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1  # one line, no traceback
