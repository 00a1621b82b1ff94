"""The Ray Data clip pipeline on the local S3 endpoint, with broken videos mixed in."""

from __future__ import annotations

import collections
import glob
import os

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from videogen import broken_videos, write_overrunning_video, write_video
from vidray import storage
from vidray.data.clips import (ClipsConfig, clip_row_frames, clip_specs, decode_video_clips, iter_video_clips,
                               run_clips)
from vidray.data.manifest import manifest_table, read_manifest, write_manifest
from vidray.data.quarantine import gather_quarantine
from vidray.data.synth import SynthConfig, synthesize
from vidray.data.video import sample_frames


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


def test_captions_past_the_end_are_clipped_or_skipped_and_the_good_clips_kept(ray_cluster, tmp_path):
    """Issue 18: one ASR caption past the end of a 79.5 s video quarantined the whole video."""
    uri, captions = write_overrunning_video(tmp_path / "asr.mp4")
    # No duration in the manifest: the decoder's is what counts.
    rows = [{"video_id": "asr", "uri": uri, "captions": captions},
            {"video_id": "plain", "uri": write_video(tmp_path / "plain.mp4"),
             "captions": [{"start": 0.0, "end": 1.0, "text": "plain"}]}]
    manifest = str(tmp_path / "m.parquet")
    write_manifest(manifest_table(rows), manifest)
    cfg = ClipsConfig(manifest=manifest, output=str(tmp_path / "out"), num_frames=3, size=16)
    report = run_clips(cfg)

    assert report["quarantined"] == 0 and report["videos_ok"] == 2 and report["clips"] == 4
    assert report["clips_clipped"] == 1 and report["clips_skipped"] == 1
    clips = sorted((c for c in pq.read_table(report["clips_uri"]).to_pylist() if c["video_id"] == "asr"),
                   key=lambda c: c["clip_index"])
    # The clip row says the span it sampled: the third caption ends where the video does.
    assert [(c["clip_index"], c["start_s"], c["end_s"]) for c in clips] == [
        (0, 0.0, 20.0), (1, 20.0, 40.0), (2, 40.0, 79.5)]
    assert [c["texts"] for c in clips] == [["first"], ["second"], ["third runs past the end"]]
    assert 40.0 <= min(clips[2]["timestamps"]) and max(clips[2]["timestamps"]) < 79.5

    def quarantine() -> list[dict]:
        return sorted(pq.read_table(report["quarantine_uri"]).to_pylist(), key=lambda r: r["clip_index"])

    clipped, skipped = quarantine()
    assert (clipped["video_id"], clipped["clip_index"], skipped["clip_index"]) == ("asr", 2, 3)
    assert clipped["uri"] == uri
    assert clipped["error"] == ("span [40.0, 84.0) runs past the video's end (79.5 s): "
                                "clipped to [40.0, 79.5)")
    assert skipped["error"] == "span [80.0, 84.0) starts at or after the video's end (79.5 s): skipped"

    # A retried task writes the video's records again: they replace the first ones.
    assert len(decode_video_clips(rows[0], cfg)) == 3
    gather_quarantine(cfg.output)
    assert quarantine() == [clipped, skipped]


def test_a_skipped_caption_names_the_video_duration_even_when_nothing_else_reached_the_end(tmp_path):
    uri, _ = write_overrunning_video(tmp_path / "asr.mp4")
    row = {"video_id": "asr", "uri": uri, "captions": [{"start": 0.0, "end": 20.0, "text": "in"},
                                                        {"start": 80.0, "end": 84.0, "text": "after"}]}
    records: list[dict] = []
    clips = list(iter_video_clips(row, num_frames=2, strategy="uniform", size=16, clip="captions", seed=0,
                                  overruns=records))
    assert [c["clip_index"] for c in clips] == [0]
    assert [r["error"] for r in records] == [
        "span [80.0, 84.0) starts at or after the video's end (79.5 s): skipped"]


def test_clips_output_is_one_table_whatever_the_clip_ends(ray_cluster, tmp_path):
    """Issue 18: parts whose clips all had an unknown end stored end_s as type null, so the
    folder did not read as one table ("Unsupported cast from double to null")."""
    video = write_video(tmp_path / "v.mp4")  # 2.0 s
    rows = [  # the untimed ones first: their part is the one pyarrow takes the schema from
        {"video_id": "untimed", "uri": video, "captions": [{"start": None, "end": None, "text": "u"}]},
        {"video_id": "no_captions", "uri": video, "captions": []},
        {"video_id": "timed", "uri": video, "captions": [{"start": 0.0, "end": 1.0, "text": "a"},
                                                        {"start": 1.0, "end": 2.0, "text": "b"}]}]
    manifest = str(tmp_path / "m.parquet")
    write_manifest(manifest_table(rows), manifest)
    report = run_clips(ClipsConfig(manifest=manifest, output=str(tmp_path / "out"), num_frames=2, size=16))
    assert report["clips"] == 4 and report["quarantined"] == 0

    # OUT/clips holds clip parts and nothing else, all of one schema.
    names = os.listdir(report["clips_uri"])
    assert len(names) >= 2 and all(n.endswith(".parquet") for n in names)
    schemas = [pq.read_schema(p) for p in glob.glob(os.path.join(report["clips_uri"], "*"))]
    assert all(s.equals(schemas[0]) for s in schemas), [str(s.field("end_s")) for s in schemas]

    table = pq.read_table(report["clips_uri"])
    assert table.num_rows == pads.dataset(report["clips_uri"], format="parquet").count_rows() == 4
    by_id = {(r["video_id"], r["clip_index"]): r for r in table.to_pylist()}
    # A whole-video clip's end is the end it sampled to: the video's duration.
    assert by_id[("untimed", 0)]["end_s"] == by_id[("no_captions", 0)]["end_s"] == 2.0
    assert (by_id[("timed", 1)]["start_s"], by_id[("timed", 1)]["end_s"]) == (1.0, 2.0)
    # The frames of a clip read back as [T, H, W, 3] with the row's own shape columns.
    clip = by_id[("timed", 0)]
    direct = sample_frames(video, 2, size=16, start_s=0.0, end_s=1.0)
    np.testing.assert_array_equal(clip_row_frames(clip), direct.frames)
