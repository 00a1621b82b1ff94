"""The Ray Data clip pipeline on the local S3 endpoint, with broken videos mixed in."""

from __future__ import annotations

import collections

import numpy as np
import pyarrow.parquet as pq
import pytest

from videogen import broken_videos, write_video
from vidray import storage
from vidray.clips import ClipsConfig, clip_specs, run_clips
from vidray.manifest import manifest_table, read_manifest, write_manifest
from vidray.synth import SynthConfig, synthesize
from vidray.video import sample_frames


def test_clip_specs_per_caption_or_per_video():
    captions = [{"start": 0.0, "end": 1.5, "text": "a"}, {"start": 1.5, "end": 3.0, "text": "b"},
                {"start": 2.0, "end": 2.0, "text": "empty span"}]
    assert clip_specs(captions, 3.0, "captions") == [
        {"start_s": 0.0, "end_s": 1.5, "texts": ["a"]}, {"start_s": 1.5, "end_s": 3.0, "texts": ["b"]}]
    assert clip_specs(captions, 3.0, "video") == [
        {"start_s": 0.0, "end_s": 3.0, "texts": ["a", "b", "empty span"]}]
    # Untimed captions (MSR-VTT, WebVid): one whole-video clip carrying all its sentences.
    untimed = [{"start": None, "end": None, "text": "x"}, {"start": None, "end": None, "text": "y"}]
    assert clip_specs(untimed, None, "captions") == [{"start_s": 0.0, "end_s": None, "texts": ["x", "y"]}]


@pytest.fixture(scope="module")
def corpus_on_s3(stack, tmp_path_factory):
    """Four synthetic videos on S3 plus four broken objects, in one manifest."""
    root = f"s3://{stack.bucket}/clips-corpus"
    synthesize(root, SynthConfig(videos=4, seed=3, min_seconds=2.0, max_seconds=3.0, workers=2),
               progress=False)
    good = read_manifest(storage.join(root, "manifest.parquet")).to_pylist()
    broken = broken_videos(tmp_path_factory.mktemp("broken"))
    del broken["good"]
    rows = list(good)
    for name, data in broken.items():
        uri = storage.join(root, "bad", f"{name}.mp4")
        storage.write_bytes(uri, data)
        rows.append({"video_id": name, "uri": uri, "captions": [{"start": 0.0, "end": 1.0, "text": name}]})
    rows.append({"video_id": "missing", "uri": storage.join(root, "bad", "missing.mp4"),
                 "captions": [{"start": 0.0, "end": 1.0, "text": "gone"}]})
    manifest_uri = storage.join(root, "mixed.parquet")
    write_manifest(manifest_table(rows), manifest_uri)
    return {"manifest": manifest_uri, "good": good, "bad": [*broken, "missing"]}


def test_every_good_clip_once_and_a_quarantine_row_per_bad_video(ray_cluster, corpus_on_s3, s3_uri):
    cfg = ClipsConfig(manifest=corpus_on_s3["manifest"], output=s3_uri, num_frames=4, size=32)
    report = run_clips(cfg)

    expected = {(v["video_id"], i) for v in corpus_on_s3["good"] for i in range(len(v["captions"]))}
    assert report["videos"] == 8 and report["videos_ok"] == 4 and report["quarantined"] == 4
    assert report["clips"] == len(expected)

    fs, path = storage.arrow_filesystem(report["clips_uri"])
    clips = pq.read_table(path, filesystem=fs).to_pylist()
    keys = [(c["video_id"], c["clip_index"]) for c in clips]
    assert collections.Counter(keys).most_common(1)[0][1] == 1  # nothing duplicated
    assert set(keys) == expected                                  # nothing lost

    by_video = {v["video_id"]: v for v in corpus_on_s3["good"]}
    for clip in clips:
        caption = by_video[clip["video_id"]]["captions"][clip["clip_index"]]
        assert clip["texts"] == [caption["text"]]
        assert (clip["start_s"], clip["end_s"]) == (caption["start"], caption["end"])
        stamps = np.array(clip["timestamps"])
        assert len(stamps) == 4 and np.all(np.diff(stamps) > 0)
        assert caption["start"] - 1e-6 <= stamps.min() and stamps.max() < caption["end"]

    # The stored frames are exactly what the sampler gives for that segment.
    first = next(c for c in clips if c["clip_index"] == 1)
    caption = by_video[first["video_id"]]["captions"][1]
    direct = sample_frames(by_video[first["video_id"]]["uri"], 4, size=32,
                           start_s=caption["start"], end_s=caption["end"])
    stored = np.array(first["frames"], dtype=np.uint8).reshape(direct.frames.shape)
    np.testing.assert_array_equal(stored, direct.frames)

    qfs, qpath = storage.arrow_filesystem(report["quarantine_uri"])
    quarantine = {r["video_id"]: r for r in pq.read_table(qpath, filesystem=qfs).to_pylist()}
    assert set(quarantine) == set(corpus_on_s3["bad"])
    assert "empty" in quarantine["zero_byte"]["error"]
    assert "not a video" in quarantine["not_a_video"]["error"]
    assert "no such file" in quarantine["missing"]["error"]
    assert all(r["uri"].startswith("s3://") and r["error"] for r in quarantine.values())


def test_refuses_to_overwrite_unless_told(ray_cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something.parquet").write_bytes(b"x")
    manifest = tmp_path / "m.parquet"
    write_manifest(manifest_table([{"video_id": "a", "uri": str(write_video(tmp_path / "a.mp4"))}]),
                   str(manifest))
    cfg = ClipsConfig(manifest=str(manifest), output=str(out), num_frames=2, size=16, clip="video")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run_clips(cfg)
    cfg.overwrite = True
    report = run_clips(cfg)
    assert report["clips"] == 1 and report["quarantined"] == 0
    assert not (out / "something.parquet").exists()
